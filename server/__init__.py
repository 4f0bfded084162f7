"""snapserve server: serves a model repository of snapshot ensembles over gRPC and HTTP.

    running = await start_server(ServerConfig(model_repository=Path("models"), port=0))
    ...  # talk to 127.0.0.1:{running.port}
    await running.stop(grace=1.0)

    ensemble = Ensemble.load("models/digits/1")  # a version in this process, no server
    scores = ensemble.predict(x)                 # the server's scores for the same inputs

Three wings, arrows one way: api (the transports around one inference pipeline, status codes,
health, security, drain) -> models (registry, lifecycle, version policy, manifest, the served
version) -> engine (batcher, ONNX Runtime sessions, planning); observability (metrics, logs,
tracing, request context) and process (cli, workers, heap, healthcheck) beside them; app.py wires
them. Never imports torch or trainer/.

The names below are loaded on first use: importing a light part of the server (the batcher, the
errors) never loads grpc, aiohttp or ONNX Runtime.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from snapserve.server.app import RunningServer, start_server
    from snapserve.server.config import BatcherConfig, RepositoryConfig, RuntimeConfig, ServerConfig
    from snapserve.server.engine.batcher import Batcher
    from snapserve.server.errors import ConfigError
    from snapserve.server.inprocess import Ensemble

# Public name -> the module that defines it.
_EXPORTS = {
    "Batcher": "snapserve.server.engine.batcher",
    "BatcherConfig": "snapserve.server.config",
    "ConfigError": "snapserve.server.errors",
    "Ensemble": "snapserve.server.inprocess",
    "RepositoryConfig": "snapserve.server.config",
    "RunningServer": "snapserve.server.app",
    "RuntimeConfig": "snapserve.server.config",
    "ServerConfig": "snapserve.server.config",
    "start_server": "snapserve.server.app",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
