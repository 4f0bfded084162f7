"""Helpers the test packages share: plain modules, imported by name (no fixtures here).

- `models`: small ONNX members and model versions written as the repository contract says;
  `reference_member_probs`, the oracle that runs member files with ONNX Runtime directly.
- `servers`: a real server in the test's event loop (`serving`) or on its own thread
  (`ThreadedServer`).
- `calls`: inputs and requests for the `digits` model, channels and stubs for both APIs.
- `pki`: throw-away certificates for TLS and mutual TLS.
- `training`: the trainer CLI in this process, and a run killed mid-training.
- `waiting`: `eventually`, a poll for a state the server reaches on its own (never a fixed sleep).

Fixtures live in tests/conftest.py (shared) and in a package's own conftest.py (local).
"""
