"""The soak's slow-client phase (benchmarks/soak.py `run_slow_clients`): 120 slow REST connections
(idle, headers or a body a byte at a time, each re-opened when the server closes it) against a
cap of 32 + 8 reserved, for 15 s, while four kept-alive clients send valid requests and a prober
checks REST health on a fresh connection and gRPC health every 0.1 s.
Every health check answers within 0.5 s, RSS stays within 64 MiB of the start, and every valid
request is answered (200 with the reference's probabilities, or a refusal): nothing is lost."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.soak import (MODEL, SERVER_ARGS, Reference, ServerProcess, build_repository,
                             run_slow_clients, slow_args, slow_holds, slow_summary)
from tests.support.servers import PINNED_FLAGS


@pytest.mark.soak
def test_slow_clients_soak(tmp_path: Path) -> None:
    repo = build_repository(tmp_path / "models")
    reference = Reference(repo / MODEL / "1")
    with ServerProcess(repo, *PINNED_FLAGS, *SERVER_ARGS, *slow_args(), "--metrics-port",
                       "off") as server:
        slow = run_slow_clients(server, reference, duration_s=15)
    assert slow_holds(slow), (slow_summary(slow), slow.failures, slow.health_failures)
