"""instances x intra_op_threads is capped by what the machine can run: past MAX_THREADS_PER_CORE
per usable core the version is refused at load, naming the keys (`intra_op_threads: 500` started
2,008 threads and slowed the other models 2-3x); the other models serve on."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from snapserve.server.engine.cores import MAX_THREADS_PER_CORE, check_thread_budget
from snapserve.server.errors import ModelSettingsError
from tests.support.servers import pinned_runtime, serving


def test_the_budget_is_per_usable_core() -> None:
    check_thread_budget(2, 2 * MAX_THREADS_PER_CORE, cores=4)  # 16 on 4 cores: allowed
    check_thread_budget(0, 0, cores=1)  # auto fits by construction
    with pytest.raises(ModelSettingsError, match=r"instances \(1\) x intra_op_threads \(500\) = "
                                                 r"500 .* \(2 cores: 8\); lower instances"):
        check_thread_budget(1, 500, cores=2)
    with pytest.raises(ModelSettingsError, match=r"instances \(9\) x intra_op_threads \(auto\)"):
        check_thread_budget(9, 0, cores=2)


async def test_a_model_asking_for_too_many_threads_is_refused_and_the_others_serve(
        model_repo: Path) -> None:
    (model_repo / "tiny" / "model-settings.yaml").write_text("intra_op_threads: 500\n")
    async with serving(model_repo, runtime=pinned_runtime(cores=2)) as running:
        for _ in range(100):
            if "digits" in running.registry:
                break
            await asyncio.sleep(0.05)
        assert "digits" in running.registry and "tiny" not in running.registry
        index = {e.name: e for e in await running.manager.index()}
    assert "intra_op_threads (500)" in index["tiny"].reason, index["tiny"]
