"""benchmarks/adaptive.py's Triton arm, on paper: hand-made levels through `summarize` and
`render`, so the ratios, the t-intervals and the sweep table are checked without starting
Triton (which no test starts) or any server."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from benchmarks import adaptive
from benchmarks.serve import ServerSettings

pytest.importorskip("scipy")

LEVELS = [1, 8]
# examples/s by seed and level: adaptive is 2x Triton for s0 and 2.2x for s1 at both levels.
RATES = {"full": {"s0": (100.0, 200.0), "s1": (110.0, 220.0)},
         "adaptive": {"s0": (200.0, 500.0), "s1": (220.0, 440.0)},
         "triton": {"s0": (100.0, 250.0), "s1": (100.0, 200.0)}}


def _level(rate: float, concurrency: int, cpu_ms: float = 1.5) -> dict[str, Any]:
    return {"concurrency": concurrency, "examples_per_s": rate, "throughput_rps": rate,
            "server_cpu_ms_per_example": cpu_ms, "latency_ms": {"p50": 1000 / rate, "p99": 2000 / rate},
            "errors": {}, "requests": int(rate)}


def _server(label: str) -> dict[str, Any]:
    test = {"accuracy": 0.9, "nll": 0.3, "entropy_auroc": 0.8, "mi_auroc": 0.7,
            "mean_members_evaluated": 5.0 if label == "full" else 2.0, "errors": 10}
    return {"models": {seed: {"test": test, "levels": {c: _level(r, c) for c, r in zip(LEVELS, rates)}}
                       for seed, rates in RATES[label].items()},
            "cheap": {c: _level(1000.0, c, cpu_ms=0.2) for c in LEVELS}, "log": []}


def _triton() -> dict[str, Any]:
    settings = [{"delay_us": 0, "instances": 1, "threads": 1, "key": "d0_i1_t1"},
                {"delay_us": 100, "instances": 2, "threads": 1, "key": "d100_i2_t1"}]
    points = {"d0_i1_t1": [_level(90.0, 1), _level(180.0, 8)],
              "d100_i2_t1": [_level(100.0, 1), _level(250.0, 8)]}
    return {"sweep": {"model": "s0", "duration_s": 3.0, "warmup_s": 1.0, "settings": settings,
                      "points": points,
                      "geomean_examples_per_s": {"d0_i1_t1": 127.3, "d100_i2_t1": 158.1}},
            "best": {"key": "d100_i2_t1", "delay_us": 100, "instances": 2, "threads": 1,
                     "why": "geometric mean 158.1 req/s", "described": "delay 100 µs, 2 instance(s) x 1 thread(s)"},
            "models": {seed: {c: _level(r, c, cpu_ms=2.5) for c, r in zip(LEVELS, rates)}
                       for seed, rates in RATES["triton"].items()}}


def _report(tmp_path: Path, triton: dict[str, Any] | None) -> dict[str, Any]:
    machine = {"cpu": "test cpu", "cores": 2, "onnxruntime": "1", "load_average_before": (0.1, 0.1, 0.1),
               "load_average_after": (0.1, 0.1, 0.1), "others_cpu_share": 0.0}
    versions = {"s0": tmp_path / "s0" / "1", "s1": tmp_path / "s1" / "1"}  # no report: no trainer numbers
    return adaptive.summarize(versions, {1: 2.0, 8: 1.0}, _server("full"), _server("adaptive"),
                              LEVELS, machine, 3.0, 1.0, ServerSettings(), triton)


def test_ratios_over_triton_are_paired_per_seed(tmp_path: Path) -> None:
    report = _report(tmp_path, _triton())
    assert report["seeds"]["s0"]["over_triton"]["adaptive"] == {1: pytest.approx(2.0), 8: pytest.approx(2.0)}
    assert report["seeds"]["s1"]["over_triton"]["full"] == {1: pytest.approx(1.1), 8: pytest.approx(1.1)}
    interval = report["intervals"]["adaptive_over_triton"][8]
    # ratios 2.0 and 2.2: mean 2.1, sd 0.1414, t(0.975, 1) = 12.706; half-width 12.706 * 0.1
    assert interval["mean"] == pytest.approx(2.1)
    assert interval["high"] - 2.1 == pytest.approx(12.7062 * 0.1, rel=1e-4)
    assert "models" not in report["triton"]  # the levels live in the seeds, not twice


def test_render_shows_the_sweep_the_setting_and_triton_beside_both(tmp_path: Path) -> None:
    text = adaptive.render(_report(tmp_path, _triton()), "python -m benchmarks.adaptive")
    lines = text.splitlines()
    assert "| 100 | 2 x 1 | **100.0** | **250.0** | **158.1** |" in lines  # the kept setting
    assert "| 0 | 1 x 1 | 90.0 | 180.0 | 127.3 |" in lines
    assert "Triton's setting for every seed: delay 100 µs, 2 instance(s) x 1 thread(s)" in text
    assert ("| s0 | 8 | 250.0 | 200.0 | 500.0 | 0.80× | **2.00×** | 2.500 | 1.500 | 1.500 | 4.00 | 0 |"
            in lines)
    assert "- adaptive / Triton: c=1 2.10 [0.83, 3.37]×, c=8 2.10 [0.83, 3.37]×" in lines
    assert "then the tuned Triton (below)" in text and "not interleaved" in text
    assert "CPU time" in text and "Not in this run" not in text


def test_render_says_why_triton_is_missing(tmp_path: Path) -> None:
    left_out = adaptive.render(_report(tmp_path, None), "cmd")
    assert "Not in this run: the tuned Triton" in left_out and "`--no-triton`" in left_out
    skipped = adaptive.render(_report(tmp_path, {"skipped": "no venv here"}), "cmd")
    assert "Not in this run: the tuned Triton. no venv here." in skipped
    assert "Triton ex/s" not in skipped and "then the tuned Triton" not in skipped


def test_triton_arm_is_validated_once() -> None:
    with pytest.raises(ValueError, match="settings"):
        adaptive.TritonArm(())
    with pytest.raises(ValueError, match="sweep_duration_s"):
        adaptive.TritonArm((object(),), sweep_duration_s=0)  # type: ignore[arg-type]


def test_a_saved_run_renders_as_it_did_when_it_ran(tmp_path: Path) -> None:
    """`render` re-writes the section from a run's JSON (string keys) as the run wrote it."""
    import json

    report = _report(tmp_path, _triton())
    report["written_at"] = "2026-12-06 07:23 UTC"
    saved = json.loads(json.dumps(report, default=str))
    assert adaptive.render(adaptive._int_keys(saved), "cmd") == adaptive.render(report, "cmd")
    assert "2026-12-06 07:23 UTC" in adaptive.render(report, "cmd")


def test_only_the_others_measured_share_marks_a_run_busy() -> None:
    quiet = {"others_cpu_share": 0.0, "load_average_before": (1.9, 2.0, 2.0), "cores": 2}
    assert not adaptive.busy(quiet)
    assert adaptive.busy({**quiet, "others_cpu_share": 0.3})
