"""The fused ensemble graph (trainer/fuse.py) against the separate path, and how the server
verifies, checks and chooses it. No timings are asserted."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from snapserve.client import EnsembleClient
from snapserve.server.engine.batcher import BatcherConfig
from snapserve.server.engine.runtime import RuntimeConfig
from snapserve.server.errors import ModelLoadError
from snapserve.server.models.loading import load_version
from snapserve.proto.scores import EnsembleScores, ensemble_scores, softmax
from snapserve.trainer.fuse import (FP16_TOLERANCE, FUSED_OUTPUTS, TEMPERATURE_INPUT, check_fused,
                          fuse_members, member_to_fp16)
from snapserve.trainer.importer import import_members

from tests.support.models import CLASSES, SHAPE, conv_member, linear_members, save
from tests.support.servers import cpu_server, pinned_runtime

INTEGER_SCORES = {"top_class", "member_top_class"}


def separate_path(files: list[Path], x: np.ndarray, temperature: float) -> EnsembleScores:
    """What the server computes without the fused graph: every member, then numpy."""
    logits = [ort.InferenceSession(str(f), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
              for f in files]
    return ensemble_scores(softmax(np.stack(logits, axis=1).astype(np.float32)), temperature)


def fused_outputs(model: onnx.ModelProto, x: np.ndarray, temperature: float | None) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feed = {"input": x}
    if temperature is not None:
        feed[TEMPERATURE_INPUT] = np.array(temperature, dtype=np.float32)
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feed)))


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.5])
@pytest.mark.parametrize("batch", [1, 7, 33])
def test_fused_graph_equals_the_separate_path(member_files: list[Path], temperature: float,
                                              batch: int) -> None:
    fused = fuse_members([onnx.load(str(f)) for f in member_files], temperature=temperature)
    x = np.random.default_rng(batch).normal(0, 2, (batch, *SHAPE)).astype(np.float32)
    got = fused_outputs(fused, x, temperature)
    expected = separate_path(member_files, x, temperature)
    assert sorted(got) == sorted(FUSED_OUTPUTS)
    for name in FUSED_OUTPUTS:
        want = getattr(expected, name)
        assert got[name].shape == want.shape and got[name].dtype == want.dtype, name
        if name in INTEGER_SCORES:
            np.testing.assert_array_equal(got[name], want, err_msg=name)
        else:
            np.testing.assert_allclose(got[name], want, rtol=1e-5, atol=2e-6, err_msg=name)
    assert np.all(got["mutual_information"] >= 0) and np.all(got["member_kl"] >= 0)


def test_the_temperature_is_a_default_the_caller_may_override(member_files: list[Path]) -> None:
    models = [onnx.load(str(f)) for f in member_files]
    x = np.random.default_rng(0).normal(0, 2, (4, *SHAPE)).astype(np.float32)
    baked = fused_outputs(fuse_members(models, temperature=2.0), x, None)  # not fed: the default
    fed = fused_outputs(fuse_members(models, temperature=1.0), x, 2.0)
    np.testing.assert_allclose(baked["probabilities"], fed["probabilities"], rtol=1e-6)
    np.testing.assert_allclose(baked["probabilities"], separate_path(member_files, x, 2.0).probabilities,
                               rtol=1e-5, atol=2e-6)


def test_members_that_agree_have_zero_disagreement(tmp_path: Path) -> None:
    same = save([conv_member(4)] * 3, tmp_path)
    out = fused_outputs(fuse_members([onnx.load(str(f)) for f in same]),
                        np.random.default_rng(1).normal(0, 1, (5, *SHAPE)).astype(np.float32), 1.0)
    np.testing.assert_allclose(out["mutual_information"], 0, atol=1e-6)
    np.testing.assert_allclose(out["member_kl"], 0, atol=1e-6)
    np.testing.assert_array_equal(out["vote_disagreement"], 0)


def test_fp16_members_stay_within_the_parity_tolerance(member_files: list[Path]) -> None:
    spec = {"name": "input", "dtype": "float32", "shape": [-1, *SHAPE]}
    half = fuse_members([member_to_fp16(onnx.load(str(f))) for f in member_files])
    diff = check_fused(half, member_files, spec, "logits", 1.0, tolerance=FP16_TOLERANCE, examples=64)
    assert 0 < diff <= FP16_TOLERANCE  # FP16 rounds, so not exactly equal, but close


def test_export_records_the_fused_graph_in_the_manifest(imported_repo: Path) -> None:
    version = imported_repo / "mixed" / "1"
    manifest = json.loads((version / "manifest.json").read_text())
    entry = manifest["ensemble"]
    assert entry["file"] == "ensemble.onnx" and entry["outputs"] == list(FUSED_OUTPUTS)
    import hashlib
    assert hashlib.sha256((version / "ensemble.onnx").read_bytes()).hexdigest() == entry["sha256"]
    assert entry["max_abs_diff"] < 1e-4


def _load(version: Path, **runtime: object):  # type: ignore[no-untyped-def]
    return load_version(version, pinned_runtime(device="cpu", **runtime),
                        BatcherConfig(max_batch_size=8))


def test_an_altered_fused_graph_refuses_the_version(imported_repo: Path) -> None:
    version = imported_repo / "mixed" / "1"
    data = bytearray((version / "ensemble.onnx").read_bytes())
    data[-1] ^= 1
    (version / "ensemble.onnx").write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match="ensemble.file 'ensemble.onnx' has sha256"):
        _load(version)


def test_a_missing_fused_graph_refuses_the_version(imported_repo: Path) -> None:
    version = imported_repo / "mixed" / "1"
    (version / "ensemble.onnx").unlink()
    with pytest.raises(ModelLoadError, match="ensemble.onnx' is missing"):
        _load(version)


def test_a_fused_graph_of_other_members_is_not_served(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Right checksum, wrong graph (say, written for other weights): the load-time comparison
    catches it and the members serve."""
    repo = tmp_path / "repo"
    version = import_members(save(linear_members(3, seed=1), tmp_path / "a"), repo, "m")
    other = fuse_members(linear_members(3, seed=2)).SerializeToString()
    (version / "ensemble.onnx").write_bytes(other)
    manifest = json.loads((version / "manifest.json").read_text())
    import hashlib
    manifest["ensemble"]["sha256"] = hashlib.sha256(other).hexdigest()
    (version / "manifest.json").write_text(json.dumps(manifest))
    with caplog.at_level(logging.ERROR, logger="snapserve.server.engine.runtime"):
        served = _load(version)
    assert served.runtime.graph == "members"
    assert "differ from the members'" in caplog.text


@pytest.mark.parametrize("graph", ["auto", "fused", "members"])
def test_the_chosen_graph_is_used_and_reported(imported_repo: Path, graph: str) -> None:
    served = _load(imported_repo / "mixed" / "1", graph=graph, instances=2)
    assert len(served.instances) == 2
    assert {r.graph for r in served.instances} == {served.runtime.graph}
    if graph != "auto":
        assert served.runtime.graph == graph
    else:
        assert served.graph_timing is not None and "graph_timing" in served.runtime_parameters
    assert served.runtime_parameters["graph"] == served.runtime.graph
    assert served.runtime_parameters["instances"] == "2"
    # Only the chosen graph's sessions stay loaded.
    assert list(served.runtime.graphs) == [served.runtime.graph]


def test_graph_fused_without_a_fused_file_serves_the_members(tmp_path: Path) -> None:
    version = import_members(save(linear_members(2), tmp_path / "a"), tmp_path / "repo", "m", fuse=False)
    assert not (version / "ensemble.onnx").exists()
    assert "ensemble" not in json.loads((version / "manifest.json").read_text())
    assert _load(version, graph="fused").runtime.graph == "members"


def test_fused_and_members_serve_the_same_answers(imported_repo: Path) -> None:
    x = np.random.default_rng(3).normal(0, 2, (6, *SHAPE)).astype(np.float32)
    answers = {}
    for graph in ("fused", "members"):
        server = cpu_server(imported_repo, graph=graph, instances=2)
        try:
            with EnsembleClient(server.target, timeout=10) as client:
                answers[graph] = client.predict("mixed", x, member_probabilities=True)
                # Native metadata says which graph serves the version.
                runtime = client.get_model("mixed").runtime
                assert runtime["graph"] == graph and runtime["instances"] == "2"
        finally:
            server.stop()
    fused, members = answers["fused"], answers["members"]
    for name in ("probabilities", "predictive_entropy", "expected_entropy", "mutual_information",
                 "vote_disagreement", "member_kl", "member_probabilities"):
        np.testing.assert_allclose(getattr(fused, name), getattr(members, name), rtol=1e-5,
                                   atol=2e-6, err_msg=name)
    np.testing.assert_array_equal(fused.top_class, members.top_class)
    np.testing.assert_array_equal(fused.member_top_class, members.member_top_class)
    assert fused.member_kl.shape == (6, 3) and fused.probabilities.shape == (6, CLASSES)


@pytest.mark.skipif("CUDAExecutionProvider" not in ort.get_available_providers(),
                    reason="needs onnxruntime-gpu and a GPU (the CUDA paths are not run in CI)")
def test_cuda_paths_match_the_cpu(imported_repo: Path) -> None:  # pragma: no cover - GPU only
    from snapserve.server.engine.runtime import EnsembleRuntime

    version = imported_repo / "mixed" / "1"
    manifest = json.loads((version / "manifest.json").read_text())
    files = [version / m["file"] for m in manifest["members"]]
    x = np.random.default_rng(0).normal(0, 2, (5, *SHAPE)).astype(np.float32)
    cpu = EnsembleRuntime(files, "input", "logits", RuntimeConfig(device="cpu"),
                          fused_path=version / "ensemble.onnx", graphs=("fused",)).scores(x)
    for config, graphs in [(RuntimeConfig(device="cuda"), ("members",)),
                           (RuntimeConfig(device="cuda"), ("fused",)),
                           (RuntimeConfig(device="cuda", cuda_graph_batch_sizes=(1, 2, 8)), ("fused",))]:
        gpu = EnsembleRuntime(files, "input", "logits", config, fused_path=version / "ensemble.onnx",
                              graphs=graphs)
        for _ in range(3):  # the first runs capture the CUDA graph, later ones replay it
            got = gpu.scores(x)
        np.testing.assert_allclose(got.probabilities, cpu.probabilities, rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(got.top_class, cpu.top_class)


def test_trainer_train_writes_the_fused_graph(tmp_path: Path) -> None:
    from snapserve.trainer.cli import main as trainer_main

    assert trainer_main(["-q", "train", "--dataset", "digits", "--arch", "mlp", "--epochs", "2",
                         "--members", "2", "--out", str(tmp_path), "--name", "d"]) == 0
    version = tmp_path / "d" / "1"
    manifest = json.loads((version / "manifest.json").read_text())
    assert manifest["ensemble"]["file"] == "ensemble.onnx"
    served = _load(version, graph="fused")  # checksum verified, and equal to the members at load
    assert served.runtime.graph == "fused"
    x = np.random.default_rng(0).normal(0, 1, (3, *manifest["input"]["shape"][1:])).astype(np.float32)
    files = [version / m["file"] for m in manifest["members"]]
    np.testing.assert_allclose(served.runtime.scores(x).probabilities,
                               separate_path(files, x, manifest["temperature"]).probabilities,
                               rtol=1e-5, atol=2e-6)


def test_precision_fp16_serves_the_fp16_graph(tmp_path: Path, member_files: list[Path]) -> None:
    version = import_members(member_files, tmp_path / "repo", "half", fp16=True)
    fp16 = json.loads((version / "manifest.json").read_text())["ensemble"]["fp16"]
    assert fp16["file"] == "ensemble-fp16.onnx" and fp16["max_abs_diff"] <= fp16["tolerance"]
    served = _load(version, graph="fused", precision="fp16")
    x = np.random.default_rng(0).normal(0, 2, (4, *SHAPE)).astype(np.float32)
    np.testing.assert_allclose(served.runtime.scores(x).probabilities,
                               separate_path(member_files, x, 1.0).probabilities, atol=FP16_TOLERANCE)


def test_the_table_drives_the_fused_outputs(member_files: list[Path]) -> None:
    """The fused graph outputs every score that has nodes, in the table's order, with the
    table's dtype and rank; a score without nodes (members_evaluated: every member runs in the
    fused graph) is left to the server, which completes it from the table."""
    from snapserve.proto.scores import SCORE_NAMES, SCORE_SPECS
    from snapserve.trainer.fuse import SCORE_NODES

    assert FUSED_OUTPUTS == tuple(n for n in SCORE_NAMES if n in SCORE_NODES)
    assert set(SCORE_NAMES) - set(FUSED_OUTPUTS) == {n for n in SCORE_NAMES
                                                     if not SCORE_SPECS[n].fused}
    fused = fuse_members([onnx.load(str(f)) for f in member_files])
    session = ort.InferenceSession(fused.SerializeToString(), providers=["CPUExecutionProvider"])
    outputs = session.get_outputs()
    assert [o.name for o in outputs] == list(FUSED_OUTPUTS)
    for out in outputs:
        spec = SCORE_SPECS[out.name]
        assert out.type == f"tensor({'float' if spec.dtype == np.float32 else 'int64'})", out.name
        assert len(out.shape) == len(spec.dims), out.name


def _without_nodes(monkeypatch: pytest.MonkeyPatch, score: str) -> None:
    """As if `score` were added to the table after the fused graph's nodes were written."""
    from snapserve.trainer import fuse

    monkeypatch.delitem(fuse.SCORE_NODES, score)


def test_a_score_without_nodes_is_left_out_of_the_fused_graph(
        member_files: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
    _without_nodes(monkeypatch, "vote_disagreement")
    fused = fuse_members([onnx.load(str(f)) for f in member_files])
    x = np.random.default_rng(2).normal(0, 2, (5, *SHAPE)).astype(np.float32)
    got = fused_outputs(fused, x, 1.0)
    assert list(got) == [n for n in FUSED_OUTPUTS if n != "vote_disagreement"]
    np.testing.assert_allclose(got["mutual_information"],
                               separate_path(member_files, x, 1.0).mutual_information,
                               rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("score", ["vote_disagreement", "member_kl", "top_class"])
def test_a_fused_graph_that_predates_a_score_serves_it_from_its_member_probabilities(
        tmp_path: Path, member_files: list[Path], monkeypatch: pytest.MonkeyPatch,
        score: str) -> None:
    """A version exported before `score` existed still serves with its fused graph; the score
    comes from the graph's member probabilities, equal to the members' numpy score."""
    _without_nodes(monkeypatch, score)
    version = import_members(member_files, tmp_path / "repo", "old", temperature=1.5)
    monkeypatch.undo()  # the server of today, which knows the score
    manifest = json.loads((version / "manifest.json").read_text())
    assert score not in manifest["ensemble"]["outputs"]
    assert score not in [o.name for o in onnx.load(str(version / "ensemble.onnx")).graph.output]
    served = _load(version, graph="fused")
    assert served.runtime.graph == "fused"
    x = np.random.default_rng(4).normal(0, 2, (6, *SHAPE)).astype(np.float32)
    got, want = served.runtime.scores(x), separate_path(member_files, x, 1.5)
    for name in FUSED_OUTPUTS:
        if name in INTEGER_SCORES:
            np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)
        else:
            np.testing.assert_allclose(getattr(got, name), getattr(want, name), rtol=1e-5,
                                       atol=2e-6, err_msg=name)
