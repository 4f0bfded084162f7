"""A version with a member selection serves exactly the chosen multiset (each distinct member run
once, expanded to the listed order); one without it serves all its members. A real server on
127.0.0.1 answers, compared with the numpy scores of the chosen members."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from snapserve.proto.scores import ensemble_scores
from snapserve.server import BatcherConfig, RuntimeConfig
from snapserve.server.errors import ManifestError
from snapserve.server.models.loading import load_version
from snapserve.trainer.fuse import add_fused_graph
from tests.support.calls import digits_input, native_predict, native_stub
from tests.support.models import (DIGITS_CLASSES, DIGITS_SHAPE, random_members, reference_member_probs,
                                  write_model_version)
from tests.support.servers import serving

SERVED = [1, 2, 2]  # greedy's kind of choice: member 2 weighs twice, member 0 not at all


def write_selected(repo: Path, name: str, selection: list[int] | None, fused: bool = False) -> Path:
    overrides = {} if selection is None else {"selection": {
        "rule": "greedy", "members": selection, "collected": selection, "collected_count": 3,
        "validation": {"nll": 0.5, "accuracy": 0.8, "all_members_nll": 0.6, "all_members_accuracy": 0.8}}}
    version = write_model_version(repo, name, random_members(3, 16, 5, seed=1), DIGITS_SHAPE, DIGITS_CLASSES,
                                  temperature=1.5, manifest_overrides=overrides)
    if fused:  # ensemble.onnx over the listed multiset, as `trainer train` writes it
        manifest = json.loads((version / "manifest.json").read_text())
        add_fused_graph(version, manifest)
        (version / "manifest.json").write_text(json.dumps(manifest))
    return version


def expected(version: Path, x: np.ndarray, members: list[int]):  # type: ignore[no-untyped-def]
    return ensemble_scores(reference_member_probs(version, x)[:, members], 1.5)


def assert_scores(answer: dict[str, np.ndarray], want) -> None:  # type: ignore[no-untyped-def]
    for name in ("probabilities", "predictive_entropy", "expected_entropy", "mutual_information",
                 "vote_disagreement", "member_kl"):
        np.testing.assert_allclose(answer[name], getattr(want, name), rtol=1e-5, atol=2e-6, err_msg=name)
    np.testing.assert_array_equal(answer["member_top_class"], want.member_top_class)


async def test_a_server_serves_the_chosen_multiset_and_all_members_without_a_selection(tmp_path: Path) -> None:
    picked = write_selected(tmp_path, "picked", SERVED)
    plain = write_selected(tmp_path, "plain", None)
    x = digits_input(6)
    async with serving(tmp_path) as running, native_stub(running) as stub:
        answer = await native_predict(stub, x, model="picked", members=True)
        assert answer["member_probabilities"].shape == (6, 3, 5)
        np.testing.assert_allclose(answer["member_probabilities"],
                                   reference_member_probs(picked, x)[:, SERVED], rtol=1e-5, atol=1e-6)
        assert_scores(answer, expected(picked, x, SERVED))
        assert_scores(await native_predict(stub, x, model="plain"), expected(plain, x, [0, 1, 2]))


@pytest.mark.parametrize("graph", ["fused", "members"])
def test_the_fused_graph_and_the_members_agree_on_the_multiset(tmp_path: Path, graph: str) -> None:
    version = write_selected(tmp_path, "picked", SERVED, fused=True)
    served = load_version(version, RuntimeConfig(device="cpu", graph=graph, intra_op_threads=1, instances=1),
                          BatcherConfig(max_batch_size=4))
    assert served.runtime.graph == graph and served.runtime.members == 3
    x = digits_input(5, seed=1)
    scores = served.runtime.scores(x)
    want = expected(version, x, SERVED)
    for name in ("probabilities", "mutual_information", "vote_disagreement", "member_kl"):
        np.testing.assert_allclose(getattr(scores, name), getattr(want, name), rtol=1e-5, atol=2e-6, err_msg=name)


@pytest.mark.parametrize("members", [[], [0, 3], [1, "2"]])
def test_a_selection_outside_the_members_is_refused(tmp_path: Path, members: list) -> None:
    version = write_selected(tmp_path, "broken", members)
    with pytest.raises(ManifestError, match="selection.members"):
        load_version(version, RuntimeConfig(device="cpu", intra_op_threads=1, instances=1), BatcherConfig())
