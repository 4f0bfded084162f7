"""A version loaded in-process (snapserve.server.Ensemble) answers as the server does."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from snapserve.client import EnsembleClient
from snapserve.proto.scores import SCORES
from snapserve.server import Ensemble
from snapserve.server.errors import InvalidInput
from tests.support.servers import ThreadedServer


def test_in_process_answers_equal_the_servers(threaded_server: ThreadedServer, model_repo: Path) -> None:
    x = np.random.default_rng(3).uniform(0, 16, size=(20, 1, 4, 4)).astype(np.float32)
    with Ensemble.load(model_repo / "digits" / "1") as ensemble:
        local = ensemble.predict(x)  # 20 at once: no batch limit in-process
        labels = ensemble.labels(local.top_class)
        assert (ensemble.name, ensemble.version) == ("digits", 1)
    with EnsembleClient(threaded_server.target) as client:
        served = client.predict("digits", x, member_probabilities=True)
    for spec in SCORES:
        if spec.name == "members_evaluated" and getattr(served, spec.name) is None:
            continue
        np.testing.assert_allclose(getattr(local, spec.name), getattr(served, spec.name),
                                   rtol=1e-5, atol=1e-6, err_msg=spec.name)
    np.testing.assert_array_equal(labels, served.top_label)


def test_in_process_refuses_what_the_server_refuses(model_repo: Path) -> None:
    ensemble = Ensemble.load(model_repo / "digits" / "1")
    with pytest.raises(InvalidInput, match="shape"):
        ensemble.predict(np.zeros((2, 3), np.float32))
