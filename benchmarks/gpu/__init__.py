"""The CUDA end-to-end run (issue 17): one script, `benchmarks/gpu/run.py`, for one device call.
See benchmarks/gpu/README.md."""
