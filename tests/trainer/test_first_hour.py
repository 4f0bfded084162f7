"""The trainer's first hour: Ctrl-C says where it stopped and how to go on, a failed run leaves
no empty checkpoint folder, progress shows elapsed time and an ETA, the end names the report."""

from __future__ import annotations

import io
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from snapserve.trainer.cli import main
from snapserve.trainer.progress import Progress

ROOT = Path(__file__).resolve().parents[2]
ARGS = ["--dataset", "digits", "--arch", "mlp", "--method", "snapshot", "--epochs", "4",
        "--members", "2", "--seed", "5", "--no-plots", "--name", "digits"]
# Ctrl-C (SIGINT, as a terminal sends it) right before update {at}. Python's own SIGINT handler
# is set first: a process started in the background by a shell without job control inherits
# SIGINT ignored, and Python then installs none.
INTERRUPTER = """
import os, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)
import snapserve.trainer.loop as loop
real_step, done = loop.train_step, [0]
def step(*args, **kwargs):
    done[0] += 1
    if done[0] == {at}:
        os.kill(os.getpid(), signal.SIGINT)
    return real_step(*args, **kwargs)
loop.train_step = step
from snapserve.trainer.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _interrupted(out: Path, at: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", INTERRUPTER.format(at=at), "train", "--threads",
                           "1", "--out", str(out), *ARGS], cwd=ROOT, capture_output=True,
                          text=True, timeout=180, check=False)


def test_ctrl_c_says_the_epoch_and_the_command_that_goes_on(tmp_path: Path) -> None:
    done = _interrupted(tmp_path / "models", at=45)  # inside epoch 3
    assert done.returncode == 130, done.stderr
    assert "Traceback" not in done.stderr
    assert "interrupted at epoch 2; `trainer train --threads 1 --out" in done.stderr
    assert "--resume` goes on" in done.stderr


def test_ctrl_c_before_the_first_checkpoint_leaves_no_empty_run_folder(tmp_path: Path) -> None:
    done = _interrupted(tmp_path / "models", at=3)
    assert done.returncode == 130, done.stderr
    assert "interrupted before the first epoch ended; nothing to resume" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "models" / ".runs").exists()


def test_a_failed_run_leaves_no_empty_run_folder(tmp_path: Path) -> None:
    assert main(["train", "--threads", "1", "--out", str(tmp_path / "models"),
                 "--dataset", str(tmp_path / "missing.npz"), "--epochs", "1"]) != 0
    assert not (tmp_path / "models" / ".runs").exists()


def test_progress_lines_show_elapsed_time_and_an_eta(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="snapserve.trainer.loop")
    progress = Progress(total_steps=100, steps_per_epoch=10, stream=io.StringIO())
    progress.epoch(1, 10, 0.5, 0.9, 0.1, 0)
    progress.epoch(2, 20, 0.4, 0.9, 0.1, 0)
    line = caplog.records[-1].getMessage()
    assert "elapsed 0s  eta 0s" in line  # 80 steps left at a rate this fast


def test_the_end_of_a_run_prints_the_report_path(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--threads", "1", "--out", str(tmp_path / "models"), "--dataset", "digits",
                 "--arch", "mlp", "--epochs", "1", "--members", "1", "--no-plots",
                 "--name", "digits"]) == 0
    printed = capsys.readouterr().out
    assert f"report: {tmp_path / 'models' / 'digits' / '1' / 'report'}" in printed
    assert (tmp_path / "models" / "digits" / "1" / "report" / "metrics.json").is_file()


def test_a_csv_data_set_gets_a_message_about_csv(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "table.csv"
    path.write_text("a,b,label\n1,2,0\n3,4,1\n")
    assert main(["train", "--out", str(tmp_path / "models"), "--dataset", str(path)]) != 0
    err = capsys.readouterr().err
    assert "a CSV file is not a data set the trainer reads; convert it to a .npz" in err
    assert "zip" not in err and "pickle" not in err
    assert not (tmp_path / "models" / ".runs").exists()


def test_the_python_api_trains_and_writes_a_version(tmp_path: Path) -> None:
    from snapserve.trainer import train_version

    result = train_version(out=tmp_path / "models", name="digits", dataset="digits", arch="mlp", epochs=1,
                   members=1, plots=False, threads=1)
    assert result is not None
    assert result.version_dir == tmp_path / "models" / "digits" / "1"
    assert result.manifest["name"] == "digits" and (result.version_dir / "manifest.json").is_file()


def test_the_python_api_names_an_unknown_setting(tmp_path: Path) -> None:
    from snapserve.trainer.api import train_version
    from snapserve.trainer.errors import ConfigError

    with pytest.raises(ConfigError, match=r"unknown setting\(s\) \['epoch'\]"):
        train_version(out=tmp_path, epoch=3)


def test_the_reliability_diagram_labels_each_bin_with_its_examples(tmp_path: Path) -> None:
    import numpy as np

    from snapserve.trainer.metrics import reliability_bins
    from snapserve.trainer.plots import bin_counts, plot_reliability

    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(4) * 0.3, size=500)
    labels = rng.integers(0, 4, size=500)
    bins = reliability_bins(probs, labels)
    labelled = bin_counts(bins)
    assert sum(int(text) for _, _, text in labelled) == 500
    assert len(labelled) == sum(1 for c in bins["count"] if c)
    plot_reliability(tmp_path / "reliability.png", {"uncalibrated": bins, "calibrated": bins}, 1.0)
    assert (tmp_path / "reliability.png").stat().st_size > 0


def test_a_flag_typo_gets_did_you_mean(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["train", "--epoch", "3"])
    assert exited.value.code == 2
    assert "unrecognized arguments: --epoch (did you mean --epochs?) 3" in capsys.readouterr().err
