"""End to end: versions the trainer wrote (fge, swa, swag) served by the real server and queried
with the real client, which applies the manifest's normalisation to raw inputs."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from snapserve.client import EnsembleClient
from snapserve.server import BatcherConfig, ServerConfig
from tests.support.models import reference_member_probs
from tests.support.servers import ThreadedServer, pinned_runtime
from snapserve.trainer.datasets import Dataset
from snapserve.trainer.metrics import auroc


@pytest.fixture(scope="module")
def served(method_versions: tuple[Path, dict]) -> Iterator[ThreadedServer]:
    server = ThreadedServer(ServerConfig(model_repository=method_versions[0], port=0, http_port=None,
                                         batcher=BatcherConfig(max_batch_size=64, max_queue_delay_s=0.002),
                                         runtime=pinned_runtime()))
    yield server
    server.stop()


@pytest.mark.parametrize("name", ["fge", "swag", "swag-diag", "swa"])
def test_the_server_serves_trained_versions(served: ThreadedServer, method_versions: tuple[Path, dict],
                                            digits: Dataset, name: str) -> None:
    manifest = method_versions[1][name]
    version = method_versions[0] / name / "1"
    x = digits.test.x[:64]  # raw pixels 0..16
    with EnsembleClient(served.target, timeout=30) as client:
        info = client.get_model(name)
        assert info.manifest["method"] == name and len(info.members) == len(manifest["members"])
        prediction = client.predict(name, x, member_probabilities=True)  # raw, as trained
    assert manifest["input"]["kind"] == "raw"  # the graphs apply the normalisation themselves
    members = reference_member_probs(version, x.astype(np.float32))
    mean = members.mean(axis=1)
    z = np.log(mean) / manifest["temperature"]  # pooled, then calibrated, as the manifest says
    expected = np.exp(z - z.max(1, keepdims=True))
    expected /= expected.sum(1, keepdims=True)
    np.testing.assert_allclose(prediction.probabilities, expected, atol=1e-4)
    np.testing.assert_allclose(prediction.member_probabilities, members, atol=1e-4)
    assert (prediction.top_class == digits.test.y[:64]).mean() > 0.7
    if len(manifest["members"]) > 1:
        assert prediction.mutual_information.mean() > 0  # the members disagree somewhere


def test_a_threshold_from_the_report_refuses_the_same_served_requests(
        served: ThreadedServer, method_versions: tuple[Path, dict], digits: Dataset) -> None:
    """The report's scores are the server's: its rejection thresholds apply to served answers."""
    version = method_versions[0] / "swag" / "1"
    report = json.loads((version / "report" / "metrics.json").read_text())["test"]["uncertainty"]
    scores = ("mutual_information", "predictive_entropy", "vote_disagreement")
    with EnsembleClient(served.target, timeout=30) as client:  # the server batches at most 64
        parts = [client.predict("swag", digits.test.x[i:i + 64])
                 for i in range(0, len(digits.test), 64)]
    correct = np.concatenate([p.top_class for p in parts]) == digits.test.y
    for score in scores:
        served_score = np.concatenate([getattr(p, score) for p in parts])
        curve = report["rejection"][score]
        for threshold, refused, accuracy in zip(curve["threshold"], curve["refused"], curve["accuracy"]):
            kept = served_score <= threshold
            assert 1 - kept.mean() == pytest.approx(refused, abs=1 / len(kept))  # float32 ties at most one
            assert correct[kept].mean() == pytest.approx(accuracy, abs=2 / len(kept))
        assert report["error_auroc"][score] == pytest.approx(auroc(served_score, ~correct), abs=1e-3)
