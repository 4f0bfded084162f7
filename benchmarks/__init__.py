"""Benchmarks: the in-process ceiling (ceiling.py), the served sweep against it (serve.py), and a
trivial server that shows what gRPC and the client alone cost (echo_server.py). Results are
written to benchmarks/RESULTS.md. Run from the repository root: `python -m benchmarks.serve`.
The soak (soak.py: mixed and bad requests, SIGTERM under load, memory) writes
benchmarks/soak_results.json: `python -m benchmarks.soak` (docs/reliability.md)."""

import os

# Every server a benchmark starts measures its plan as a first start on a fresh machine does:
# a plan an earlier run kept in the user's plan cache (measured beside whatever ran then) must
# not carry into this run's numbers. A benchmark about the cache gives its own folder.
os.environ.setdefault("SNAPSERVE_PLAN_CACHE", "off")
