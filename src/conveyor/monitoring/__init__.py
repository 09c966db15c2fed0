"""Monitoring: Prometheus metrics and the HTTP health/status endpoints. Imports only leaves."""
