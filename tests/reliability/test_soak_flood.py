"""The soak's stream-flood phase (benchmarks/soak.py `run_stream_flood`), longer and wider than
test_stream_backpressure.py: 128 streams on one connection write without reading for 20 s
(then every answer is read: under a minute in all).
Health answers within 0.5 s throughout, RSS stays within 128 MiB of the start, unary calls are
answered meanwhile, and every message taken is answered once the client reads."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.soak import (FLOOD_ARGS, FLOOD_STREAMS, SERVER_ARGS, ServerProcess, build_repository,
                             flood_holds, flood_summary, run_stream_flood)
from tests.support.servers import PINNED_FLAGS


@pytest.mark.soak
def test_stream_flood_soak(tmp_path: Path) -> None:
    repo = build_repository(tmp_path / "models")
    with ServerProcess(repo, *PINNED_FLAGS, *SERVER_ARGS, *FLOOD_ARGS) as server:
        flood = run_stream_flood(server, FLOOD_STREAMS, duration_s=20)
    assert flood_holds(flood), flood_summary(flood)
