"""`trainer compare`: every method at one budget, mean ± sample std over seeds, as markdown."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

from snapserve.trainer.cli import main
from snapserve.trainer.compare import format_table


def test_format_table_is_mean_and_sample_std() -> None:
    runs = [{"accuracy": 0.90, "nll_uncalibrated": 0.3, "nll": 0.25, "ece_uncalibrated": 0.05, "ece": 0.02,
             "members_mean_accuracy": 0.9, "train_seconds": 10.0, "members": 1},
            {"accuracy": 0.94, "nll_uncalibrated": 0.1, "nll": 0.15, "ece_uncalibrated": 0.03, "ece": 0.02,
             "members_mean_accuracy": 0.9, "train_seconds": 12.0, "members": 1}]
    table = format_table({"single": runs})
    header, rule, row = table.splitlines()
    assert header.startswith("| method | members | accuracy | NLL |") and rule.count("---") == 9
    assert row.startswith("| single | 1 | 0.9200 ± 0.0283 | 0.2000 ± 0.1414 |") and "11.0 ± 1.4" in row


def test_compare_trains_each_method_and_seed(tmp_path: Path) -> None:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["-q", "compare", "--dataset", "digits", "--arch", "mlp", "--budget", "2", "--seeds", "0", "1",
                     "--methods", "single", "swa", "--threads", "1", "--out", str(tmp_path / "repo"),
                     "--out-file", str(tmp_path / "table.md")])
    assert code == 0
    table = (tmp_path / "table.md").read_text()
    assert table.strip() in out.getvalue()
    assert "digits, mlp, budget 2 epochs, seeds 0 1" in table
    rows = [line for line in table.splitlines() if line.startswith("| s")]
    assert [r.split("|")[1].strip() for r in rows] == ["single", "swa"] and all("±" in r for r in rows)
    assert sorted(p.name for p in (tmp_path / "repo").iterdir() if not p.name.startswith(".")) == \
        ["digits-single", "digits-swa"]
    assert sorted(p.name for p in (tmp_path / "repo" / "digits-swa").iterdir()) == ["1", "2"]  # one per seed
