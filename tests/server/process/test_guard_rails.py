"""The first hour without surprises, on the server's side: metrics on 8002 by default (off with a
flag), --print-config with `auto` and without a repository, other servers' flags and files
pointed to ours, and "did you mean" for a key's typo."""

from __future__ import annotations

import logging
from pathlib import Path

import aiohttp
import pytest
import yaml

from snapserve.server.errors import ConfigError, ModelSettingsError
from snapserve.server.models.settings import parse_model_settings
from snapserve.server.process.cli import load_config, main
from tests.support.servers import serving

PBTXT = """name: "digits"
max_batch_size: 8
dynamic_batching { max_queue_delay_microseconds: 500 }
instance_group [ { count: 2 kind: KIND_CPU } ]
"""


@pytest.mark.parametrize("argv, environ, port", [
    ([], {}, 8002),  # Triton's metrics port, as its users expect
    (["--metrics-port", "off"], {}, None),
    (["--no-metrics"], {}, None),
    ([], {"SNAPSERVE_METRICS_PORT": "off"}, None),
    (["--metrics-port", "0"], {"SNAPSERVE_METRICS_PORT": "off"}, 0),  # the flag wins
])
def test_metrics_are_on_by_default_on_8002_and_off_with_a_flag(
        tmp_path: Path, argv: list[str], environ: dict[str, str], port: int | None) -> None:
    settings, config = load_config(["--model-repository", str(tmp_path), *argv], environ)
    assert config.metrics_port == port
    assert config.metrics_endpoint.host == "127.0.0.1"  # loopback unless the host is set


def test_off_is_refused_where_a_port_must_be_served(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"port \(--port.*must be an integer, got 'off'"):
        load_config(["--model-repository", str(tmp_path), "--port", "off"], {})


def test_print_config_says_auto_and_needs_no_repository(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SNAPSERVE_METRICS_PORT", raising=False)
    assert main(["--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model_repository"] is None
    assert printed["instances"] == "auto" and printed["intra_op_threads"] == "auto"
    assert printed["metrics_port"] == 8002 and printed["port"] == 50051
    assert printed["http_port"] == 8000
    assert main(["--print-config", "--instances", "2", "--no-metrics"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["instances"] == 2 and printed["metrics_port"] == "off"


@pytest.mark.parametrize("argv, hint", [
    (["--model-store", "models"], "--model-store is Triton's flag; snapserve takes --model-repository DIR"),
    (["--model-store=models"], "--model-store is Triton's flag"),
    (["models"], "ensemble-server --model-repository models"),
    (["--max-batch", "8"], "unrecognized arguments: --max-batch 8; did you mean --max-batch-size?"),
])
def test_other_servers_spellings_point_to_model_repository(
        capsys: pytest.CaptureFixture[str], argv: list[str], hint: str) -> None:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    assert hint in capsys.readouterr().err


def test_a_config_file_typo_gets_did_you_mean(tmp_path: Path) -> None:
    config = tmp_path / "server.yaml"
    config.write_text("max_bach_size: 4\n")
    with pytest.raises(ConfigError, match=r"'max_bach_size' in .* is not a setting "
                                          r"\(did you mean 'max_batch_size'\?\)"):
        load_config(["--model-repository", str(tmp_path), "--config", str(config)], {})


def test_a_model_settings_typo_gets_did_you_mean_and_foreign_keys_their_equivalent() -> None:
    with pytest.raises(ModelSettingsError) as refused:
        parse_model_settings("max_bach_size: 4\nmax_queue_delay_microseconds: 100\n",
                             "model-settings.yaml")
    assert "'max_bach_size' (did you mean 'max_batch_size'?)" in str(refused.value)
    assert "'max_queue_delay_microseconds' -> max_queue_delay_ms (in milliseconds)" in str(refused.value)


async def test_a_triton_config_is_named_in_the_log_and_the_repository_index(
        model_repo: Path, caplog: pytest.LogCaptureFixture) -> None:
    (model_repo / "digits" / "config.pbtxt").write_text(PBTXT)
    (model_repo / "tiny" / "model-settings.json").write_text(
        '{"name": "tiny", "implementation": "mlserver_onnx.OnnxModel", "max_batch_size": 16, '
        '"max_batch_time": 0.002}')
    caplog.set_level(logging.WARNING, logger="snapserve.server")
    async with serving(model_repo, http_port=0) as running:
        async with aiohttp.ClientSession() as session:
            url = f"http://127.0.0.1:{running.http_port}/v2/repository/index"
            async with session.post(url, json={}) as answer:
                index = {entry["name"]: entry for entry in await answer.json()}
    digits = index["digits"]["reason"]
    assert "config.pbtxt (Triton's) is ignored: snapserve reads model-settings.yaml" in digits
    assert "max_batch_size: 8, max_queue_delay_ms: 0.5, instances: 2" in digits
    tiny = index["tiny"]["reason"]
    assert "model-settings.json (MLServer's) is ignored" in tiny
    assert "max_batch_size: 16, max_queue_delay_ms: 2.0" in tiny
    logged = [r.getMessage() for r in caplog.records if "is ignored" in r.getMessage()]
    assert len(logged) == 2  # once per model
