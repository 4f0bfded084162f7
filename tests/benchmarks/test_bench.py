"""`ensemble-client bench` against a real server: what it counts and reports (not how fast)."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path

import numpy as np
import pytest

from snapserve.client import ClientError, bench
from snapserve.client.bench import (BenchConfig, BenchError, Requests, _input_batches,
                                    format_table, run_bench)
from snapserve.client.cli import main as client_main
from snapserve.server import BatcherConfig, ServerConfig
from tests.support.servers import ThreadedServer, pinned_runtime


def _config(server: ThreadedServer, **kwargs: object) -> BenchConfig:
    defaults: dict[str, object] = {"duration_s": 0.6, "warmup_s": 0.2}
    return BenchConfig(target=server.target, model="mixed", **{**defaults, **kwargs})


def test_closed_loop_levels_report_throughput_latency_and_batches(served) -> None:  # type: ignore[no-untyped-def]
    results = asyncio.run(run_bench(_config(served, concurrency=(1, 4), batch_size=2)))
    assert [r.concurrency for r in results] == [1, 4]
    for r in results:
        assert r.requests > 0 and r.errors == {}
        assert r.examples_per_s == pytest.approx(2 * r.throughput_rps)
        assert set(r.latency_ms) == {"p50", "p90", "p99", "mean", "max"}
        assert r.latency_ms["p50"] <= r.latency_ms["p90"] <= r.latency_ms["p99"] <= r.latency_ms["max"]
        assert r.client_cpu_ms_per_request > 0
        # The server's own batch counts, from KServe ModelStatistics: sizes are even (2 per request).
        assert r.server_batches and all(size % 2 == 0 for size in r.server_batches)
    assert "c=4" in format_table(results)


def test_open_loop_sends_at_the_rate(served) -> None:  # type: ignore[no-untyped-def]
    (result,) = asyncio.run(run_bench(_config(served, request_rate=100.0, duration_s=1.0)))
    assert result.mode == "rate" and result.label == "r=100/s"
    assert 60 <= result.requests <= 140  # about 100 in the 1 s window (rounding, edges)
    assert result.send_lag_ms_p99 is not None


def test_kserve_api(served) -> None:  # type: ignore[no-untyped-def]
    (result,) = asyncio.run(run_bench(_config(served, api="kserve", concurrency=(2,))))
    assert result.requests > 0 and result.errors == {}


def test_stream_api_over_several_connections(served) -> None:  # type: ignore[no-untyped-def]
    results = asyncio.run(run_bench(_config(served, api="stream", concurrency=(1, 3),
                                            connections=2)))
    for r in results:
        assert r.requests > 0 and r.errors == {}
        assert r.server_batches  # the same ModelStatistics as unary
    with pytest.raises(BenchError, match="closed loops only"):
        BenchConfig(target="x", model="m", api="stream", request_rate=10.0)


def test_stream_api_with_several_examples_per_request(served) -> None:  # type: ignore[no-untyped-def]
    (result,) = asyncio.run(run_bench(_config(served, api="stream", concurrency=(2,),
                                              batch_size=4)))
    assert result.errors == {} and result.examples_per_s == pytest.approx(4 * result.throughput_rps)


def test_errors_are_counted_by_status_code(tmp_path: Path, imported_repo: Path) -> None:
    # One waiting request at most, and no adaptive send: concurrent callers overflow the queue.
    server = ThreadedServer(ServerConfig(
        model_repository=imported_repo, port=0, http_port=None, runtime=pinned_runtime(),
        batcher=BatcherConfig(max_batch_size=8, max_queue_delay_s=0.02, max_queue_size=1,
                              adaptive_wait=False)))
    try:
        (result,) = asyncio.run(run_bench(_config(server, concurrency=(8,))))
    finally:
        server.stop()
    assert result.errors.get("RESOURCE_EXHAUSTED", 0) > 0
    assert "RESOURCE_EXHAUSTED" in format_table([result])


def test_an_unknown_model_stops_the_bench_before_it_starts(served) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ClientError, match="NOT_FOUND"):
        asyncio.run(run_bench(BenchConfig(target=served.target, model="nope", duration_s=0.1)))


@pytest.mark.parametrize("kwargs", [{"concurrency": (0,)}, {"request_rate": 0.0},
                                    {"api": "rest"}, {"batch_size": 0}, {"duration_s": 0}])
def test_bad_settings_are_refused(kwargs: dict) -> None:
    with pytest.raises(BenchError):
        BenchConfig(target="x", model="m", **kwargs)


def test_cli_writes_json_and_a_table(served, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out, path = io.StringIO(), tmp_path / "bench.json"
    code = client_main(["bench", "--target", served.target, "--model", "mixed", "--concurrency",
                        "1,2", "--duration", "0.3", "--warmup", "0.1", "--json", str(path)], out)
    assert code == 0
    data = json.loads(path.read_text())
    assert [level["concurrency"] for level in data["levels"]] == [1, 2]
    assert data["config"]["model"] == "mixed"
    assert "req/s" in out.getvalue()  # the table, since the JSON went to a file


def test_cli_prints_json_when_not_on_a_terminal(served) -> None:  # type: ignore[no-untyped-def]
    out = io.StringIO()  # not a TTY
    assert client_main(["bench", "--target", served.target, "--model", "mixed", "--duration", "0.2",
                        "--warmup", "0"], out) == 0
    assert json.loads(out.getvalue())["levels"][0]["requests"] > 0


def test_cli_refuses_a_bad_level(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        client_main(["bench", "--model", "m", "--concurrency", "1,x"])
    assert info.value.code == 2
    assert client_main(["bench", "--model", "m", "--concurrency", "0"]) == 2
    assert "concurrency levels must be >= 1" in capsys.readouterr().err


def test_input_data_requests_carry_the_examples_in_turn(served, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    x = np.arange(5 * 16, dtype=np.float64).reshape(5, 16) / 80  # flat rows, as a CSV holds them
    path = tmp_path / "x.csv"
    np.savetxt(path, x, delimiter=",")
    config = _config(served, batch_size=2, input_data=str(path))
    batches = _input_batches(config, "input", np.dtype(np.float32), (-1, 1, 4, 4))
    assert [(b.shape, b.dtype) for b in batches] == [((2, 1, 4, 4), np.float32)] * 3
    # Every example, in order; the last request completed from the start.
    np.testing.assert_allclose(np.concatenate(batches).reshape(6, 16), x[[0, 1, 2, 3, 4, 0]],
                               rtol=1e-6)
    (result,) = asyncio.run(run_bench(config))
    assert result.errors == {} and result.requests > 0 and result.distinct_requests == 3


def test_requests_are_taken_in_turn() -> None:
    requests = Requests([b"a", b"b", b"c"])
    assert [requests.take() for _ in range(7)] == [b"a", b"b", b"c", b"a", b"b", b"c", b"a"]


def test_input_data_that_does_not_fit_is_refused_before_any_load(  # type: ignore[no-untyped-def]
        served, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "x.npy"
    np.save(path, np.zeros((3, 5, 5), np.float32))
    assert client_main(["bench", "--target", served.target, "--model", "mixed", "--input-data",
                        str(path), "--duration", "0.2"]) == 2
    assert "has shape [3, 5, 5]; the model takes [-1, 1, 4, 4]" in capsys.readouterr().err


def test_input_data_is_bounded_before_it_is_read(served, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "x.npy"
    np.save(path, np.zeros((64, 1, 4, 4), np.float32))

    def never(path: str) -> np.ndarray:
        raise AssertionError("read past the bound")

    monkeypatch.setattr(bench, "MAX_INPUT_BYTES", 1024)
    monkeypatch.setattr(bench, "read_input", never)
    with pytest.raises(BenchError, match="at most 1,024 are read"):
        asyncio.run(run_bench(_config(served, input_data=str(path))))
