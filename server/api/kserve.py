"""The KServe v2 / Open Inference Protocol: its operations (`KServeCore`) and its gRPC service
`inference.GRPCInferenceService` (`KServeServicer`).

`KServeCore` holds the protocol's logic on its messages and knows no transport: the gRPC
servicer here and the REST front end (api/http.py) both call it, so the two answer alike, with
the same checks and messages. Inference goes through the one pipeline (api/pipeline.py
`DataPlane`, shared as `core.plane`), errors through the same table (api/status.py). Model
versions are strings here ("" = the default, the newest loaded).
"""

from __future__ import annotations

import logging
import inspect
from typing import Any, AsyncIterator, Callable

import grpc

from snapserve.proto.inference import grpc_service_pb2 as kpb
from snapserve.proto.inference import grpc_service_pb2_grpc as kpb_grpc
from snapserve.proto.version import package_version
from snapserve.server.api.health import SERVING, HealthServicer
from snapserve.server.api.intake import Intake, Ticket
from snapserve.server.api.kserve_messages import (decode_infer, encode_infer, encode_infer_bytes,
                                                  encode_model_config, encode_model_metadata,
                                                  encode_statistics, payload_bytes)
from snapserve.server.api.pipeline import DataPlane, Encode, InferRequest, parse_version
from snapserve.server.api.status import abort_on_error
from snapserve.server.api.streams import answer_in_order
from snapserve.server.errors import InvalidInput, RepositoryControlDenied
from snapserve.server.observability.metrics import API_KSERVE, ServerMetrics
from snapserve.server.models.lifecycle import ModelManager
from snapserve.server.models.policy import check_model_name

__all__ = ["EXTENSIONS", "SERVER_NAME", "KServeCore", "KServeServicer"]

logger = logging.getLogger(__name__)

SERVER_NAME = "snapserve"
# Triton's names for the optional parts of the protocol this server implements.
EXTENSIONS = ("model_repository", "model_configuration", "statistics")
# RepositoryModelUnload parameters tritonclient always sends; snapserve models have no dependents.
UNLOAD_PARAMETERS = frozenset({"unload_dependents"})


def _stream_error(request: kpb.ModelInferRequest, code: grpc.StatusCode,
                  message: str) -> kpb.ModelStreamInferResponse:
    """A stream's answer to a request that failed, carrying its id: the stream goes on."""
    return kpb.ModelStreamInferResponse(
        error_message=message,
        infer_response=kpb.ModelInferResponse(model_name=request.model_name,
                                              model_version=request.model_version, id=request.id))


class KServeCore:
    """The protocol's operations: a request message in, a response message out, named
    exceptions for failures (api/status.py maps them for each transport)."""

    def __init__(self, manager: ModelManager, health: HealthServicer, metrics: ServerMetrics,
                 intake: Intake | None = None) -> None:
        self._manager = manager
        self._registry = manager.registry
        self._health = health
        self.plane = DataPlane(self._registry, Intake() if intake is None else intake, metrics)

    @property
    def intake(self) -> Intake:
        return self.plane.intake

    # -- server and model state ----------------------------------------------------------------

    def server_live(self, request: kpb.ServerLiveRequest) -> kpb.ServerLiveResponse:
        return kpb.ServerLiveResponse(live=True)

    def server_ready(self, request: kpb.ServerReadyRequest) -> kpb.ServerReadyResponse:
        # The same answer as the health service for "": loaded, and not draining.
        return kpb.ServerReadyResponse(ready=self._health.status("") == SERVING)

    def not_ready_reason(self) -> str:
        return self._health.not_ready_reason() or "the server is ready"

    def model_ready(self, request: kpb.ModelReadyRequest) -> kpb.ModelReadyResponse:
        version = parse_version(request.version, "version")
        loaded = request.name in self._registry and (
            version == 0 or version in self._registry.versions(request.name))
        # An unknown model is not ready, not an error (as Triton answers).
        return kpb.ModelReadyResponse(ready=loaded and self._health.status(request.name) == SERVING)

    def server_metadata(self, request: kpb.ServerMetadataRequest) -> kpb.ServerMetadataResponse:
        return kpb.ServerMetadataResponse(name=SERVER_NAME, version=package_version(),
                                          extensions=EXTENSIONS)

    def model_metadata(self, request: kpb.ModelMetadataRequest) -> kpb.ModelMetadataResponse:
        served = self._registry.get(request.name, parse_version(request.version, "version"))
        return encode_model_metadata(self._registry, served)

    def model_config(self, request: kpb.ModelConfigRequest) -> kpb.ModelConfigResponse:
        served = self._registry.get(request.name, parse_version(request.version, "version"))
        return kpb.ModelConfigResponse(config=encode_model_config(served, self._manager.config))

    def model_statistics(self, request: kpb.ModelStatisticsRequest) -> kpb.ModelStatisticsResponse:
        """Every loaded version of one model (name) or of all (no name); one when asked."""
        version = parse_version(request.version, "version")
        if request.name:
            served = ([self._registry.get(request.name, version)] if version else
                      [self._registry.get(request.name, v)
                       for v in self._registry.versions(request.name)])
        elif version:
            raise InvalidInput("a version needs a model name")
        else:
            served = self._registry.loaded()
        return kpb.ModelStatisticsResponse(model_stats=[encode_statistics(s) for s in served])

    # -- inference -------------------------------------------------------------------------------

    async def infer(self, request: kpb.ModelInferRequest, timeout: float | None,
                    api: str = API_KSERVE) -> kpb.ModelInferResponse:
        """One inference; `api` labels it in the metrics (which front end it came through)."""
        return await self._infer(request, timeout, encode_infer, api)

    async def infer_bytes(self, request: kpb.ModelInferRequest, timeout: float | None,
                          ticket: Ticket | None = None) -> bytes:
        """One inference over gRPC: the serialized answer, assembled from bytes (proto/wire.py)."""
        return await self._infer(request, timeout, encode_infer_bytes, API_KSERVE, ticket)

    def _infer(self, request: kpb.ModelInferRequest, timeout: float | None,
               encode: Encode[kpb.ModelInferRequest, Any], api: str,
               ticket: Ticket | None = None) -> Any:
        return self.plane.infer(
            InferRequest(request.model_name, request.model_version, request.id, request,
                         decode_infer, payload_bytes(request), timeout, ticket), encode, api)

    # -- repository ------------------------------------------------------------------------------

    async def repository_index(self, request: kpb.RepositoryIndexRequest
                               ) -> kpb.RepositoryIndexResponse:
        entries = await self._manager.index()
        return kpb.RepositoryIndexResponse(models=[
            kpb.RepositoryIndexResponse.ModelIndex(name=e.name, version=str(e.version),
                                                   state=e.state, reason=e.reason)
            for e in entries if e.state == "READY" or not request.ready])

    def authorize_repository_control(self, model_name: str) -> str:
        """The one check before a load or unload, which gives the model to change:
        RepositoryControlDenied (PERMISSION_DENIED) unless the server runs with
        --allow-repository-control, InvalidModelName unless `model_name` is a plain name.

        Hook for authorisation: a per-caller rule (a token or client certificate allowed to
        change the repository) goes here, with the caller's identity passed in by each front
        end (gRPC metadata / auth context, HTTP headers / peer certificate), so both RPCs on
        both transports get it.
        """
        if not self._manager.config.allow_repository_control:
            raise RepositoryControlDenied(
                "repository control (RepositoryModelLoad/Unload) is disabled on this server; "
                "start it with --allow-repository-control to allow it")
        return check_model_name(model_name)

    async def repository_model_load(self, request: kpb.RepositoryModelLoadRequest
                                    ) -> kpb.RepositoryModelLoadResponse:
        name = self.authorize_repository_control(request.model_name)
        if request.parameters:
            raise InvalidInput(f"load parameters {sorted(request.parameters)} are not "
                               "supported: a model version is loaded from its folder as is "
                               "(no config or file overrides)")
        await self._manager.load_model(name)
        logger.info("model %s loaded by request", request.model_name)
        return kpb.RepositoryModelLoadResponse()

    async def repository_model_unload(self, request: kpb.RepositoryModelUnloadRequest
                                      ) -> kpb.RepositoryModelUnloadResponse:
        name = self.authorize_repository_control(request.model_name)
        unknown = set(request.parameters) - UNLOAD_PARAMETERS
        if unknown:
            raise InvalidInput(f"unload parameters {sorted(unknown)} are not supported")
        await self._manager.unload_model(name)
        logger.info("model %s unloaded by request", request.model_name)
        return kpb.RepositoryModelUnloadResponse()


def _delegate(operation: str) -> Callable[..., Any]:
    """A handler that answers with `core.<operation>(request)` (a message, or a coroutine of
    one), its errors ending the call with their status (abort_on_error)."""
    @abort_on_error
    async def handler(self: KServeServicer, request: Any,
                      context: grpc.aio.ServicerContext) -> Any:
        answer = getattr(self.core, operation)(request)
        return await answer if inspect.isawaitable(answer) else answer

    handler.__name__ = handler.__qualname__ = operation
    return handler


class KServeServicer(kpb_grpc.GRPCInferenceServiceServicer):
    """The protocol over gRPC: each handler calls `core` (KServeCore), errors end the call with
    their status (abort_on_error). Every RPC but inference is one KServeCore operation on the
    same message."""

    def __init__(self, manager: ModelManager, health: HealthServicer, metrics: ServerMetrics,
                 max_stream_in_flight: int = 64, intake: Intake | None = None) -> None:
        self.core = KServeCore(manager, health, metrics, intake)
        self._max_stream_in_flight = max_stream_in_flight

    ServerLive = _delegate("server_live")
    ServerReady = _delegate("server_ready")
    ModelReady = _delegate("model_ready")
    ServerMetadata = _delegate("server_metadata")
    ModelMetadata = _delegate("model_metadata")
    ModelConfig = _delegate("model_config")
    ModelStatistics = _delegate("model_statistics")
    RepositoryIndex = _delegate("repository_index")
    RepositoryModelLoad = _delegate("repository_model_load")
    RepositoryModelUnload = _delegate("repository_model_unload")

    @abort_on_error
    async def ModelInfer(self, request: kpb.ModelInferRequest,
                         context: grpc.aio.ServicerContext, ticket: Ticket | None = None) -> bytes:
        return await self.core.infer_bytes(request, context.time_remaining(), ticket)

    async def _stream_answer(self, request: kpb.ModelInferRequest,
                             timeout: float | None) -> kpb.ModelStreamInferResponse:
        return kpb.ModelStreamInferResponse(infer_response=await self.core.infer(request, timeout))

    @abort_on_error
    def ModelStreamInfer(self, request_iterator: AsyncIterator[kpb.ModelInferRequest],
                         context: grpc.aio.ServicerContext
                         ) -> AsyncIterator[kpb.ModelStreamInferResponse]:
        # What is left of the stream's deadline goes into the batcher with each request.
        return answer_in_order(
            request_iterator, lambda request: self._stream_answer(request, context.time_remaining()),
            _stream_error, self._max_stream_in_flight, self.core.intake.stream_room)
