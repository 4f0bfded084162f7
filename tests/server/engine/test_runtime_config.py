"""RuntimeConfig's new settings are checked once, with the field named."""

from __future__ import annotations

import pytest

from snapserve.server.errors import ConfigError
from snapserve.server.engine.runtime import RuntimeConfig


@pytest.mark.parametrize("kwargs, field", [
    ({"instances": -1}, "instances"),
    ({"graph": "both"}, "graph"),
    ({"precision": "int8"}, "precision"),
    ({"cuda_graph_batch_sizes": (8, 4)}, "cuda_graph_batch_sizes"),
    ({"cuda_graph_batch_sizes": (0,)}, "cuda_graph_batch_sizes"),
])
def test_bad_settings_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        RuntimeConfig(**kwargs)


def test_server_cli_maps_the_new_flags() -> None:
    from snapserve.server.process.cli import load_config

    _, config = load_config([
        "--model-repository", ".", "--instances", "3", "--graph", "fused", "--precision", "fp16",
        "--cuda-graph-batch-sizes", "1,2,4", "--no-adaptive-wait"], {})
    assert (config.runtime.instances, config.runtime.graph, config.runtime.precision,
            config.runtime.cuda_graph_batch_sizes) == (3, "fused", "fp16", (1, 2, 4))
    assert config.batcher.adaptive_wait is False


@pytest.mark.parametrize("args, env, expected", [
    ([], {}, True),
    (["--no-io-binding"], {}, False),
    (["--io-binding"], {"SNAPSERVE_IO_BINDING": "false"}, True),
    ([], {"SNAPSERVE_IO_BINDING": "false"}, False),
])
def test_io_binding_can_be_switched_off(args: list[str], env: dict[str, str], expected: bool) -> None:
    from snapserve.server.process.cli import load_config

    _, config = load_config(["--model-repository", ".", *args], env)
    assert config.runtime.io_binding is expected


def test_cuda_graphs_without_io_binding_name_the_fields() -> None:
    with pytest.raises(ConfigError, match="cuda_graph_batch_sizes needs io_binding"):
        RuntimeConfig(cuda_graph_batch_sizes=(1, 2), io_binding=False)
