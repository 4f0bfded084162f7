"""AsyncEnsembleClient: the grpc.aio client, same methods as coroutines, plus predict_stream."""

from __future__ import annotations

import asyncio
import itertools
from types import TracebackType
from typing import Any, AsyncIterable, AsyncIterator, Iterable

import grpc
import numpy as np

from snapserve.client.batches import join_predictions, split_batch
from snapserve.client.channels import ChannelOption, ClientBase
from snapserve.client.credentials import Security
from snapserve.client.errors import ClientError
from snapserve.client.messages import (ModelInfo, ModelSummary, Prediction, build_request, decode_metadata,
                             decode_prediction, decode_summary)
from snapserve.client.messages import normalize as normalize_input  # `normalize` is a parameter name
from snapserve.proto.snapserve.v1 import ensemble_pb2 as pb

__all__ = ["AsyncEnsembleClient"]


class AsyncEnsembleClient(ClientBase):
    """asyncio client; make it inside the running loop (grpc.aio channels bind to it).

        async with AsyncEnsembleClient("127.0.0.1:50051") as client:
            prediction = await client.predict("digits", x)
    """

    def _open_channel(self, security: Security, options: list[ChannelOption]) -> Any:
        return security.aio_channel(self.target, options)

    async def predict(self, model: str, array: np.ndarray, version: int = 0,
                      member_probabilities: bool = False, normalize: bool = False,
                      timeout: float | None = None, request_id: str = "",
                      split: bool = True) -> Prediction:
        """As EnsembleClient.predict; the parts of a split batch are sent at once."""
        if normalize:
            array = normalize_input(array, (await self.get_model(model, version)).input)
        array = np.asarray(array)
        # A batch above the model's max_batch_size goes as several requests (split=False: the
        # server refuses it); the limit is GetModel's, fetched once and cached.
        limit = (await self.get_model(model, version)).max_batch_size if split and len(array) > 1 else 0

        async def one(part: np.ndarray) -> Prediction:
            request = build_request(model, part, version, member_probabilities, request_id)
            return decode_prediction(await self._call(self._stub.Predict, request, timeout),
                                     member_probabilities)

        return join_predictions(await asyncio.gather(*map(one, split_batch(array, limit))))

    async def predict_stream(self, model: str,
                             arrays: Iterable[np.ndarray] | AsyncIterable[np.ndarray],
                             version: int = 0, member_probabilities: bool = False,
                             normalize: bool = False, timeout: float | None = None,
                             ) -> AsyncIterator[Prediction | ClientError]:
        """One PredictStream call for many arrays; answers come in order. A request the server
        refused yields its ClientError (not raised) and the stream goes on; a failure of the
        stream itself raises ClientError."""
        info = await self.get_model(model, version) if normalize else None

        async def requests() -> AsyncIterator[pb.PredictRequest]:
            counter = itertools.count()
            async for array in _aiter(arrays):
                if info is not None:
                    array = normalize_input(array, info.input)
                yield build_request(model, array, version, member_probabilities, str(next(counter)))

        call = self._stub.PredictStream(requests(), timeout=self.timeout if timeout is None else timeout,
                                        metadata=self._security.metadata)
        try:
            async for response in call:
                if response.HasField("error"):
                    yield ClientError.from_code_value(response.error.code, response.error.message,
                                                      response.request_id)
                else:
                    yield decode_prediction(response, member_probabilities)
        except grpc.RpcError as exc:
            raise ClientError.from_rpc_error(exc) from exc
        finally:
            call.cancel()  # no-op when finished; stops the call if the caller broke out early

    async def list_models(self, timeout: float | None = None) -> list[ModelSummary]:
        response = await self._call(self._stub.ListModels, pb.ListModelsRequest(), timeout)
        return [decode_summary(m) for m in response.models]

    async def get_model(self, name: str, version: int = 0, refresh: bool = False,
                        timeout: float | None = None) -> ModelInfo:
        key = (name, version)
        if refresh or key not in self._models:
            meta = await self._call(self._stub.GetModel,
                                    pb.GetModelRequest(model=name, version=version), timeout)
            self._models[key] = decode_metadata(meta)
        return self._models[key]

    async def _call(self, method, request, timeout: float | None):  # type: ignore[no-untyped-def]
        try:
            return await method(request, timeout=self.timeout if timeout is None else timeout,
                                metadata=self._security.metadata)
        except grpc.RpcError as exc:
            raise ClientError.from_rpc_error(exc) from exc

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncEnsembleClient:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()


async def _aiter(arrays: Iterable[np.ndarray] | AsyncIterable[np.ndarray]) -> AsyncIterator[np.ndarray]:
    if isinstance(arrays, AsyncIterable):
        async for array in arrays:
            yield array
    else:
        for array in arrays:
            yield array
