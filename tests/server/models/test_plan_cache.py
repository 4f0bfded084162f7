"""The plan cache (models/plans.py): a version's measured graph and instances read back at a
later load without measuring, measured again whenever its key, its file or a setting says so,
and never a reason to refuse or to serve other than the plan says."""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import grpc
import numpy as np
import pytest

from snapserve.proto.snapserve.v1 import ensemble_pb2 as pb
from snapserve.proto.snapserve.v1 import ensemble_pb2_grpc as pb_grpc
from snapserve.server.engine import runtime as runtime_module
from snapserve.server.engine.batcher import BatcherConfig
from snapserve.server.engine.cores import ThreadPlan, usable_cores
from snapserve.server.engine.runtime import CPU, FUSED, MEMBERS, EnsembleRuntime, RuntimeConfig
from snapserve.server.models import loading
from snapserve.server.models.loading import load_version
from snapserve.server.models.manifest import read_manifest
from snapserve.server.models.plans import MAX_PLAN_FILE, PlanCache
from tests.support.models import SHAPE, conv_member, linear_members, save, slow_member
from tests.support.servers import serving

BATCH = BatcherConfig(max_batch_size=8)


@pytest.fixture(scope="module")
def fused_version(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A version with a fused graph (so the graph is measured too) of cheap members."""
    from snapserve.trainer.importer import import_members

    folder = tmp_path_factory.mktemp("fused")
    members = [conv_member(1, opset=17), conv_member(2, opset=18), *linear_members(1, seed=3)]
    return import_members(save(members, folder / "onnx"), folder / "repo", "tiny")


@pytest.fixture(scope="module")
def heavy_version(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Members of chained matrix products, no fused graph: they can be spread over threads."""
    from snapserve.trainer.importer import import_members

    folder = tmp_path_factory.mktemp("heavy")
    members = save([slow_member(64, 4) for _ in range(4)], folder / "onnx")
    return import_members(members, folder / "repo", "heavy", fuse=False)


def _config(cache: Path, **settings: Any) -> RuntimeConfig:
    return RuntimeConfig(device="cpu", plan_cache=cache, **settings)


def _timed_graph(cache: Path, **settings: Any) -> RuntimeConfig:
    """Instances and threads pinned: only the graphs are measured, in half the time."""
    return _config(cache, instances=1, intra_op_threads=1, **settings)


def _counting(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the loads that measure their instances (loading.plan_instances called)."""
    calls: list[int] = []
    measure = loading.plan_instances

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return measure(*args, **kwargs)

    monkeypatch.setattr(loading, "plan_instances", counted)
    return calls


def _forbid_measuring(monkeypatch: pytest.MonkeyPatch) -> None:
    def measured(*_: Any, **__: Any) -> Any:
        raise AssertionError("a cached plan was measured again")

    monkeypatch.setattr(loading, "plan_instances", measured)
    monkeypatch.setattr(runtime_module, "fastest_in_turn", measured)


def _plan_files(cache: Path) -> list[Path]:
    return sorted(cache.glob("*.json"))


def test_a_later_load_serves_the_cached_plan_without_measuring(
        fused_version: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "plans"
    first = load_version(fused_version, _config(cache), BATCH)
    assert first.graph_timing is not None and first.graph_timing.seconds  # the graphs were timed
    [file] = _plan_files(cache)
    assert first.plan_source == f"measured at load, kept in the plan cache ({file})"

    _forbid_measuring(monkeypatch)
    again = load_version(fused_version, _config(cache), BATCH)
    assert again.plan_source.startswith(f"the plan cache ({file}, measured ")
    assert again.thread_plan == first.thread_plan
    assert again.runtime.graph == first.runtime.graph
    assert [i.graph for i in again.instances] == [i.graph for i in first.instances]
    assert again.graph_timing == first.graph_timing  # as measured then, reported as such
    before, after = first.runtime_parameters, again.runtime_parameters
    for key in ("graph", "graph_choice", "intra_op_threads", "lead_instance", "threads_choice"):
        assert after[key] == before[key], key
    assert after["plan_source"] == again.plan_source
    x = np.random.default_rng(0).normal(size=(3, *SHAPE)).astype(np.float32)
    np.testing.assert_allclose(again.runtime.run(x), first.runtime.run(x), atol=1e-6)


def test_another_key_or_remeasure_plans_measures_again(
        fused_version: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "plans"
    calls = _counting(monkeypatch)
    load_version(fused_version, _timed_graph(cache), BATCH)
    load_version(fused_version, _timed_graph(cache), BatcherConfig(max_batch_size=16))
    load_version(fused_version, _timed_graph(cache, cores=1), BATCH)
    assert len(calls) == 3 and len(_plan_files(cache)) == 3  # one file per key
    load_version(fused_version, _timed_graph(cache), BATCH)
    assert len(calls) == 3  # read back
    remeasured = load_version(fused_version, _timed_graph(cache, remeasure_plans=True), BATCH)
    assert len(calls) == 4 and remeasured.plan_source.startswith("measured at load, kept in")
    # The same key as without the setting: its file now holds the new measurement.
    file = _cache_for(fused_version, _timed_graph(cache)).path
    assert json.loads(file.read_text())["plan"]["why"] == remeasured.thread_plan.why
    assert len(_plan_files(cache)) == 3


def test_a_changed_version_gets_its_own_plan(fused_version: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    version = tmp_path / "tiny" / "1"
    shutil.copytree(fused_version, version)
    cache = tmp_path / "plans"
    calls = _counting(monkeypatch)
    load_version(version, _timed_graph(cache), BATCH)
    manifest = json.loads((version / "manifest.json").read_text())
    manifest["temperature"] = 2.0  # the same graphs, other answers: another version
    (version / "manifest.json").write_text(json.dumps(manifest))
    load_version(version, _timed_graph(cache), BATCH)
    assert len(calls) == 2 and len(_plan_files(cache)) == 2


def _cache_for(version: Path, config: RuntimeConfig) -> PlanCache:
    cache = PlanCache.for_version(read_manifest(version), config, BATCH.max_batch_size,
                                  config.cores or usable_cores(), CPU)
    assert cache is not None
    return cache


def _valid_but(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        stored = json.loads(path.read_text())
        change(stored)
        path.write_text(json.dumps(stored))
    return write


@pytest.mark.parametrize("spoil, why", [
    (lambda path: path.write_bytes(b"\x00not json{"), "Invalid JSON"),
    (lambda path: path.write_text(""), "Invalid JSON"),
    (lambda path: path.write_bytes(b" " * (MAX_PLAN_FILE + 1)), f"larger than {MAX_PLAN_FILE}"),
    (_valid_but(lambda s: s["key"].update(onnxruntime="0.0")), "its key is not this version's"),
    (_valid_but(lambda s: s["plan"].update(parallel=0)), "greater than or equal to 1"),
    (_valid_but(lambda s: s["plan"].update(parallel=1000)), "does not fit"),
    (_valid_but(lambda s: s.update(graph="auto")), "is not fused or members"),
    (_valid_but(lambda s: s.update(extra=1)), "Extra inputs"),
    (_valid_but(lambda s: s["plan"].update(loop_examples=9)), "batches of 8"),
    (lambda path: (path.unlink(), os.mkfifo(path)), "not a regular file"),
])
def test_a_plan_file_that_makes_no_sense_is_measured_over(
        fused_version: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture, spoil: Callable[[Path], None], why: str) -> None:
    config = _timed_graph(tmp_path / "plans")
    cache = _cache_for(fused_version, config)
    assert cache.write(FUSED, None, ThreadPlan(1, 1, why="as configured"))
    assert cache.read() is not None
    spoil(cache.path)
    calls = _counting(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="snapserve.server.models.plans"):
        served = load_version(fused_version, config, BATCH)
    assert len(calls) == 1 and served.plan_source.startswith("measured at load, kept in")
    [warning] = [r.getMessage() for r in caplog.records if r.name.endswith("plans")]
    assert f"ignoring {cache.path}" in warning and why in warning
    assert "measuring the plan again" in warning
    assert cache.read() is not None  # written anew, whole


def test_an_unwritable_cache_logs_and_serves_the_measured_plan(
        fused_version: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cache = tmp_path / "not-a-folder"
    cache.write_text("a file where the folder would be")
    with caplog.at_level(logging.WARNING, logger="snapserve.server.models.plans"):
        served = load_version(fused_version, _config(cache), BATCH)
    assert served.plan_source == "measured at load"
    [warning] = [r.getMessage() for r in caplog.records]  # said once: no read of a non-folder
    assert f"cannot write {cache}" in warning
    x = np.zeros((1, *SHAPE), np.float32)
    assert served.runtime.scores(x).probabilities.shape == (1, 5)
    assert [p.name for p in tmp_path.iterdir()] == ["not-a-folder"]  # nothing left aside


def test_no_file_where_nothing_is_measured_or_the_cache_is_off(
        heavy_version: Path, tmp_path: Path) -> None:
    cache = tmp_path / "plans"
    # One graph (no fused file), instances and threads as configured: nothing to keep.
    pinned = load_version(heavy_version, _timed_graph(cache), BATCH)
    assert pinned.plan_source == "measured at load" and not cache.exists()
    off = load_version(heavy_version, RuntimeConfig(device="cpu"), BATCH)  # off by default in code
    assert off.plan_source == "measured at load"
    assert PlanCache.for_version(read_manifest(heavy_version), _config(cache), 8, 2,
                                 "CUDAExecutionProvider") is None  # a GPU is not in the key


@pytest.mark.skipif(usable_cores() < 2, reason="a lead instance needs two usable cores")
@pytest.mark.parametrize("plan, lead, spread_first", [
    (ThreadPlan(2, 1, lead_threads=2, lead_spread=True), "spread", False),
    (ThreadPlan(2, 1, lead_threads=2), "intra-op", False),
    (ThreadPlan(1, 2, lead_spread=True), None, True),  # the lead alone, its members spread
    (ThreadPlan(1, 2), None, False),                    # the lead alone, intra-op threads
    (ThreadPlan(1, 1, loop_examples=8), None, False),
])
def test_a_cached_plan_opens_the_instances_it_names(
        heavy_version: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, plan: ThreadPlan,
        lead: str | None, spread_first: bool) -> None:
    config = _config(tmp_path / "plans", cores=2)
    cached = replace(plan, why="planted by the test")
    assert _cache_for(heavy_version, config).write(MEMBERS, None, cached)
    _forbid_measuring(monkeypatch)
    served = load_version(heavy_version, config, BATCH)
    assert served.thread_plan == cached and served.plan_source.startswith("the plan cache")
    assert len(served.instances) == plan.parallel + (1 if lead else 0)
    expected = ([lead == "spread"] if lead else []) + [spread_first] * plan.parallel
    assert [i.spread_threads > 1 for i in served.instances] == expected
    assert served.runtime_parameters["lead_instance"] == plan.lead
    x = np.random.default_rng(1).normal(size=(1, 64, 64)).astype(np.float32)
    alone = EnsembleRuntime(sorted((heavy_version / "members").glob("*.onnx")), "input",
                            "logits", RuntimeConfig(device="cpu", intra_op_threads=1)).run(x)
    for instance in served.instances:
        np.testing.assert_allclose(instance.run(x), alone, atol=1e-6)
    for instance in served.instances:
        instance.close()


def test_a_cached_spread_that_cannot_spread_here_is_measured_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from snapserve.trainer.importer import import_members

    # One member: nothing to spread. A plan file that says otherwise (an edit, or another
    # build's rule) is measured over, never served as something it is not.
    version = import_members(save([slow_member(64, 4)], tmp_path / "onnx"), tmp_path / "repo",
                             "single", fuse=False)
    config = _config(tmp_path / "plans", cores=2)
    assert _cache_for(version, config).write(
        MEMBERS, None, ThreadPlan(2, 1, lead_threads=2, lead_spread=True, why="planted"))
    calls = _counting(monkeypatch)
    with caplog.at_level(logging.WARNING):
        served = load_version(version, config, BATCH)
    assert len(calls) == 1 and served.thread_plan is not None
    assert not served.thread_plan.lead_spread
    assert any("cannot be spread here" in r.getMessage() for r in caplog.records)
    assert served.plan_source.startswith("measured at load, kept in")


async def test_a_restarted_server_says_its_plan_came_from_the_cache(fused_version: Path,
                                                                    tmp_path: Path) -> None:
    repo = tmp_path / "models"
    shutil.copytree(fused_version, repo / "tiny" / "1")
    runtime = RuntimeConfig(device="cpu", plan_cache=tmp_path / "plans")
    sources = []
    for _ in range(2):  # a start that measures, then one that reads back
        async with serving(repo, runtime=runtime) as server:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                model = await pb_grpc.EnsembleServiceStub(channel).GetModel(
                    pb.GetModelRequest(model="tiny"))
        sources.append(dict(model.runtime))
    [file] = _plan_files(tmp_path / "plans")
    assert sources[0]["plan_source"] == f"measured at load, kept in the plan cache ({file})"
    assert sources[1]["plan_source"].startswith(f"the plan cache ({file}, measured ")
    for key in ("graph", "intra_op_threads", "lead_instance", "threads_choice", "graph_choice"):
        assert sources[1][key] == sources[0][key], key


def test_the_folder_keeps_the_most_recently_used_plans(fused_version: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from snapserve.server.models import plans

    monkeypatch.setattr(plans, "MAX_PLAN_FILES", 3)
    folder = tmp_path / "plans"
    folder.mkdir()
    old = [folder / f"other-{i}-0.json" for i in range(4)]
    for age, path in enumerate(old):  # other versions' plans, older and older
        path.write_text("{}")
        os.utime(path, (1e9 - age, 1e9 - age))
    left_aside = folder / ".plan-dead.tmp"
    left_aside.write_text("{")
    os.utime(left_aside, (1e9, 1e9))
    writing = folder / ".plan-live.tmp"  # another server's write in progress
    writing.write_text("{")
    cache = _cache_for(fused_version, _timed_graph(folder))
    assert cache.write(FUSED, None, ThreadPlan(1, 1, why="as configured"))
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [cache.path.name, old[0].name, old[1].name, writing.name])
    os.utime(cache.path, (5e8, 5e8))  # written long ago, the oldest of the folder...
    assert cache.read() is not None  # ...and read now: the most recently used but one
    second = _cache_for(fused_version, _timed_graph(folder, cores=1))
    assert second.write(FUSED, None, ThreadPlan(1, 1, why="as configured"))
    assert {p.name for p in folder.glob("*.json")} == {second.path.name, cache.path.name,
                                                       old[0].name}
