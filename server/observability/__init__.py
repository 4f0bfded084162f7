"""Observability: Prometheus metrics (and their endpoint, merged across `--workers`), logs,
tracing, and the request context they share. Imports nothing heavy here."""
