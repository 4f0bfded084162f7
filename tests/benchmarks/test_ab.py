"""benchmarks/ab.py: a revision's server imported from its own export, and the paired ratios."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

from benchmarks.ab import ROOT, WORKTREE, Side, _environment, import_root, main, ratio_interval


def test_the_ratio_is_the_geometric_mean_of_the_pairs_with_a_t_interval() -> None:
    steady = ratio_interval([100.0, 200.0, 50.0], [110.0, 220.0, 55.0])
    assert steady["ratio"] == pytest.approx(1.1)
    assert steady["low"] == pytest.approx(1.1) and steady["high"] == pytest.approx(1.1)
    noisy = ratio_interval([100.0, 100.0, 100.0, 100.0], [90.0, 130.0, 105.0, 115.0])
    assert noisy["low"] < 1 < noisy["high"]  # "within noise": the interval holds 1
    assert noisy["ratio"] == pytest.approx(math.exp(sum(math.log(v / 100) for v in
                                                        (90, 130, 105, 115)) / 4))
    one = ratio_interval([100.0], [120.0])
    assert one["ratio"] == pytest.approx(1.2) and math.isnan(one["low"])


def test_a_revision_runs_from_its_own_export_and_the_worktree_from_the_install() -> None:
    assert import_root(WORKTREE) is None
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout.strip()
    probe = "import snapserve.server.models.ensemble as m; print(m.__file__)"
    for side, where in ((Side("A", "HEAD"), ROOT / "runs" / "ab" / commit / "import"),
                        (Side("B", WORKTREE), ROOT / "server")):
        out = subprocess.run([sys.executable, "-c", probe], env=_environment(side), cwd=ROOT,
                             check=True, capture_output=True, text=True).stdout.strip()
        assert out.startswith(str(where)), (side, out)


def test_two_sides_that_are_the_same_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--a", WORKTREE, "--b", WORKTREE])
    assert "the two sides are the same" in capsys.readouterr().err
