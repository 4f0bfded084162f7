"""The server's settings: every flag is also a SNAPSERVE_* variable and a key of the --config file
(YAML or TOML); flags > environment > file > defaults; a bad value, key or file is refused with the
key named; the Dockerfile and docs/deploy.md name only real variables, and the docs list them all."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from snapserve.server.cpp.binding import CPP_DIR_ENV
from snapserve.server.process.cli import build_parser, load_config, main
from snapserve.server.errors import ConfigError
from snapserve.server.settings import ServerSettings, env_name, flag_name

ROOT = Path(__file__).resolve().parents[2]
VARIABLES = {env_name(key) for key in ServerSettings.model_fields} | {"SNAPSERVE_CONFIG"}


def test_every_setting_is_a_flag_and_a_variable_named_after_it() -> None:
    help_text = build_parser().format_help()
    for key in ServerSettings.model_fields:
        assert flag_name(key) in help_text and env_name(key) in help_text, key
    assert env_name("max_batch_size") == "SNAPSERVE_MAX_BATCH_SIZE"
    assert flag_name("max_batch_size") == "--max-batch-size"


def test_variables_set_the_config(tmp_path: Path) -> None:
    environ = {"SNAPSERVE_MODEL_REPOSITORY": str(tmp_path), "SNAPSERVE_HOST": "0.0.0.0",
               "SNAPSERVE_PORT": "9000", "SNAPSERVE_DEVICE": "cpu", "SNAPSERVE_MAX_BATCH_SIZE": "4",
               "SNAPSERVE_MAX_QUEUE_DELAY_MS": "7.5", "SNAPSERVE_GRACE_S": "0.5",
               "SNAPSERVE_LOG_LEVEL": "DEBUG", "SNAPSERVE_CUDA_GRAPH_BATCH_SIZES": "1,2,4"}
    settings, config = load_config([], environ)
    assert (config.model_repository, config.host, config.port) == (tmp_path, "0.0.0.0", 9000)
    assert (config.runtime.device, config.batcher.max_batch_size) == ("cpu", 4)
    assert (config.batcher.max_queue_delay_s, config.grace_s) == (0.0075, 0.5)
    assert config.runtime.cuda_graph_batch_sizes == (1, 2, 4)
    assert settings.log_level == "DEBUG"


def test_the_plan_cache_is_auto_on_the_command_line_and_off_in_code(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from snapserve.server.config import RuntimeConfig

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    environ = {"SNAPSERVE_MODEL_REPOSITORY": str(tmp_path)}
    assert load_config([], environ)[1].runtime.plan_cache == tmp_path / "xdg/snapserve/plans"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert load_config([], environ)[1].runtime.plan_cache == tmp_path / "home/.cache/snapserve/plans"
    assert load_config(["--plan-cache", "off"], environ)[1].runtime.plan_cache is None
    _, config = load_config(["--remeasure-plans"], {**environ, "SNAPSERVE_PLAN_CACHE": "/srv/p"})
    assert (config.runtime.plan_cache, config.runtime.remeasure_plans) == (Path("/srv/p"), True)
    # A RuntimeConfig made in code measures at every load, as tests of the measurement need.
    assert RuntimeConfig().plan_cache is None


@pytest.mark.parametrize("suffix, text", [
    (".yaml", "model_repository: {repo}\nmax_batch_size: 16\nport: 7000\nversion_policy: specific\n"
              "pin: digits=2 tiny=1\nadaptive_wait: false\n"),
    (".toml", 'model-repository = "{repo}"\nmax-batch-size = 16\nport = 7000\n'
              'version_policy = "specific"\npin = ["digits=2", "tiny=1"]\nadaptive_wait = false\n'),
])
def test_a_config_file_sets_every_key(suffix: str, text: str, tmp_path: Path) -> None:
    path = tmp_path / f"server{suffix}"
    path.write_text(text.format(repo=tmp_path))
    _, config = load_config(["--config", str(path)], {})
    assert (config.model_repository, config.port, config.batcher.max_batch_size) == (tmp_path, 7000, 16)
    assert config.repository.pinned == {"digits": (2,), "tiny": (1,)}
    assert config.batcher.adaptive_wait is False


def test_flags_beat_variables_which_beat_the_file(tmp_path: Path) -> None:
    path = tmp_path / "server.yaml"
    path.write_text(f"model_repository: {tmp_path}\nport: 7000\nhost: 0.0.0.0\nmax_batch_size: 16\n")
    environ = {"SNAPSERVE_CONFIG": str(path), "SNAPSERVE_PORT": "8000", "SNAPSERVE_HOST": "",
               "SNAPSERVE_MAX_BATCH_SIZE": "4"}
    _, config = load_config(["--port", "9001"], environ)
    assert config.port == 9001  # flag over variable over file
    assert config.batcher.max_batch_size == 4  # variable over file
    assert config.host == "0.0.0.0"  # an empty variable is unset: the file's value stands


def test_without_a_repository_anywhere_it_is_required() -> None:
    with pytest.raises(ConfigError, match=r"model_repository \(--model-repository, "
                                          r"SNAPSERVE_MODEL_REPOSITORY or 'model_repository' in "
                                          r"the config file\) is required"):
        load_config([], {})


@pytest.mark.parametrize(("name", "value", "message"), [
    ("SNAPSERVE_PORT", "http", "port (--port, SNAPSERVE_PORT or 'port' in the config file): must "
                               "be an integer, got 'http'"),
    ("SNAPSERVE_MAX_QUEUE_DELAY_MS", "soon", "max_queue_delay_ms (--max-queue-delay-ms"),
    ("SNAPSERVE_DEVICE", "tpu", "device (--device, SNAPSERVE_DEVICE or 'device' in the config "
                                "file): must be one of 'auto', 'cpu' or 'cuda', got 'tpu'"),
    ("SNAPSERVE_MAX_QUEUE_DELAY_MS", "inf", "max_queue_delay_ms (--max-queue-delay-ms, "
                                            "SNAPSERVE_MAX_QUEUE_DELAY_MS or 'max_queue_delay_ms' in "
                                            "the config file): must be a finite number, got inf"),
    ("SNAPSERVE_MAX_QUEUE_DELAY_MS", "nan", "max_queue_delay_ms (--max-queue-delay-ms"),
    ("SNAPSERVE_MAX_QUEUE_DELAY_MS", "1e9", "max_queue_delay_ms (--max-queue-delay-ms, "
                                            "SNAPSERVE_MAX_QUEUE_DELAY_MS or 'max_queue_delay_ms' in "
                                            "the config file): must be a number <= 60000, got 1000000000.0"),
    ("SNAPSERVE_GRACE_S", "inf", "grace_s (--grace-s, SNAPSERVE_GRACE_S or 'grace_s' in the config "
                                 "file): must be a finite number, got inf"),
    ("SNAPSERVE_MAX_BATCH_SIZE", "1e9", "max_batch_size (--max-batch-size"),
    ("SNAPSERVE_WORKERS", "0", "workers (--workers, SNAPSERVE_WORKERS or 'workers' in the config "
                               "file): must be an integer >= 1, got 0"),
    ("SNAPSERVE_LOG_LEVEL", "LOUD", "log_level (--log-level"),
    ("SNAPSERVE_ALLOW_NONFINITE", "maybe", "allow_nonfinite (--allow-nonfinite"),
    ("SNAPSERVE_PIN", "digits", "pin 'digits' is not MODEL=VERSION"),
])
def test_bad_values_name_the_key_and_where_it_is_set(name: str, value: str, message: str,
                                                     tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(["--model-repository", str(tmp_path)], {name: value})
    assert message in str(caught.value)


@pytest.mark.parametrize(("raw", "expected"), [("1", True), ("true", True), ("On", True),
                                               ("0", False), ("false", False), ("no", False)])
def test_switch_variables(raw: str, expected: bool, tmp_path: Path) -> None:
    settings, _ = load_config(["--model-repository", str(tmp_path)],
                              {"SNAPSERVE_ALLOW_REPOSITORY_CONTROL": raw})
    assert settings.allow_repository_control is expected
    assert load_config(["--model-repository", str(tmp_path), "--no-adaptive-wait"], {})[1] \
        .batcher.adaptive_wait is False


@pytest.mark.parametrize(("text", "message"), [
    ("max_batch_sise: 3\n", "'max_batch_sise' in {path} is not a setting (did you mean 'max_batch_size'?); expected one of: "),
    ("[1, 2]\n", "expected a mapping of settings, got list"),
    ("port: [\n", "not valid YAML"),
    ("max_batch_size: many\n", "max_batch_size (--max-batch-size"),
])
def test_bad_files_name_what_is_wrong(text: str, message: str, tmp_path: Path) -> None:
    path = tmp_path / "server.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(["--model-repository", str(tmp_path), "--config", str(path)], {})
    assert message.format(path=path) in str(caught.value)
    with pytest.raises(ConfigError, match="cannot be read"):
        load_config(["--model-repository", str(tmp_path), "--config", str(tmp_path / "no.yaml")], {})


def test_a_value_the_config_refuses_names_its_field(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("SNAPSERVE_MODEL_REPOSITORY", str(tmp_path))
    monkeypatch.setenv("SNAPSERVE_MAX_BATCH_SIZE", "0")
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2
    assert ("max_batch_size (--max-batch-size, SNAPSERVE_MAX_BATCH_SIZE or 'max_batch_size' in the "
            "config file): must be an integer >= 1, got 0") in capsys.readouterr().err


def test_print_config_shows_the_effective_settings(tmp_path: Path) -> None:
    path = tmp_path / "server.yaml"
    path.write_text("max_batch_size: 16\nport: 7000\n")
    done = subprocess.run([sys.executable, "-m", "snapserve.server", "--config", str(path),
                           "--model-repository", str(tmp_path), "--port", "7100", "--print-config"],
                          capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "SNAPSERVE_GRACE_S": "2.5"})
    assert done.returncode == 0, done.stderr
    shown = yaml.safe_load(done.stdout)
    assert set(shown) == set(ServerSettings.model_fields)
    assert (shown["max_batch_size"], shown["port"], shown["grace_s"]) == (16, 7100, 2.5)
    # What it prints is itself a valid config file.
    again = tmp_path / "again.yaml"
    again.write_text(done.stdout)
    assert load_config(["--config", str(again)], {})[1].port == 7100


@pytest.mark.parametrize("path", ["Dockerfile", "docs/deploy.md"])
def test_files_name_only_real_variables(path: str) -> None:
    text = (ROOT / path).read_text()
    named = set(re.findall(r"\bSNAPSERVE_[A-Z_]+[A-Z]\b", text)) - {"SNAPSERVE_FOO_BAR"}  # the rule
    assert named, f"{path} names no SNAPSERVE_* variable"
    # Besides the settings: where the C++ front end's built library is kept (not a setting:
    # read where the library is built or loaded, server/cpp/binding.py).
    known = VARIABLES | {CPP_DIR_ENV}
    assert named <= known, f"{path} names unknown variables: {sorted(named - known)}"


def test_deploy_doc_lists_every_variable() -> None:
    text = (ROOT / "docs" / "deploy.md").read_text()
    missing = sorted(name for name in VARIABLES if name not in text)
    assert not missing, f"docs/deploy.md does not list {missing}"
