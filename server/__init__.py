"""snapserve server: serves a model repository of snapshot ensembles over gRPC.

    running = await start_server(ServerConfig(model_repository=Path("models"), port=0))
    ...  # talk to 127.0.0.1:{running.port}
    await running.stop(grace=1.0)

Three wings, arrows one way: api (the gRPC services, codecs, status codes, health, security,
drain) -> models (registry, lifecycle, version policy, manifest, the served version) -> engine
(batcher, ONNX Runtime sessions); app.py wires them. Never imports torch or trainer/.
"""

from snapserve.server.app import RunningServer, start_server
from snapserve.server.config import ServerConfig
from snapserve.server.engine.batcher import Batcher, BatcherConfig
from snapserve.server.engine.runtime import RuntimeConfig
from snapserve.server.errors import ConfigError
from snapserve.server.models.policy import RepositoryConfig

__all__ = ["Batcher", "BatcherConfig", "ConfigError", "RepositoryConfig", "RunningServer",
           "RuntimeConfig", "ServerConfig", "start_server"]
