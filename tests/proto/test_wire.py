"""Answers assembled from bytes (proto/wire.py) are the messages the slow path builds."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from snapserve.proto.inference import grpc_service_pb2 as kpb
from snapserve.proto.scores import ensemble_scores
from snapserve.proto.snapserve.v1 import ensemble_pb2 as pb
from snapserve.proto.wire import length_delimited, tag, varint
from snapserve.server.api.kserve_messages import (DEFAULT_OUTPUTS, OUTPUTS, encode_infer_response,
                                                  encode_infer_response_bytes)
from snapserve.server.api.messages import encode_prediction, encode_prediction_bytes
from snapserve.server.engine.batcher import BatcherConfig
from snapserve.server.models.ensemble import ServedEnsemble
from snapserve.server.models.loading import load_version
from tests.support.servers import pinned_runtime


@pytest.mark.parametrize("value", [0, 1, 127, 128, 300, 16383, 16384, 2**21 + 5, 2**35, 2**63 - 1])
def test_varint_is_protobufs_own(value: int) -> None:
    # Tensor.shape is packed (field 2, length-delimited): key, length, then the value's varint
    encoded = varint(value)
    assert pb.Tensor(shape=[value]).SerializeToString() == b"\x12" + varint(len(encoded)) + encoded


def test_length_delimited_is_protobufs_own() -> None:
    payload = b"x" * 300
    assert (length_delimited(3, payload)
            == pb.PredictResponse(request_id=payload.decode()).SerializeToString())
    assert tag(6) == b"\x32"
    with pytest.raises(ValueError, match="non-negative"):
        varint(-1)


@pytest.fixture
def served(model_repo: Path) -> ServedEnsemble:
    return load_version(model_repo / "digits" / "1", pinned_runtime(device="cpu"),
                        BatcherConfig(max_batch_size=8))


def _batch_rows(served: ServedEnsemble, start: int, stop: int):  # type: ignore[no-untyped-def]
    classes, members = len(served.manifest.classes), served.runtime.members
    rng = np.random.default_rng(start)
    member_probs = rng.dirichlet(np.ones(classes), size=(8, members)).astype(np.float32)
    return ensemble_scores(member_probs).rows(start, stop)


@pytest.mark.parametrize("rows", [(0, 1), (2, 5)])
@pytest.mark.parametrize("outputs", [DEFAULT_OUTPUTS, ("member_kl", "probabilities"),
                                     tuple(OUTPUTS)])
def test_kserve_answer_from_bytes_equals_the_built_message(
        served: ServedEnsemble, rows: tuple[int, int], outputs: tuple[str, ...]) -> None:
    scores = _batch_rows(served, *rows)
    for _ in range(2):  # built, then from the cached head
        fast = kpb.ModelInferResponse.FromString(
            encode_infer_response_bytes(scores, served, "req-7", outputs))
        assert fast == encode_infer_response(scores, served, "req-7", outputs)
        assert [o.name for o in fast.outputs] == list(outputs)


@pytest.mark.parametrize("rows", [(0, 1), (1, 4)])
@pytest.mark.parametrize("members", [False, True])
def test_native_answer_from_bytes_equals_the_built_message(
        served: ServedEnsemble, rows: tuple[int, int], members: bool) -> None:
    scores = _batch_rows(served, *rows)
    for _ in range(2):
        fast = pb.PredictResponse.FromString(encode_prediction_bytes(scores, served, "r", members))
        assert fast == encode_prediction(scores, served, "r", members)
        assert list(fast.top_label) == [served.manifest.classes[i] for i in scores.top_class]


def test_an_output_of_another_dtype_takes_the_slow_path(served: ServedEnsemble) -> None:
    scores = _batch_rows(served, 0, 2)
    wide = dataclasses.replace(scores, probabilities=scores.probabilities.astype(np.float64))
    kserve = kpb.ModelInferResponse.FromString(
        encode_infer_response_bytes(wide, served, "", DEFAULT_OUTPUTS))
    assert kserve == encode_infer_response(wide, served, "", DEFAULT_OUTPUTS)
    assert kserve.outputs[0].datatype == "FP64"
    native = pb.PredictResponse.FromString(encode_prediction_bytes(wide, served, "", False))
    assert native == encode_prediction(wide, served, "", False)
