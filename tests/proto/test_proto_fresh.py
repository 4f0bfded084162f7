"""The committed generated code must match its .proto sources (regenerate: `make proto`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from snapserve.proto.generate import ROOT, generate, proto_sources

pytest.importorskip("grpc_tools")


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    generate(tmp_path)
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.py*"))
    assert generated, "protoc generated nothing"
    stale = [str(rel) for rel in generated
             if not (ROOT / rel).exists() or (ROOT / rel).read_bytes() != (tmp_path / rel).read_bytes()]
    assert not stale, f"generated code is stale, run `make proto`: {stale}"


def test_every_proto_has_generated_modules() -> None:
    for source in proto_sources():
        stem = source.with_suffix("")
        for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"):
            assert Path(f"{stem}{suffix}").exists(), f"{source.name}: missing {stem.name}{suffix}"
