"""The client's Prediction and its decoding, driven by the score table (no server needed)."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np

from snapserve.client.messages import Prediction, decode_prediction, prediction_type
from snapserve.proto.scores import SCORE_NAMES, SCORES, ScoreSpec, ensemble_scores, softmax
from snapserve.proto.snapserve.v1 import ensemble_pb2 as pb
from snapserve.proto.tensors import to_tensor

LABELS = np.array(["cat", "dog", "eel", "fox"])


def answer(batch: int = 3, members: int = 2) -> pb.PredictResponse:
    """A PredictResponse with every score of the table, as the server fills it."""
    probs = softmax(np.random.default_rng(0).normal(size=(batch, members, len(LABELS))))
    computed = ensemble_scores(probs)
    response = pb.PredictResponse(model="m", version=2, request_id="r-1",
                                  top_label=LABELS[computed.top_class].tolist())
    for name in SCORE_NAMES:
        to_tensor(getattr(computed, name), getattr(response, name))
    return response


def test_the_table_drives_the_prediction_fields() -> None:
    names = [f.name for f in dataclasses.fields(Prediction)]
    scores = list(SCORE_NAMES)
    scores.insert(scores.index("top_class") + 1, "top_label")
    assert names == ["model", "version", *scores, "request_id"]


def test_decoding_and_records_follow_the_table() -> None:
    response = answer()
    p = decode_prediction(response, member_probabilities=False)
    assert isinstance(p, Prediction) and len(p) == 3 and p.request_id == "r-1"
    assert p.member_probabilities is None  # sent only on request
    records = p.to_records()
    expected = ["top_class", "top_label", "probability",
                *[s.name for s in SCORES if s.name != "top_class" and not s.on_request]]
    assert list(records[0]) == expected
    assert records[0]["top_label"] == LABELS[p.top_class[0]]
    with_members = decode_prediction(response, member_probabilities=True)
    assert with_members.member_probabilities.shape == (3, 2, len(LABELS))
    assert "member_probabilities" in with_members.to_records()[0]


def test_a_new_row_reaches_the_client_as_a_field() -> None:
    """A score added to the table is a field of the client's Prediction, decoded from the
    answer and written in its records, with no client code of its own."""
    margin = ScoreSpec("margin", np.dtype(np.float32), ("batch",),
                       lambda m, done, t: np.ones(len(m), np.float32), "a made-up score")
    extended = prediction_type((*SCORES, margin))
    assert [f.name for f in dataclasses.fields(extended)][-2:] == ["margin", "request_id"]
    response = answer()
    fields = {f.name: getattr(response, f.name) for f in response.DESCRIPTOR.fields}
    values = np.array([0.25, 0.5, 0.75], dtype=np.float32)
    fields["margin"] = to_tensor(values, pb.Tensor())
    p = extended.from_response(SimpleNamespace(**fields), member_probabilities=False)
    np.testing.assert_array_equal(p.margin, values)
    assert [r["margin"] for r in p.to_records()] == values.tolist()
