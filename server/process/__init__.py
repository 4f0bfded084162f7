"""The server as a process: the `ensemble-server` CLI, `--workers`, the frozen heap, and the
container's health check. Imports nothing heavy here."""
