"""snapserve server: serves a model repository of snapshot ensembles over gRPC.

    running = await start_server(ServerConfig(model_repository=Path("models"), port=0))
    ...  # talk to 127.0.0.1:{running.port}
    await running.stop(grace=1.0)

Layers, one direction: service (gRPC) -> registry -> ServedEnsemble (input check, batcher)
-> runtime (ONNX Runtime) -> scores (numpy). Never imports torch or trainer/.
"""

from snapserve.server.app import RunningServer, start_server
from snapserve.server.batcher import Batcher, BatcherConfig
from snapserve.server.config import ServerConfig
from snapserve.server.errors import ConfigError
from snapserve.server.lifecycle import RepositoryConfig
from snapserve.server.runtime import RuntimeConfig

__all__ = ["Batcher", "BatcherConfig", "ConfigError", "RepositoryConfig", "RunningServer",
           "RuntimeConfig", "ServerConfig", "start_server"]
