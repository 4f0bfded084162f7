"""Adaptive member evaluation served by a real server on 127.0.0.1 (server/engine/adaptive.py).

The versions carry hand-set calibrations (manifest `adaptive`) over small linear members, with
thresholds placed between the rows' confidences so that the rows of one batch stop at
different member counts, far from any rounding.
"""

from __future__ import annotations

from pathlib import Path
from typing import AsyncIterator

import numpy as np
import pytest
import tritonclient.grpc.aio as triton
import tritonclient.http.aio as triton_http

from snapserve.client import AsyncEnsembleClient
from snapserve.proto.adaptive import confidence, members_evaluated, running_means
from snapserve.proto.scores import SCORE_NAMES
from snapserve.server import RunningServer
from snapserve.server.engine.batcher import BatcherConfig
from tests.support.calls import digits_input, native_stub, triton_client
from tests.support.models import (DIGITS_CLASSES, DIGITS_SHAPE, random_members,
                                  reference_member_probs, write_model_version)
from tests.support.servers import pinned_runtime, serving
from snapserve.proto.snapserve.v1 import ensemble_pb2 as pb
from snapserve.proto.tensors import from_tensor, to_tensor

ORDER = (2, 0, 1)
ROWS = 24


def _between(values: np.ndarray, quantile: float) -> float:
    """A threshold halfway between two neighbouring values, near `quantile` of them: no row
    sits within rounding of it."""
    ranked = np.sort(values)
    i = min(max(int(quantile * len(ranked)), 1), len(ranked) - 1)
    return float((ranked[i - 1] + ranked[i]) / 2)


def _thresholds(probs: np.ndarray) -> list[float]:
    """tau_1 stops about a third of the rows after one member, tau_2 half the rest after two."""
    conf = confidence(running_means(probs[:, list(ORDER)]))  # [N, M]
    tau1 = _between(conf[:, 0], 0.66)
    rest = conf[conf[:, 0] < tau1]
    return [tau1, _between(rest[:, 1], 0.5)]


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[float]]:
    root = tmp_path_factory.mktemp("adaptive")
    members = random_members(3, 16, 5, seed=7, scale=1.5)
    plain = write_model_version(root, "full", members, DIGITS_SHAPE, DIGITS_CLASSES)
    probs = reference_member_probs(plain, digits_input(ROWS, seed=3))
    thresholds = _thresholds(probs)
    for name, taus in (("adaptive", thresholds), ("unreachable", [1.5, None])):
        write_model_version(root, name, members, DIGITS_SHAPE, DIGITS_CLASSES, manifest_overrides={
            "adaptive": {"order": list(ORDER), "thresholds": taus, "tolerance": 0.1}})
    write_model_version(root, "tempered", members, DIGITS_SHAPE, DIGITS_CLASSES,
                        manifest_overrides={"temperature": VERSION_T, "adaptive": {
                            "order": list(ORDER), "thresholds": thresholds, "tolerance": 0.1,
                            "temperatures": list(COUNT_T)}})
    return root, thresholds


VERSION_T, COUNT_T = 1.5, (2.0, None)  # answers of 1 member: 2.0; of 2 and of 3: the version's


@pytest.fixture
async def running(repo: tuple[Path, list[float]]) -> AsyncIterator[RunningServer]:
    async with serving(repo[0], http_port=0, batcher=BatcherConfig(max_batch_size=32, max_queue_delay_s=0.001),
                       runtime=pinned_runtime(device="cpu", adaptive_members=True)) as server:
        yield server


async def _native(running: RunningServer, model: str, x: np.ndarray) -> dict[str, np.ndarray]:
    async with native_stub(running) as stub:
        response = await stub.Predict(pb.PredictRequest(model=model, input=to_tensor(x),
                                                        include_member_probabilities=True))
    return {name: from_tensor(getattr(response, name)) for name in SCORE_NAMES}


async def test_rows_stopping_at_different_k_answer_as_alone(running: RunningServer,
                                                            repo: tuple[Path, list[float]]) -> None:
    x = digits_input(ROWS, seed=3)
    batch = await _native(running, "adaptive", x)
    taken = batch["members_evaluated"]
    assert taken.dtype == np.int32 and set(taken.tolist()) == {1, 2, 3}
    probs = reference_member_probs(repo[0] / "full" / "1", x)
    np.testing.assert_array_equal(taken, members_evaluated(probs[:, list(ORDER)], tuple(repo[1])))
    for row in range(ROWS):
        alone = await _native(running, "adaptive", x[row:row + 1])
        for name in SCORE_NAMES:
            np.testing.assert_allclose(alone[name][0], batch[name][row], rtol=1e-6, atol=1e-7,
                                       err_msg=f"{name} of row {row}")
    # A row's scores are its evaluated members': the others read NaN / -1.
    for row in np.flatnonzero(taken == 1):
        unseen = [m for m in range(3) if m != ORDER[0]]
        assert np.isnan(batch["member_kl"][row, unseen]).all()
        assert (batch["member_top_class"][row, unseen] == -1).all()
        assert batch["mutual_information"][row] == 0 and batch["vote_disagreement"][row] == 0
        np.testing.assert_allclose(batch["probabilities"][row], probs[row, ORDER[0]], rtol=1e-5)


async def test_unreachable_thresholds_agree_exactly_with_the_full_ensemble(
        running: RunningServer) -> None:
    x = digits_input(ROWS, seed=4)
    full, adaptive = await _native(running, "full", x), await _native(running, "unreachable", x)
    for name in SCORE_NAMES:
        np.testing.assert_array_equal(adaptive[name], full[name], err_msg=name)
    assert (full["members_evaluated"] == 3).all()


async def test_members_evaluated_on_every_transport(running: RunningServer) -> None:
    x = digits_input(ROWS, seed=3)
    expected = (await _native(running, "adaptive", x))["members_evaluated"]
    for rest in (False, True):
        lib = triton_http if rest else triton
        async with triton_client(running, rest=rest) as client:
            tensor = lib.InferInput("input", list(x.shape), "FP32")
            tensor.set_data_from_numpy(x)
            result = await client.infer("adaptive", [tensor])
            np.testing.assert_array_equal(result.as_numpy("members_evaluated"), expected)
    async with AsyncEnsembleClient(f"127.0.0.1:{running.port}") as client:
        prediction = await client.predict("adaptive", x)
    np.testing.assert_array_equal(prediction.members_evaluated, expected)


async def test_runtime_parameters_say_adaptive(running: RunningServer) -> None:
    served = {s.name: s for s in running.registry.loaded()}
    assert served["adaptive"].runtime_parameters["adaptive_members"].startswith("on: members graph")
    assert served["full"].runtime_parameters["adaptive_members"].startswith("off")


def _tempered(p: np.ndarray, t: float) -> np.ndarray:
    z = np.log(np.clip(p, 1e-12, None)) / t
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


async def test_each_member_count_answers_under_its_own_temperature(
        running: RunningServer, repo: tuple[Path, list[float]]) -> None:
    """The trainer's temperature per member count (manifest adaptive.temperatures): a row that
    stopped at k has softmax(log p̄_k / T_k), the version's T where the manifest has null and for
    all M members; the other scores are the untempered ones, as for every version."""
    x = digits_input(ROWS, seed=3)
    tempered, plain = await _native(running, "tempered", x), await _native(running, "adaptive", x)
    np.testing.assert_array_equal(tempered["members_evaluated"], plain["members_evaluated"])
    means = running_means(reference_member_probs(repo[0] / "full" / "1", x)[:, list(ORDER)])
    for row, k in enumerate(tempered["members_evaluated"].tolist()):
        t = COUNT_T[k - 1] if k <= len(COUNT_T) and COUNT_T[k - 1] is not None else VERSION_T
        np.testing.assert_allclose(tempered["probabilities"][row], _tempered(means[row, k - 1], t),
                                   rtol=1e-4, atol=1e-6, err_msg=f"row {row}, {k} members")
    for name in ("predictive_entropy", "mutual_information", "members_evaluated"):
        np.testing.assert_allclose(tempered[name], plain[name], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("temperatures", [[2.0], [2.0, 0.0], [2.0, -1.0], [2.0, "1"],
                                          [float("inf"), None], [True, None], "2.0"])
def test_bad_member_count_temperatures_are_refused_at_load(tmp_path: Path,
                                                           temperatures: object) -> None:
    from snapserve.server.errors import ManifestError
    from snapserve.server.models.manifest import read_manifest

    version = write_model_version(tmp_path, "bad", random_members(3, 16, 5, seed=7), DIGITS_SHAPE,
                                  DIGITS_CLASSES, manifest_overrides={"adaptive": {
                                      "order": list(ORDER), "thresholds": [0.9, None],
                                      "tolerance": 0.1, "temperatures": temperatures}})
    with pytest.raises(ManifestError, match=r"adaptive.temperatures' must hold 2 numbers > 0"):
        read_manifest(version)
