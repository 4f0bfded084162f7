"""server/process/heap.py: the start-up heap is frozen out of the collector's way, and a retired model
version is still freed (a frozen object is never collected)."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

from snapserve.server.models.policy import RepositoryConfig
from tests.support.calls import digits_input, native_predict, native_stub
from tests.support.servers import serving


async def test_a_serving_server_has_its_heap_frozen_and_thaws_it_when_it_stops(
        model_repo: Path) -> None:
    async with serving(model_repo, freeze_heap=True) as running:
        assert gc.get_freeze_count() > 10_000  # modules and versions, not a handful
        async with native_stub(running) as stub:
            scores = await native_predict(stub, digits_input(2))
            assert scores["probabilities"].shape == (2, 5)
    assert gc.get_freeze_count() == 0


async def test_an_embedded_server_can_leave_the_heap_alone(model_repo: Path) -> None:
    async with serving(model_repo, freeze_heap=False):
        assert gc.get_freeze_count() == 0


async def test_an_unloaded_version_frozen_at_start_up_is_freed(model_repo: Path) -> None:
    """The version and its batcher refer to each other: a cycle only the collector frees, and
    it was frozen with the rest at start-up."""
    control = RepositoryConfig(allow_repository_control=True)
    async with serving(model_repo, repository=control, freeze_heap=True) as running:
        version = weakref.ref(running.registry.get("digits", 1))
        assert gc.get_freeze_count() > 0
        await running.manager.unload_model("digits")
        assert "digits" not in running.registry
        assert version() is None, gc.get_referrers(version())
        assert gc.get_freeze_count() > 0  # the rest frozen again
