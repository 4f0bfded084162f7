"""Side-by-side benchmarks against other servers (optional; never in CI, imported by no test)."""
