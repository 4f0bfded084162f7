"""The benchmark suite's plumbing: the ceiling's arithmetic, RESULTS.md sections, the echo
server's answer. The benchmarks themselves run from `python -m benchmarks.serve`."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.ceiling import (Ceiling, Timing, default_batch_sizes, format_table, measure_ceiling,
                                setups)
from benchmarks.echo_server import canned_response
from benchmarks.serve import replace_section
from snapserve.client.messages import decode_prediction
from snapserve.proto.snapserve.v1 import ensemble_pb2 as pb


def test_ceiling_for_a_batch_mix_interpolates_between_measured_sizes() -> None:
    ceiling = Ceiling("m", (Timing("fused", 1, 1, 1, 0.001), Timing("members", 1, 1, 1, 0.002),
                            Timing("fused", 1, 2, 1, 0.0015),  # two callers: 1333 ex/s
                            Timing("fused", 1, 1, 4, 0.002)))
    assert ceiling.best(1).setup == "fused, 2x1 thr" and ceiling.latency(1).seconds == 0.001
    assert ceiling.seconds_per_example(4) == pytest.approx(0.0005)
    assert ceiling.seconds_per_example(2) == pytest.approx(0.00075 - 0.00025 / 3)
    # 3 batches of 1 and 1 of 4: 7 examples in 3 * 0.75 ms + 4 * 0.5 ms.
    assert ceiling.examples_per_s_for_mix({1: 3, 4: 1}) == pytest.approx(7 / 0.00425)
    # One batch at a time: 1 ms per example at batch 1.
    assert ceiling.examples_per_s_for_mix({1: 3, 4: 1}, single_caller=True) == pytest.approx(7 / 0.005)


def test_default_batch_sizes_cover_one_to_max() -> None:
    assert default_batch_sizes(32) == [1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 24, 32]
    assert default_batch_sizes(5) == [1, 2, 3, 4, 5]


def test_measure_ceiling_times_every_way_and_set_up(imported_repo: Path) -> None:
    ceiling = measure_ceiling(imported_repo / "mixed" / "1", [1, 3], cores=2, budget_s=0.01)
    assert {(t.way, t.batch_size, t.threads, t.callers) for t in ceiling.timings} == {
        (w, b, t, c) for w in ("members", "members+scores", "fused") for b in (1, 3)
        for t, c in setups(2)}
    assert all(t.seconds > 0 for t in ceiling.timings)
    assert "ceiling ex/s" in format_table(ceiling)


def test_results_sections_of_others_are_kept() -> None:
    text = "# Benchmark results\n\n## Trainer\n\ntrainer table\n\n## Serving\n\nold\n\n## Other\n\nkeep\n"
    new = replace_section(text, "Serving", "## Serving\n\nnew numbers\n")
    assert "trainer table" in new and "keep" in new and "new numbers" in new and "old" not in new
    assert new.index("## Trainer") < new.index("## Serving") < new.index("## Other")
    appended = replace_section("# Benchmark results\n\n## Trainer\n\nt\n", "Serving", "## Serving\n\nx\n")
    assert appended.endswith("## Serving\n\nx\n") and "## Trainer\n\nt" in appended
    assert replace_section("", "Serving", "## Serving\n\nx").startswith("# Benchmark results")


def test_echo_answer_is_a_real_prediction() -> None:
    prediction = decode_prediction(pb.PredictResponse.FromString(canned_response(10, 5)), False)
    assert prediction.probabilities.shape == (1, 10) and prediction.member_kl.shape == (1, 5)
