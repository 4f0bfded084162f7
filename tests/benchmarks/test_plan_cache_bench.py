"""benchmarks/plan_cache.py end to end in seconds: two loads of each model with the cache off and
on, beside no work, RESULTS.md left alone. So the script keeps running as the loader changes."""

from __future__ import annotations

import pytest

from benchmarks import plan_cache


@pytest.mark.scripts
def test_the_script_compares_plans_and_load_times(capsys: pytest.CaptureFixture[str]) -> None:
    assert plan_cache.main(["--loads", "2", "--backgrounds", "quiet", "--no-write"]) == 0
    out = capsys.readouterr().out
    assert f"## {plan_cache.HEADING}" in out
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in out.splitlines()
            if line.startswith(("| tiny |", "| compute-bound |"))]
    assert len(rows) == 4  # each printed as measured, then in the section
    for cells in rows:
        assert len(cells) == 8 and cells[1] == "quiet" and cells[2] == "2"
        # With the cache on, the second load reads back the first one's plan: one plan.
        assert cells[5].startswith("1: ") and cells[5].endswith("(2)") and cells[6] == "1", cells
        assert cells[3].endswith("(2)")  # measured twice, with the cache off
        assert all(float(v) > 0 for v in cells[4].split(" / ") + cells[7].split(" / ")), cells
