"""Maintenance loops: one per module. Safe to run on every server at once (see each module)."""
