"""EnsembleClient: the blocking client for snapserve.v1.EnsembleService."""

from __future__ import annotations

from types import TracebackType
from typing import Any

import grpc
import numpy as np

from snapserve.client.batches import join_predictions, split_batch
from snapserve.client.channels import (DEFAULT_TARGET, MAX_MESSAGE_BYTES, ChannelOption, ClientBase,
                                       channel_options)
from snapserve.client.credentials import Security
from snapserve.client.errors import ClientError
from snapserve.client.messages import (ModelInfo, ModelSummary, Prediction, build_request, decode_metadata,
                             decode_prediction, decode_summary)
from snapserve.client.messages import normalize as normalize_input  # `normalize` is a parameter name
from snapserve.proto.snapserve.v1 import ensemble_pb2 as pb

__all__ = ["DEFAULT_TARGET", "EnsembleClient", "MAX_MESSAGE_BYTES", "channel_options"]


class EnsembleClient(ClientBase):
    """Blocking client. Every call raises ClientError (status code + server message) on failure.

        with EnsembleClient("127.0.0.1:50051") as client:
            prediction = client.predict("digits", x)

    Calls refused with UNAVAILABLE or RESOURCE_EXHAUSTED are retried with backoff and jitter
    (`retry`; None: never), within the call's deadline (`timeout`, default DEFAULT_TIMEOUT_S;
    None: no deadline), balanced over every address of `target` (client/channels.py).
    """

    def _open_channel(self, security: Security, options: list[ChannelOption]) -> Any:
        return security.channel(self.target, options)

    def predict(self, model: str, array: np.ndarray, version: int = 0,
                member_probabilities: bool = False, normalize: bool = False,
                timeout: float | None = None, request_id: str = "",
                split: bool = True) -> Prediction:
        """Scores for a batch `array` ([B, ...]) of raw values. `normalize=True` is for versions
        exported before their graphs normalised (GetModel's input kind `normalized`): it applies
        the model's (x - mean) / std first (the spec is fetched once and cached); for the others
        it is a no-op with a warning. `request_id`: the id the
        server logs this request under (default: one it makes up); `Prediction.request_id`."""
        if normalize:
            array = normalize_input(array, self.get_model(model, version).input)
        array = np.asarray(array)
        # A batch above the model's max_batch_size goes as several requests (split=False: the
        # server refuses it); the limit is GetModel's, fetched once and cached.
        limit = self.get_model(model, version).max_batch_size if split and len(array) > 1 else 0
        parts = []
        for part in split_batch(array, limit):
            request = build_request(model, part, version, member_probabilities, request_id)
            parts.append(decode_prediction(self._call(self._stub.Predict, request, timeout),
                                           member_probabilities))
        return join_predictions(parts)

    def list_models(self, timeout: float | None = None) -> list[ModelSummary]:
        response = self._call(self._stub.ListModels, pb.ListModelsRequest(), timeout)
        return [decode_summary(m) for m in response.models]

    def get_model(self, name: str, version: int = 0, refresh: bool = False,
                  timeout: float | None = None) -> ModelInfo:
        """Model metadata, cached per (name, version) until `refresh`."""
        key = (name, version)
        if refresh or key not in self._models:
            meta = self._call(self._stub.GetModel, pb.GetModelRequest(model=name, version=version),
                              timeout)
            self._models[key] = decode_metadata(meta)
        return self._models[key]

    def _call(self, method, request, timeout: float | None):  # type: ignore[no-untyped-def]
        try:
            return method(request, timeout=self.timeout if timeout is None else timeout,
                          metadata=self._security.metadata)
        except grpc.RpcError as exc:
            raise ClientError.from_rpc_error(exc) from exc

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> EnsembleClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
