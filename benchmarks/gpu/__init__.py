"""The CUDA end-to-end run (issue 17): one device call, started by `benchmarks/gpu/run.py`.
See benchmarks/gpu/README.md for the calls and for what each module of this package does."""
