"""`trainer` CLI conventions: --version, no abbreviations, global flags after the subcommand, a
--config settings file under the flags, and --from-manifest rerunning what made a version."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from snapserve.trainer.cli import build_parser, main, train_config
from snapserve.trainer.config import TrainConfig
from snapserve.trainer.errors import ConfigError

TRAIN = ["train", "--dataset", "digits", "--arch", "cnn", "--epochs", "2", "--members", "2",
         "--lr", "0.1", "--seed", "3", "--threads", "1", "--name", "digits", "--no-plots"]


def config_of(*argv: str) -> TrainConfig:
    args = build_parser().parse_args(list(argv))
    return train_config(args, list(argv))


def test_version_and_no_abbreviations(capsys: pytest.CaptureFixture[str]) -> None:
    done = subprocess.run([sys.executable, "-m", "snapserve.trainer", "--version"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("trainer ")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--out", "x", "--epoch", "3"])
    assert "unrecognized arguments: --epoch" in capsys.readouterr().err


def test_global_flags_are_taken_after_the_subcommand_too() -> None:
    assert build_parser().parse_args(["train", "--out", "x", "-v"]).verbose is True
    assert build_parser().parse_args(["-q", "train", "--out", "x"]).quiet is True
    assert build_parser().parse_args(["train", "--out", "x"]).verbose is False


@pytest.mark.parametrize("suffix, text", [
    (".yaml", "method: swa\nepochs: 30\nswa-start: 0.5\nlr: 0.05\n"),
    (".toml", 'method = "swa"\nepochs = 30\nswa_start = 0.5\nlr = 0.05\n'),
])
def test_a_settings_file_under_the_flags(suffix: str, text: str, tmp_path: Path) -> None:
    path = tmp_path / f"run{suffix}"
    path.write_text(text)
    config = config_of("train", "--out", str(tmp_path), "--config", str(path), "--epochs", "12")
    assert (config.method, config.swa_start, config.lr) == ("swa", 0.5, 0.05)
    assert config.epochs == 12  # the flag wins over the file
    assert config.batch_size == TrainConfig(out="x").batch_size  # neither: the default


@pytest.mark.parametrize("text, message", [
    ("epochz: 3\n", "unknown setting(s) ['epochz']"),
    ("[1]\n", "expected a mapping of settings, got list"),
    ("epochs: [\n", "not valid YAML"),
    ("epochs: -1\n", "epochs"),
])
def test_bad_settings_files_name_what_is_wrong(text: str, message: str, tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")
                       .replace(")", r"\)")):
        config_of("train", "--out", str(tmp_path), "--config", str(path))


def test_out_is_required_without_a_manifest() -> None:
    with pytest.raises(ConfigError, match="--out is required"):
        config_of("train")


def test_from_manifest_reruns_what_made_a_version(tmp_path: Path) -> None:
    """The same settings again (same seed, same data order): the same member weights, to the byte."""
    with contextlib.redirect_stdout(io.StringIO()):
        assert main([*TRAIN, "--out", str(tmp_path / "a")]) == 0
    first = tmp_path / "a" / "digits" / "1" / "manifest.json"
    config = config_of("train", "--from-manifest", str(first))
    assert (config.out, config.name, config.seed, config.epochs) == (str(tmp_path / "a"), "digits", 3, 2)
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["train", "--from-manifest", str(first), "--out", str(tmp_path / "b")]) == 0
    again = json.loads((tmp_path / "b" / "digits" / "1" / "manifest.json").read_text())
    original = json.loads(first.read_text())
    assert [m["sha256"] for m in again["members"]] == [m["sha256"] for m in original["members"]]
    assert {k: v for k, v in again["training"].items() if k in TrainConfig.__dataclass_fields__} == \
        {k: v for k, v in original["training"].items() if k in TrainConfig.__dataclass_fields__}
    with pytest.raises(ConfigError, match="not a model version's manifest.json"):
        config_of("train", "--from-manifest", str(tmp_path / "nothing.json"))
