"""The KServe v2 / Open Inference Protocol service `inference.GRPCInferenceService`.

Decode, call, encode, like the native service: inference goes through the same registry,
batcher and runtime (`ModelRegistry.predict`), errors through the same decorator and table
(api/status.py).
Model versions are strings here ("" = the default, the newest loaded).
"""

from __future__ import annotations

import logging
from typing import AsyncIterator

import grpc

from snapserve.proto.inference import grpc_service_pb2 as kpb
from snapserve.proto.inference import grpc_service_pb2_grpc as kpb_grpc
from snapserve.proto.version import package_version
from snapserve.server.api.health import SERVING, HealthServicer
from snapserve.server.api.intake import Intake, queued
from snapserve.server.api.kserve_messages import (decode_infer_input, encode_infer_response,
                                                  encode_model_config, encode_model_metadata,
                                                  encode_statistics, parse_version, payload_bytes,
                                                  requested_outputs)
from snapserve.server.api.status import abort_on_error, answer_in_order, observed_request
from snapserve.server.errors import InvalidInput, RepositoryControlDenied
from snapserve.server.metrics import API_KSERVE, ServerMetrics
from snapserve.server.models.lifecycle import ModelManager
from snapserve.server.models.policy import check_model_name

__all__ = ["EXTENSIONS", "SERVER_NAME", "KServeServicer"]

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


class KServeServicer(kpb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, manager: ModelManager, health: HealthServicer, metrics: ServerMetrics,
                 max_stream_in_flight: int = 64, intake: Intake | None = None) -> None:
        self._manager = manager
        self._intake = Intake() if intake is None else intake
        self._registry = manager.registry
        self._health = health
        self._metrics = metrics
        self._max_stream_in_flight = max_stream_in_flight

    # -- server and model state ----------------------------------------------------------------

    @abort_on_error
    async def ServerLive(self, request: kpb.ServerLiveRequest,
                         context: grpc.aio.ServicerContext) -> kpb.ServerLiveResponse:
        return kpb.ServerLiveResponse(live=True)

    @abort_on_error
    async def ServerReady(self, request: kpb.ServerReadyRequest,
                          context: grpc.aio.ServicerContext) -> kpb.ServerReadyResponse:
        # The same answer as the health service for "": loaded, and not draining.
        return kpb.ServerReadyResponse(ready=self._health.status("") == SERVING)

    @abort_on_error
    async def ModelReady(self, request: kpb.ModelReadyRequest,
                         context: grpc.aio.ServicerContext) -> kpb.ModelReadyResponse:
        version = parse_version(request.version, "version")
        loaded = request.name in self._registry and (
            version == 0 or version in self._registry.versions(request.name))
        # An unknown model is not ready, not an error (as Triton answers).
        return kpb.ModelReadyResponse(ready=loaded and self._health.status(request.name) == SERVING)

    @abort_on_error
    async def ServerMetadata(self, request: kpb.ServerMetadataRequest,
                             context: grpc.aio.ServicerContext) -> kpb.ServerMetadataResponse:
        return kpb.ServerMetadataResponse(name=SERVER_NAME, version=package_version(),
                                          extensions=EXTENSIONS)

    @abort_on_error
    async def ModelMetadata(self, request: kpb.ModelMetadataRequest,
                            context: grpc.aio.ServicerContext) -> kpb.ModelMetadataResponse:
        served = self._registry.get(request.name, parse_version(request.version, "version"))
        return encode_model_metadata(self._registry, served)

    @abort_on_error
    async def ModelConfig(self, request: kpb.ModelConfigRequest,
                          context: grpc.aio.ServicerContext) -> kpb.ModelConfigResponse:
        served = self._registry.get(request.name, parse_version(request.version, "version"))
        return kpb.ModelConfigResponse(config=encode_model_config(served, self._manager.config))

    @abort_on_error
    async def ModelStatistics(self, request: kpb.ModelStatisticsRequest,
                              context: grpc.aio.ServicerContext) -> kpb.ModelStatisticsResponse:
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

    async def _infer(self, request: kpb.ModelInferRequest,
                     timeout: float | None) -> kpb.ModelInferResponse:
        with observed_request(self._metrics, request.model_name, API_KSERVE):
            version = parse_version(request.model_version)
            served = self._registry.get(request.model_name, version)
            x = await self._intake.run(payload_bytes(request), decode_infer_input, request,
                                       served.manifest.input, served.max_batch_size)
            outputs = requested_outputs(request)
            queued()
            served, scores = await self._registry.predict(served, version, x, timeout)
            return encode_infer_response(scores, served, request.id, outputs)

    @abort_on_error
    async def ModelInfer(self, request: kpb.ModelInferRequest,
                         context: grpc.aio.ServicerContext) -> kpb.ModelInferResponse:
        return await self._infer(request, context.time_remaining())

    async def _stream_answer(self, request: kpb.ModelInferRequest) -> kpb.ModelStreamInferResponse:
        return kpb.ModelStreamInferResponse(infer_response=await self._infer(request, None))

    @abort_on_error
    def ModelStreamInfer(self, request_iterator: AsyncIterator[kpb.ModelInferRequest],
                         context: grpc.aio.ServicerContext
                         ) -> AsyncIterator[kpb.ModelStreamInferResponse]:
        return answer_in_order(request_iterator, self._stream_answer, _stream_error,
                               self._max_stream_in_flight)

    # -- repository ------------------------------------------------------------------------------

    @abort_on_error
    async def RepositoryIndex(self, request: kpb.RepositoryIndexRequest,
                              context: grpc.aio.ServicerContext) -> kpb.RepositoryIndexResponse:
        entries = await self._manager.index()
        return kpb.RepositoryIndexResponse(models=[
            kpb.RepositoryIndexResponse.ModelIndex(name=e.name, version=str(e.version),
                                                   state=e.state, reason=e.reason)
            for e in entries if e.state == "READY" or not request.ready])

    def authorize_repository_control(self, context: grpc.aio.ServicerContext,
                                     model_name: str) -> str:
        """The one check before a load or unload, which gives the model to change:
        RepositoryControlDenied (PERMISSION_DENIED) unless the server runs with
        --allow-repository-control, InvalidModelName unless `model_name` is a plain name.

        Hook for authorisation: a per-caller rule (a token or client certificate allowed to
        change the repository, from `context.invocation_metadata()` / `context.auth_context()`)
        goes here, so both RPCs get it and nothing else has to change.
        """
        if not self._manager.config.allow_repository_control:
            raise RepositoryControlDenied(
                "repository control (RepositoryModelLoad/Unload) is disabled on this server; "
                "start it with --allow-repository-control to allow it")
        return check_model_name(model_name)

    @abort_on_error
    async def RepositoryModelLoad(self, request: kpb.RepositoryModelLoadRequest,
                                  context: grpc.aio.ServicerContext
                                  ) -> kpb.RepositoryModelLoadResponse:
        name = self.authorize_repository_control(context, request.model_name)
        if request.parameters:
            raise InvalidInput(f"load parameters {sorted(request.parameters)} are not "
                               "supported: a model version is loaded from its folder as is "
                               "(no config or file overrides)")
        await self._manager.load_model(name)
        logger.info("model %s loaded by request", request.model_name)
        return kpb.RepositoryModelLoadResponse()

    @abort_on_error
    async def RepositoryModelUnload(self, request: kpb.RepositoryModelUnloadRequest,
                                    context: grpc.aio.ServicerContext
                                    ) -> kpb.RepositoryModelUnloadResponse:
        name = self.authorize_repository_control(context, request.model_name)
        unknown = set(request.parameters) - UNLOAD_PARAMETERS
        if unknown:
            raise InvalidInput(f"unload parameters {sorted(unknown)} are not supported")
        await self._manager.unload_model(name)
        logger.info("model %s unloaded by request", request.model_name)
        return kpb.RepositoryModelUnloadResponse()
