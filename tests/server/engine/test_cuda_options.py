"""The CUDA options' decisions, flags, reports, warm-up plan and fallbacks, decided and checked
with real ONNX Runtime CPU sessions (the CUDA paths themselves need a GPU: benchmarks/gpu)."""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from pathlib import Path

import numpy as np
import pytest

from snapserve.server.api.kserve_messages import encode_model_config
from snapserve.client import EnsembleClient
from snapserve.server.config import RepositoryConfig, RuntimeConfig
from snapserve.server.engine.batcher import BatcherConfig
from snapserve.server.engine.runtime import (CUDNN_CONV_ALGO_SEARCH, EnsembleRuntime,
                                             agreement_tolerance, cuda_provider_options,
                                             warm_up_batch_sizes)
from snapserve.server.models.loading import load_version
from snapserve.trainer.fuse import FP16_TOLERANCE, fuse_members
from snapserve.trainer.importer import import_members

from tests.support.models import SHAPE, linear_members, save
from tests.support.servers import cpu_server, pinned_runtime

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


def _load(version: Path, max_batch_size: int = 8, **runtime: object):  # type: ignore[no-untyped-def]
    return load_version(version, pinned_runtime(device="cpu", **runtime),
                        BatcherConfig(max_batch_size=max_batch_size))


def test_the_cuda_provider_gets_an_explicit_algorithm_search() -> None:
    options = cuda_provider_options(RuntimeConfig(device_id=1))
    assert options == {"device_id": 1, "cudnn_conv_algo_search": CUDNN_CONV_ALGO_SEARCH}
    assert CUDNN_CONV_ALGO_SEARCH in {"EXHAUSTIVE", "HEURISTIC"}


@pytest.mark.parametrize("max_batch, buckets, expected", [
    (32, (), (1, 32)),
    (1, (), (1,)),
    (32, (1, 2, 4, 8, 16, 32), (1, 2, 4, 8, 16, 32)),
    (8, (2, 4, 64), (1, 2, 4, 8)),  # a bucket no batch reaches is not run
])
def test_the_warm_up_plan(max_batch: int, buckets: tuple[int, ...], expected: tuple[int, ...]) -> None:
    assert warm_up_batch_sizes(max_batch, buckets, CUDA) == expected
    # The CPU has no algorithm search or capture to move out of live traffic: a lone request.
    assert warm_up_batch_sizes(max_batch, buckets, CPU) == (1,)


def test_the_agreement_tolerance_follows_provider_and_precision() -> None:
    assert agreement_tolerance(CPU, "fp32") < agreement_tolerance(CUDA, "fp32")
    assert agreement_tolerance(CUDA, "fp32") <= agreement_tolerance(CUDA, "fp16")
    assert agreement_tolerance(CPU, "fp16") == agreement_tolerance(CUDA, "fp16") == FP16_TOLERANCE
    assert agreement_tolerance("AzureExecutionProvider", "fp32") == agreement_tolerance(CPU, "fp32")


def test_on_cpu_the_report_says_what_does_not_apply(imported_repo: Path) -> None:
    served = _load(imported_repo / "mixed" / "1", graph="fused", cuda_graph_batch_sizes=(1, 2, 4))
    parameters = served.runtime_parameters
    assert parameters["precision"] == "fp32"
    assert parameters["cuda_graphs"] == ("off: they need the CUDA provider, this graph runs on "
                                         f"{CPU}")
    assert parameters["io_binding"] == f"not applicable: runs on {CPU}"
    assert parameters["cudnn_conv_algo_search"] == f"not applicable: runs on {CPU}"
    assert not any(graph.io_binding for graph in served.runtime.graphs.values())


@pytest.mark.parametrize("graph, runtime, expected", [
    ("members", {}, "off: cuda_graph_batch_sizes is empty"),
    ("members", {"cuda_graph_batch_sizes": (1, 2)},
     "off: CUDA graphs capture the fused graph only; the members serve"),
    ("fused", {}, "off: cuda_graph_batch_sizes is empty"),
])
def test_cuda_graphs_off_says_why(imported_repo: Path, graph: str, runtime: dict,
                                  expected: str) -> None:
    served = _load(imported_repo / "mixed" / "1", graph=graph, **runtime)
    assert served.runtime_parameters["cuda_graphs"] == expected


def test_every_instance_is_warmed_on_its_own_thread(imported_repo: Path) -> None:
    served = _load(imported_repo / "mixed" / "1", max_batch_size=8, graph="members", instances=2)
    assert [r.warmed_batch_sizes for r in served.instances] == [(1,), (1,)]  # CPU: a lone request
    assert served.runtime_parameters["warm_up_batch_sizes"] == "1"
    seen: list[tuple[int, str]] = []
    served.on_instance_threads(lambda r: seen.append((id(r), threading.current_thread().name)))
    assert [i for i, _ in seen] == [id(r) for r in served.instances]
    names = [name for _, name in seen]
    assert len(set(names)) == 2 and all(n.startswith("inference-mixed-") for n in names)


def test_a_batch_size_that_fails_the_warm_up_is_logged(imported_repo: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    version = imported_repo / "mixed" / "1"
    manifest = json.loads((version / "manifest.json").read_text())
    runtime = EnsembleRuntime([version / m["file"] for m in manifest["members"]], "input", "logits",
                              RuntimeConfig(device="cpu", intra_op_threads=1))
    example = np.zeros((1, *SHAPE), dtype=np.float32)
    wrong = np.zeros((1, SHAPE[0] + 1), dtype=np.float32)  # the model refuses this shape
    with caplog.at_level(logging.WARNING, logger="snapserve.server.engine.runtime"):
        runtime.warm_up(wrong, (2,))
        runtime.warm_up(example, (1, 3))
    assert "warm-up at batch 2 failed" in caplog.text
    assert runtime.warmed_batch_sizes == (1, 3)


def test_graph_auto_says_why_it_chose(imported_repo: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="snapserve.server.engine.runtime"):
        served = _load(imported_repo / "mixed" / "1", graph="auto")
    choice = served.runtime_parameters["graph_choice"]
    chosen = served.runtime.graph
    assert choice.startswith(f"{chosen}: ") and "x faster per example than" in choice
    assert f"<= tolerance {agreement_tolerance(CPU, 'fp32'):.3g}" in choice
    assert f"graph auto: serving {chosen} (" in caplog.text


def test_graph_auto_says_why_it_refused_the_fused_graph(tmp_path: Path) -> None:
    version = import_members(save(linear_members(3, seed=1), tmp_path / "a"), tmp_path / "repo", "m")
    other = fuse_members(linear_members(3, seed=2)).SerializeToString()  # other weights
    (version / "ensemble.onnx").write_bytes(other)
    manifest = json.loads((version / "manifest.json").read_text())
    manifest["ensemble"]["sha256"] = hashlib.sha256(other).hexdigest()
    (version / "manifest.json").write_text(json.dumps(manifest))
    served = _load(version, graph="auto")
    assert served.runtime.graph == "members"
    choice = served.runtime_parameters["graph_choice"]
    assert choice.startswith("members: the fused graph's probabilities differ from the members' by ")
    assert "> tolerance 0.0001" in choice
    assert served.runtime_parameters["graph_timing"].startswith("not timed: ")


def test_kserve_model_config_reports_the_options(imported_repo: Path) -> None:
    served = _load(imported_repo / "mixed" / "1", graph="fused")
    parameters = encode_model_config(served, RepositoryConfig()).parameters
    for key in ("precision", "cuda_graphs", "io_binding", "cudnn_conv_algo_search",
                "warm_up_batch_sizes"):
        assert parameters[key].string_value == served.runtime_parameters[key], key


def test_get_model_reports_the_options(imported_repo: Path) -> None:
    server = cpu_server(imported_repo, graph="fused", instances=1)
    try:
        with EnsembleClient(server.target, timeout=10) as client:
            runtime = client.get_model("mixed").runtime
    finally:
        server.stop()
    assert runtime["precision"] == "fp32"
    assert runtime["io_binding"] == f"not applicable: runs on {CPU}"
    assert runtime["cuda_graphs"] == "off: cuda_graph_batch_sizes is empty"
