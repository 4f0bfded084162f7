"""A short soak (benchmarks/soak.py at ~8 s): mixed valid, invalid, cancelled, short-deadline,
streaming and KServe requests at high concurrency against a server process. Nothing is lost,
and the server's memory does not run away. `python -m benchmarks.soak` runs the 60 s version."""

from __future__ import annotations

import signal
from pathlib import Path

from benchmarks.soak import MAX_BATCH, MODEL, Reference, ServerProcess, build_repository, run_soak
from tests.support.servers import PINNED_FLAGS


def test_short_soak_loses_nothing(tmp_path: Path) -> None:
    repo = build_repository(tmp_path / "models")
    reference = Reference(repo / MODEL / "1")
    # A small queue, so overload refusals (RESOURCE_EXHAUSTED) are part of the mix.
    with ServerProcess(repo, *PINNED_FLAGS, "--max-batch-size", str(MAX_BATCH), "--max-queue-size", "16",
                       "--grace-s", "3") as server:
        report = run_soak(server, reference, duration_s=8, concurrency=48)
        server.signal(signal.SIGTERM)
        assert server.wait() == 0
    tally = report.tally
    assert tally["lost"] == 0, tally["lost_examples"]
    assert tally["sent"] == tally["answered"] + tally["refused"] + tally["cancelled"]
    kinds = set(tally["by_kind"])
    assert kinds == {"valid", "invalid", "cancel", "deadline", "stream", "kserve", "kserve_invalid"}
    assert tally["answered"] > 0 and tally["refused"] > 0
    assert {"INVALID_ARGUMENT", "NOT_FOUND"} <= set(tally["codes"])
    # Memory: a leak of even a few KiB per request would show over thousands of requests.
    assert report.rss_end_mib - report.rss_start_mib < 64, report.rss_samples_mib
