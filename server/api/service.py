"""The native gRPC service `snapserve.v1.EnsembleService`: a thin codec around the pipeline.

Inference hands the parsed request, its decoder and encoder (api/messages.py) and the call's
intake ticket to the one pipeline (api/pipeline.py). Errors become status codes in
api/status.py (`abort_on_error`), as for every service.
"""

from __future__ import annotations

from typing import AsyncIterator

import grpc

from snapserve.proto.snapserve.v1 import ensemble_pb2 as pb
from snapserve.proto.snapserve.v1 import ensemble_pb2_grpc as pb_grpc
from snapserve.server.api.intake import Intake, Ticket
from snapserve.server.api.messages import (decode_predict, encode_metadata, encode_predict,
                                           encode_summary)
from snapserve.server.api.pipeline import DataPlane, InferRequest
from snapserve.server.api.status import abort_on_error
from snapserve.server.api.streams import answer_in_order
from snapserve.server.observability.metrics import API_NATIVE, ServerMetrics
from snapserve.server.models.registry import ModelRegistry

__all__ = ["EnsembleServicer"]


def _error_answer(request: pb.PredictRequest, code: grpc.StatusCode,
                  message: str) -> pb.PredictResponse:
    """A stream's answer to a request that failed: the stream never fails for it."""
    return pb.PredictResponse(model=request.model, version=request.version,
                              request_id=request.request_id,
                              error=pb.Error(code=code.value[0], message=message))


class EnsembleServicer(pb_grpc.EnsembleServiceServicer):
    def __init__(self, registry: ModelRegistry, max_stream_in_flight: int = 64,
                 metrics: ServerMetrics | None = None, intake: Intake | None = None) -> None:
        self._registry = registry
        self._max_stream_in_flight = max_stream_in_flight
        self.plane = DataPlane(registry, Intake() if intake is None else intake,
                               ServerMetrics(registry) if metrics is None else metrics)

    async def _predict(self, request: pb.PredictRequest, timeout: float | None = None,
                       ticket: Ticket | None = None) -> bytes:
        # Serialized by the encoder (proto/wire.py): gRPC sends the bytes as they are.
        return await self.plane.infer(
            InferRequest(request.model, request.version, request.request_id, request,
                         decode_predict, len(request.input.data), timeout, ticket),
            encode_predict, API_NATIVE)

    @abort_on_error
    async def Predict(self, request: pb.PredictRequest, context: grpc.aio.ServicerContext,
                      ticket: Ticket | None = None) -> bytes:
        return await self._predict(request, context.time_remaining(), ticket)

    @abort_on_error
    def PredictStream(self, request_iterator: AsyncIterator[pb.PredictRequest],
                      context: grpc.aio.ServicerContext) -> AsyncIterator[pb.PredictResponse]:
        # Each request carries what is left of the stream's deadline into the batcher, so one
        # that waits past it is dropped before compute (counted as expired, not cancelled).
        return answer_in_order(request_iterator,
                               lambda request: self._predict(request, context.time_remaining()),
                               _error_answer, self._max_stream_in_flight,
                               self.plane.intake.stream_room)

    @abort_on_error
    async def ListModels(self, request: pb.ListModelsRequest,
                         context: grpc.aio.ServicerContext) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(
            models=[encode_summary(self._registry, name) for name in self._registry.names()])

    @abort_on_error
    async def GetModel(self, request: pb.GetModelRequest,
                       context: grpc.aio.ServicerContext) -> pb.ModelMetadata:
        return encode_metadata(self._registry, self._registry.get(request.model, request.version))
