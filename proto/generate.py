"""Regenerate the Python code for every .proto under proto/: `python -m snapserve.proto.generate`.

The generated modules are committed (so installing needs no protoc) and
tests/test_proto_fresh.py fails when they no longer match their .proto sources.
Paths are given relative to the repository root, so protoc writes imports such as
`from proto.snapserve.v1 import ...`; they are rewritten to the installed package,
`snapserve.proto...`, while the wire names stay `snapserve.v1.*`.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def proto_sources(root: Path = ROOT) -> list[Path]:
    return sorted((root / "proto").rglob("*.proto"))


def generate(out_dir: Path, root: Path = ROOT) -> None:
    """Write *_pb2.py, *_pb2.pyi and *_pb2_grpc.py for every source into out_dir (same layout)."""
    from grpc_tools import protoc  # dev dependency: only needed to regenerate

    sources = [str(p.relative_to(root)) for p in proto_sources(root)]
    include = Path(protoc.__file__).parent / "_proto"  # google/protobuf/*.proto
    args = ["protoc", f"-I{root}", f"-I{include}", f"--python_out={out_dir}",
            f"--pyi_out={out_dir}", f"--grpc_python_out={out_dir}", *sources]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed for {sources}")
    # .py and .pyi only: a __pycache__ beside them holds *_pb2*.pyc, which is not text.
    for module in sorted(m for m in (out_dir / "proto").rglob("*_pb2*.py*") if m.suffix in (".py", ".pyi")):
        module.write_text(_PROTOC_IMPORT.sub(r"\1snapserve.proto.", module.read_text()))
    for package in PRIVATE_POOL_PACKAGES:
        for module in sorted((out_dir / package).glob("*_pb2.py")):
            use_private_pool(module, "snapserve." + package.replace("/", "."))


# protoc names modules by their path under the include root (`proto.inference...`); installed,
# that folder is the `snapserve.proto` package.
_PROTOC_IMPORT = re.compile(r"^(from |import )proto\.", re.MULTILINE)


# Packages built into a descriptor pool of their own (`<package>.POOL`) instead of protobuf's
# default one. tritonclient, KServe and MLServer each register `inference.*` messages in the
# default pool; a second definition there fails at import ("duplicate symbol
# 'inference.DataType'", triton-inference-server/client#730). In their own pool, ours can share
# a process with any of them (our tests drive the server with tritonclient). The wire names
# stay `inference.*`.
PRIVATE_POOL_PACKAGES = ("proto/inference",)
_DEFAULT_POOL = "DESCRIPTOR = _descriptor_pool.Default().AddSerializedFile("
_IMPORTS_END = "# @@protoc_insertion_point(imports)\n"


def use_private_pool(module: Path, package: str) -> None:
    """Rewrite one generated *_pb2.py to add its file to `<package>.POOL`."""
    text = module.read_text()
    if text.count(_DEFAULT_POOL) != 1 or text.count(_IMPORTS_END) != 1:
        raise RuntimeError(f"{module}: protoc output changed; cannot switch it to {package}.POOL")
    text = text.replace(_IMPORTS_END, f"{_IMPORTS_END}from {package} import POOL as _POOL\n")
    module.write_text(text.replace(_DEFAULT_POOL, "DESCRIPTOR = _POOL.AddSerializedFile("))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT, help="output root (default: the repository)")
    args = parser.parse_args(argv)
    generate(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
