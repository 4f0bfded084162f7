"""Streams that write without reading answers cannot take the server's memory: a stream reads
its next message only when it has room (its window, and the server-wide `max_stream_requests`),
and each call's HTTP/2 window is fixed (`flow_window_kib`), so the client's writes wait. A fresh
unary Predict on another connection is answered meanwhile, and every message taken is answered."""

from __future__ import annotations

from pathlib import Path

from benchmarks.soak import ServerProcess, build_repository, run_stream_flood
from tests.support.servers import PINNED_FLAGS


def test_a_stream_flood_keeps_memory_bounded_and_unary_calls_answered(tmp_path: Path) -> None:
    repo = build_repository(tmp_path / "models")
    with ServerProcess(repo, *PINNED_FLAGS) as server:
        report = run_stream_flood(server, streams=64, duration_s=4, batch=16)
    # Before: the server read every message it was sent (gRPC's adaptive window grew to
    # megabytes per call) and took ~300 MiB in 4 s, rising; now 64 calls x 256 KiB at most.
    assert report.rss_peak_mib - report.rss_start_mib < 96, report
    assert report.predicts > 0 and not report.predict_failures, report
    assert report.health_max_s < 0.5, report
    assert report.sent > 0 and report.lost == 0, report
