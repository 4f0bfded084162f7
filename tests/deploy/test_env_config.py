"""The server's SNAPSERVE_* environment variables: every flag has one, a flag beats it, bad values
are refused naming the variable, and the Dockerfile and docs/deploy.md name only real ones."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from snapserve.server.cli import build_parser, config_from_args, env_var

ROOT = Path(__file__).resolve().parents[2]


def flags() -> dict[str, str]:
    """flag -> its variable, for every option of the server's CLI."""
    return {a.option_strings[-1]: env_var(a) for a in build_parser({})._actions
            if a.option_strings and a.dest != "help"}


def test_every_flag_has_a_variable_named_after_it() -> None:
    names = flags()
    assert names["--model-repository"] == "SNAPSERVE_MODEL_REPOSITORY"
    assert names["--max-batch-size"] == "SNAPSERVE_MAX_BATCH_SIZE"
    for flag, name in names.items():
        assert name == "SNAPSERVE_" + flag[2:].upper().replace("-", "_")
    help_text = build_parser({}).format_help()
    for name in names.values():
        assert name in help_text


def test_variables_set_the_config(tmp_path: Path) -> None:
    environ = {"SNAPSERVE_MODEL_REPOSITORY": str(tmp_path), "SNAPSERVE_HOST": "0.0.0.0",
               "SNAPSERVE_PORT": "9000", "SNAPSERVE_DEVICE": "cpu", "SNAPSERVE_MAX_BATCH_SIZE": "4",
               "SNAPSERVE_MAX_QUEUE_DELAY_MS": "7.5", "SNAPSERVE_GRACE_S": "0.5",
               "SNAPSERVE_LOG_LEVEL": "DEBUG"}
    args = build_parser(environ).parse_args([])  # --model-repository is no longer required
    config = config_from_args(args)
    assert (config.model_repository, config.host, config.port) == (tmp_path, "0.0.0.0", 9000)
    assert (config.runtime.device, config.batcher.max_batch_size) == ("cpu", 4)
    assert (config.batcher.max_queue_delay_s, config.grace_s) == (0.0075, 0.5)
    assert args.log_level == "DEBUG"


def test_a_flag_beats_its_variable_and_empty_is_unset(tmp_path: Path) -> None:
    environ = {"SNAPSERVE_MODEL_REPOSITORY": str(tmp_path), "SNAPSERVE_PORT": "9000",
               "SNAPSERVE_HOST": ""}
    args = build_parser(environ).parse_args(["--port", "9001"])
    assert (args.port, args.host) == (9001, "127.0.0.1")


def test_without_the_variable_the_repository_is_still_required(
        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        build_parser({}).parse_args([])
    assert info.value.code == 2
    assert "--model-repository" in capsys.readouterr().err


@pytest.mark.parametrize(("name", "value", "message"), [
    ("SNAPSERVE_PORT", "http", "SNAPSERVE_PORT='http' is not a valid int"),
    ("SNAPSERVE_MAX_QUEUE_DELAY_MS", "soon", "SNAPSERVE_MAX_QUEUE_DELAY_MS='soon' is not a valid float"),
    ("SNAPSERVE_DEVICE", "tpu", "SNAPSERVE_DEVICE='tpu': choose from auto, cpu, cuda"),
    ("SNAPSERVE_LOG_LEVEL", "LOUD", "SNAPSERVE_LOG_LEVEL='LOUD': choose from DEBUG"),
])
def test_bad_values_name_the_variable(name: str, value: str, message: str,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        build_parser({name: value})
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_a_value_the_config_refuses_names_its_field(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from snapserve.server.cli import main
    monkeypatch.setenv("SNAPSERVE_MODEL_REPOSITORY", str(tmp_path))
    monkeypatch.setenv("SNAPSERVE_MAX_BATCH_SIZE", "0")
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2
    assert "max_batch_size must be an integer >= 1, got 0" in capsys.readouterr().err


@pytest.mark.parametrize("path", ["Dockerfile", "docs/deploy.md"])
def test_files_name_only_real_variables(path: str) -> None:
    text = (ROOT / path).read_text()
    named = set(re.findall(r"\bSNAPSERVE_[A-Z_]+[A-Z]\b", text)) - {"SNAPSERVE_FOO_BAR"}  # the rule
    assert named, f"{path} names no SNAPSERVE_* variable"
    assert named <= set(flags().values()), f"{path} names unknown variables"


def test_deploy_doc_lists_every_variable() -> None:
    text = (ROOT / "docs" / "deploy.md").read_text()
    missing = [name for name in flags().values() if name not in text]
    assert not missing, f"docs/deploy.md does not list {missing}"


def switches() -> list[argparse.Action]:
    return [a for a in build_parser({})._actions if a.option_strings and a.nargs == 0
            and a.dest not in ("help", "version")]


@pytest.mark.skipif(not switches(), reason="the server has no on/off flag (store_true) today")
@pytest.mark.parametrize(("raw", "expected"), [("1", True), ("true", True), ("On", True),
                                               ("0", False), ("false", False), ("no", False)])
def test_switch_variables(raw: str, expected: bool, tmp_path: Path) -> None:
    switch = switches()[0]
    args = build_parser({env_var(switch): raw, "SNAPSERVE_MODEL_REPOSITORY": str(tmp_path)}
                        ).parse_args([])
    assert getattr(args, switch.dest) is (expected if switch.const is True else not expected)


@pytest.mark.skipif(not switches(), reason="the server has no on/off flag (store_true) today")
def test_bad_switch_value_names_the_variable(capsys: pytest.CaptureFixture[str]) -> None:
    name = env_var(switches()[0])
    with pytest.raises(SystemExit):
        build_parser({name: "maybe"})
    assert f"{name}='maybe': use one of 1, true" in capsys.readouterr().err


@pytest.mark.skipif("--pin" not in flags(), reason="the server has no --pin flag")
def test_list_variable_and_its_type_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    environ = {"SNAPSERVE_PIN": "digits=2 tiny=1,3", "SNAPSERVE_MODEL_REPOSITORY": str(tmp_path)}
    assert build_parser(environ).parse_args([]).pin == [("digits", (2,)), ("tiny", (1, 3))]
    with pytest.raises(SystemExit):
        build_parser({"SNAPSERVE_PIN": "digits"})
    assert "SNAPSERVE_PIN='digits': 'digits' is not MODEL=VERSION" in capsys.readouterr().err
