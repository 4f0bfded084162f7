"""The automatic plan is stable: the same model on the same machine gets the same graph,
instances x threads and on-loop choice at every load, quiet or busy (engine/cores.py,
PLAN_MARGIN); and the margin itself, on ratios either side of it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from snapserve.server.engine.cores import (LEAD_MARGIN, LOOP_COST_S, PLAN_MARGIN, clearly_better,
                                           plan_threads, usable_cores)
from tests.support.models import conv_member, linear_members, save, slow_member

LOADS = 5  # per condition, quiet and busy


def test_the_simpler_plan_stays_unless_the_other_is_past_the_margin() -> None:
    simpler = 1.0
    assert not clearly_better(simpler, simpler)
    assert not clearly_better(simpler, simpler / (1 + PLAN_MARGIN * 0.95))  # just inside
    assert clearly_better(simpler, simpler / (1 + PLAN_MARGIN * 1.05))  # just past
    assert not clearly_better(simpler, simpler * 1.5)  # the other is slower


@pytest.mark.parametrize("gain, lead", [(1.10, False), (1 + PLAN_MARGIN * 1.05, False),
                                        (1 + LEAD_MARGIN * 0.95, False),
                                        (1 + LEAD_MARGIN * 1.05, True), (2.0, True)])
def test_a_lead_instance_only_when_clearly_faster_on_a_lone_example(gain: float, lead: bool) -> None:
    one = 4e-3
    plan = plan_threads(0, 0, cores=2, seconds_per_example=4e-3, lone_seconds=(one, one / gain))
    assert bool(plan.lead_threads) is lead, plan.why
    assert f"kept when over {1 + LEAD_MARGIN:.2f} x faster" in plan.why


@pytest.mark.parametrize("compute, parallel", [(1.0, 1), (1 + PLAN_MARGIN * 0.95, 1),
                                               (1 + PLAN_MARGIN * 1.05, 2), (4.0, 2)])
def test_parallel_instances_only_when_compute_clearly_passes_the_handling(compute: float,
                                                                          parallel: int) -> None:
    plan = plan_threads(0, 0, cores=2, seconds_per_example=compute * LOOP_COST_S,
                        lone_seconds=(1e-3, 1e-3))
    assert plan.parallel == parallel, plan.why
    assert f"{1 + PLAN_MARGIN:.2f} x {1e3 * LOOP_COST_S:.2f} ms of request handling" in plan.why


@pytest.fixture
def busy_cpu() -> Iterator[None]:
    """One process spinning per usable core, for as long as the test runs."""
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
               for _ in range(usable_cores())]
    try:
        yield
    finally:
        for burner in burners:
            burner.kill()
            burner.wait()


def _version(tmp_path: Path, kind: str) -> Path:
    from snapserve.trainer.importer import import_members

    if kind == "compute-bound":
        # Two members of chained matrix products: the fused graph and the members take about
        # the same time (a near-tie that noise decided), and more threads barely help a lone
        # example (another near-tie); the compute is plainly above the handling. A lone
        # example takes about 2 ms of CPU, twice the line from which the members spread over
        # threads (cores.SPREAD_MIN_S): 20 products took 0.97-1.04 ms on this machine, and
        # the plan flipped with that line.
        members = [slow_member(128, 40), slow_member(128, 40)]
    else:  # tiny: the fused graph plainly faster, a lone request on the event loop
        members = [conv_member(1, opset=17), conv_member(2, opset=18), *linear_members(1, seed=3)]
    return import_members(save(members, tmp_path / "onnx"), tmp_path / "repo", kind)


def _plans(version: Path) -> list[tuple[str, tuple[int, ...], bool, str]]:
    from snapserve.server.engine.batcher import BatcherConfig
    from snapserve.server.engine.runtime import RuntimeConfig
    from snapserve.server.models.loading import load_version

    plans = []
    for _ in range(LOADS):
        served = load_version(version, RuntimeConfig(device="cpu"), BatcherConfig(max_batch_size=8))
        plan = served.thread_plan
        assert plan is not None
        why = served.graph_timing.why if served.graph_timing is not None else ""
        plans.append((served.runtime.graph, plan.thread_counts, plan.on_loop,
                      f"{why} | {plan.why}"))
    return plans


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["compute-bound", "tiny"])
def test_the_same_model_gets_the_same_plan_at_every_load(tmp_path: Path, kind: str,
                                                         request: pytest.FixtureRequest) -> None:
    version = _version(tmp_path, kind)
    quiet = _plans(version)
    request.getfixturevalue("busy_cpu")
    busy = _plans(version)
    # Not the lead's kind: on the compute-bound model the spread and intra-op's lead are near a
    # tie in wall time (docs/performance.md, "A stable plan"), and busy processes can inflate
    # intra-op's measured gain past the spread's prediction in a load; both take the same
    # threads, which is what is compared.
    chosen = {plan[:3] for plan in quiet + busy}
    # The reasons carry the numbers measured at each load: shown when the plans differ.
    assert len(chosen) == 1, "\n".join(plan[3] for plan in quiet + busy)
