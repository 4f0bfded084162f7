"""The usable cores (affinity and cgroup quota, from files in a temp dir) and the thread plan."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from snapserve.server.engine.cores import (LOOP_COST_S, ON_LOOP_MAX_S, PLAN_MARGIN,
                                           cgroup_cpu_limit, plan_threads, usable_cores)


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_v2_quota_on_the_process_cgroup_and_its_parents(tmp_path: Path) -> None:
    proc = tmp_path / "proc-cgroup"
    _write(proc, "0::/pods/pod1/box\n")
    root = tmp_path / "cg"
    _write(root / "pods" / "pod1" / "box" / "cpu.max", "max 100000\n")
    assert cgroup_cpu_limit(root, proc) is None
    _write(root / "pods" / "pod1" / "cpu.max", "150000 100000\n")  # a parent's limit applies
    _write(root / "pods" / "cpu.max", "400000 100000\n")
    assert cgroup_cpu_limit(root, proc) == pytest.approx(1.5)


def test_cgroup_v1_quota_in_the_cpu_hierarchy(tmp_path: Path) -> None:
    proc = tmp_path / "proc-cgroup"
    _write(proc, "4:memory:/docker/abc\n2:cpu,cpuacct:/docker/abc\n")
    hierarchy = tmp_path / "cg" / "cpu,cpuacct"
    _write(hierarchy / "docker" / "abc" / "cpu.cfs_quota_us", "200000\n")
    _write(hierarchy / "docker" / "abc" / "cpu.cfs_period_us", "100000\n")
    assert cgroup_cpu_limit(tmp_path / "cg", proc) == pytest.approx(2.0)
    _write(hierarchy / "docker" / "abc" / "cpu.cfs_quota_us", "-1\n")  # -1: no quota
    assert cgroup_cpu_limit(tmp_path / "cg", proc) is None


def test_usable_cores_is_the_affinity_cut_down_by_the_quota(tmp_path: Path) -> None:
    affinity = len(os.sched_getaffinity(0))
    proc = tmp_path / "proc-cgroup"
    _write(proc, "0::/\n")
    assert usable_cores(tmp_path / "none", proc) == affinity  # no cgroup files: affinity
    _write(tmp_path / "cg" / "cpu.max", "50000 100000\n")  # half a core: still 1
    assert usable_cores(tmp_path / "cg", proc) == 1
    _write(tmp_path / "cg" / "cpu.max", f"{100000 * (affinity + 4)} 100000\n")
    assert usable_cores(tmp_path / "cg", proc) == affinity  # a quota above the affinity
    assert usable_cores(tmp_path / "cg", tmp_path / "missing") == affinity


def test_plan_honours_explicit_settings() -> None:
    plan = plan_threads(3, 2, cores=8, seconds_per_example=None, lone_seconds=None)
    assert (plan.parallel, plan.threads, plan.lead_threads) == (3, 2, 0)
    assert plan.thread_counts == (2, 2, 2)


def test_plan_auto_cheap_model_runs_one_instance() -> None:
    plan = plan_threads(0, 0, cores=4, seconds_per_example=LOOP_COST_S / 10,
                        lone_seconds=(1e-3, 1e-3))  # more threads do not help a lone example
    assert plan.thread_counts == (1,)


def test_plan_auto_heavy_model_one_single_thread_instance_per_core_and_a_lead() -> None:
    plan = plan_threads(0, 0, cores=4, seconds_per_example=4e-3, lone_seconds=(8e-3, 3e-3))
    assert (plan.parallel, plan.threads, plan.lead_threads) == (4, 1, 4)
    assert plan.thread_counts == (4, 1, 1, 1, 1) and "lead" in plan.why
    # Given threads: as many instances as fit the cores, no lead.
    plan = plan_threads(0, 2, cores=4, seconds_per_example=4e-3, lone_seconds=(8e-3, 3e-3))
    assert plan.thread_counts == (2, 2)


def test_plan_auto_one_instance_with_every_core_when_only_the_lead_pays() -> None:
    plan = plan_threads(0, 0, cores=2, seconds_per_example=LOOP_COST_S / 10,
                        lone_seconds=(8e-3, 3e-3))
    assert plan.thread_counts == (2,) and plan.parallel == 1
    plan = plan_threads(1, 0, cores=1, seconds_per_example=None, lone_seconds=None)
    assert plan.thread_counts == (1,)


@pytest.mark.parametrize("instances, threads", [(0, 0), (0, 1), (2, 0)])
def test_auto_settings_load_a_valid_plan_that_answers(imported_repo: Path, instances: int,
                                                      threads: int) -> None:
    import asyncio

    import numpy as np

    from snapserve.server.engine.batcher import BatcherConfig
    from snapserve.server.engine.runtime import RuntimeConfig
    from snapserve.server.models.loading import load_version

    served = load_version(imported_repo / "mixed" / "1",
                          RuntimeConfig(device="cpu", instances=instances, intra_op_threads=threads),
                          BatcherConfig(max_batch_size=8))
    plan, cores = served.thread_plan, usable_cores()
    assert plan is not None and plan.parallel >= 1 and plan.threads >= 1
    assert len(served.instances) == len(plan.thread_counts)
    assert all(1 <= t <= max(cores, threads) for t in plan.thread_counts)
    if instances:
        assert plan.parallel == instances and plan.lead_threads == 0
    if threads:
        assert plan.threads == threads and plan.lead_threads == 0
    parameters = served.runtime_parameters
    assert parameters["intra_op_threads"] == ",".join(map(str, plan.thread_counts))
    assert parameters["instances"] == str(len(plan.thread_counts))
    assert parameters["threads_choice"] == plan.why
    assert served.batcher.config.max_concurrent_batches == plan.parallel

    async def answer() -> None:
        await served.start()
        try:
            x = np.zeros((1, *served.manifest.input.shape[1:]), served.manifest.input.dtype)
            results = await asyncio.gather(*(served.predict(x) for _ in range(6)))
            assert all(r.probabilities.shape[0] == 1 for r in results)
        finally:
            await served.close()

    asyncio.run(answer())


def test_plan_explicit_instances_get_no_lead() -> None:
    plan = plan_threads(2, 0, cores=4, seconds_per_example=4e-3, lone_seconds=(8e-3, 3e-3))
    assert plan.thread_counts == (1, 1)


def test_plan_computes_a_cheap_single_instance_on_the_event_loop() -> None:
    cheap = LOOP_COST_S / 10
    plan = plan_threads(0, 0, cores=2, seconds_per_example=cheap, lone_seconds=(2e-4, 3e-4),
                        batch_seconds=32 * cheap)
    assert plan.on_loop and plan.thread_counts == (1,) and "event loop" in plan.why
    assert plan.loop_examples == 32  # every lone request fits: the largest batch is 1.6 ms
    # an explicit instance count, a lead, or nothing measured: its own thread
    assert not plan_threads(1, 0, cores=2, seconds_per_example=None, lone_seconds=None,
                            batch_seconds=32 * cheap).on_loop
    assert not plan_threads(0, 0, cores=2, seconds_per_example=cheap, lone_seconds=(4e-4, 1e-4),
                            batch_seconds=32 * cheap).on_loop
    assert not plan_threads(0, 0, cores=2, seconds_per_example=cheap, lone_seconds=None).on_loop
    heavy = plan_threads(0, 0, cores=2, seconds_per_example=4e-3, lone_seconds=None,
                         batch_seconds=4e-3)
    assert not heavy.on_loop and heavy.parallel == 2


@pytest.mark.parametrize("largest_batch_s", [3.89e-3, 5.68e-3, 6.00e-3])
def test_a_lone_request_stays_on_the_loop_whatever_the_largest_batch_measured(
        largest_batch_s: float) -> None:
    # The digits model's largest batch (32) as three starts on one machine measured it, on
    # either side of ON_LOOP_MAX_S: its one-example requests compute on the loop at every start;
    # only how large a lone request may be and still hold the loop moves with the noise.
    per_example = largest_batch_s / 32
    plan = plan_threads(0, 0, cores=2, seconds_per_example=per_example,
                        lone_seconds=(3.7e-4, 3.9e-4), batch_seconds=largest_batch_s)
    assert plan.on_loop and plan.thread_counts == (1,)
    assert 1 < plan.loop_examples <= 32
    assert plan.loop_examples * per_example * (1 + PLAN_MARGIN) <= ON_LOOP_MAX_S
    assert (plan.loop_examples + 1) * per_example * (1 + PLAN_MARGIN) > ON_LOOP_MAX_S \
        or plan.loop_examples == 32


async def test_a_version_computing_on_the_loop_answers_and_says_so(model_repo: Path) -> None:
    import asyncio
    import threading

    import numpy as np

    from snapserve.server.engine.batcher import BatcherConfig
    from snapserve.server.engine.cores import ThreadPlan
    from snapserve.server.engine.runtime import RuntimeConfig
    from snapserve.server.models.ensemble import TAKEN_IN_OFF_LOOP, ServedEnsemble
    from snapserve.server.models.loading import load_version

    served = load_version(model_repo / "digits" / "1", RuntimeConfig(device="cpu"),
                          BatcherConfig(max_batch_size=8))
    assert served.thread_plan is not None and served.thread_plan.on_loop, served.thread_plan
    assert served.runtime_parameters["lone_request_compute"] == "event_loop"
    await served.start()
    try:
        x = np.random.default_rng(0).normal(size=(1, *served.manifest.input.shape[1:]))
        reference = served.runtime.scores(x.astype(np.float32))
        # Which thread computes each batch: the real runtime's scores, its caller noted.
        computed_on: list[str] = []
        runtime, scores = served.runtime, served.runtime.scores

        def noted(batch: np.ndarray) -> object:
            computed_on.append(threading.current_thread().name)
            return scores(batch)

        runtime.scores = noted  # type: ignore[method-assign]
        alone = await served.predict(x.astype(np.float32))  # on the loop
        assert computed_on == [threading.current_thread().name]
        # Requests taken in on the loop (grpc.aio, REST, here): batches of several go to the
        # instance's thread, so the loop takes the next requests in meanwhile.
        computed_on.clear()
        together = await asyncio.gather(*(served.predict(x.astype(np.float32)) for _ in range(5)))
        assert any(name.startswith("inference") for name in computed_on), computed_on
        # Taken in off the loop (the C++ front end's calls): every batch on the loop, sent as
        # it stands (the next requests queue in the front end meanwhile), several together.
        computed_on.clear()
        batches_before = served.batcher.stats.batches

        async def taken_in_off_the_loop() -> object:
            TAKEN_IN_OFF_LOOP.set(True)  # this task's only, as in the C++ front end's
            return await served.predict(x.astype(np.float32))

        off_loop = await asyncio.gather(*(taken_in_off_the_loop() for _ in range(5)))
        assert computed_on == [threading.current_thread().name] * len(computed_on), computed_on
        assert served.batcher.stats.batches - batches_before < 5  # some rode together
        for answer in [alone, *together, *off_loop]:
            np.testing.assert_allclose(answer.probabilities, reference.probabilities, rtol=1e-6)
        assert served.runtime_parameters["loop_max_examples"] == str(
            served.thread_plan.loop_examples)
    finally:
        await served.close()
    # A lone request larger than the plan's bound goes to the instance's thread.
    bounded = ServedEnsemble(served.manifest, served.path, runtime, BatcherConfig(max_batch_size=8),
                             thread_plan=ThreadPlan(1, 1, loop_examples=2))
    await bounded.start()
    try:
        for examples, thread in ((2, threading.current_thread().name), (3, "inference")):
            computed_on.clear()
            answer = await bounded.predict(np.repeat(x, examples, axis=0).astype(np.float32))
            assert answer.probabilities.shape[0] == examples
            assert computed_on and computed_on[0].startswith(thread), (examples, computed_on)
    finally:
        await bounded.close()


async def test_a_lone_call_computes_at_once_and_a_crowd_through_the_queue(model_repo: Path) -> None:
    import asyncio

    import numpy as np

    from snapserve.server.engine.batcher import BatcherConfig
    from snapserve.server.engine.runtime import RuntimeConfig
    from snapserve.server.models.ensemble import LONE_CALL, TAKEN_IN_OFF_LOOP
    from snapserve.server.models.loading import load_version

    served = load_version(model_repo / "digits" / "1", RuntimeConfig(device="cpu"),
                          BatcherConfig(max_batch_size=8))
    assert served.thread_plan is not None and served.thread_plan.on_loop, served.thread_plan
    await served.start()
    try:
        x = np.random.default_rng(1).normal(size=(1, *served.manifest.input.shape[1:]))
        x = x.astype(np.float32)
        reference = served.runtime.scores(x)
        calls = [1]  # the calls a front end holds now, as the C++ one counts them

        async def call() -> tuple[object, bool]:
            # As the C++ front end's call tasks set them.
            TAKEN_IN_OFF_LOOP.set(True)
            LONE_CALL.set(lambda: len(calls) <= 1)
            turned: list[int] = []
            asyncio.get_running_loop().call_soon(turned.append, 1)
            answer = await served.predict(x)
            return answer, bool(turned)

        batches = served.batcher.stats.batches
        alone, loop_turned = await call()
        assert not loop_turned  # computed in its own task, no turn of the loop
        assert served.batcher.stats.batches == batches + 1
        np.testing.assert_allclose(alone.probabilities, reference.probabilities, rtol=1e-6)
        # Not the only call: through the batcher's queue, as every batch of several.
        calls.append(2)
        (queued, loop_turned), = await asyncio.gather(call())
        assert loop_turned
        np.testing.assert_allclose(queued.probabilities, reference.probabilities, rtol=1e-6)
        # Larger than the plan lets compute on the loop: through the queue, lone or not.
        calls.pop()
        served._loop_examples = 0
        _, loop_turned = await call()
        assert loop_turned
        # A request taken in on the loop (REST, grpc.aio) sets no LONE_CALL: the queue.
        served._loop_examples = served.thread_plan.loop_examples
        batches = served.batcher.stats.batches
        turned: list[int] = []
        asyncio.get_running_loop().call_soon(turned.append, 1)
        await served.predict(x)
        assert turned and served.batcher.stats.batches == batches + 1
    finally:
        await served.close()
