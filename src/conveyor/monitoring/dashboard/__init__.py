"""The web dashboard served at /ui: server-rendered pages (Jinja2) and SVG charts, no build step."""
