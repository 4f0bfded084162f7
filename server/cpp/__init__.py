"""The C++ gRPC front end's library: frontend.cc, built on first use (binding.py)."""
