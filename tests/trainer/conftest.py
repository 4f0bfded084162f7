"""Shared fixtures for the trainer tests: real data (scikit-learn digits), real torch, no mocks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from snapserve.trainer.datasets import Dataset, load_dataset
from tests.support.training import train_cli

# The test machine's CPU is shared: small models gain nothing from more threads.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def digits() -> Dataset:
    return load_dataset("digits")


@pytest.fixture(scope="session")
def method_versions(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, dict]]:
    """fge, swa, swag and swag-diag versions of small digits models in one repository (trained once)."""
    root = tmp_path_factory.mktemp("methods")
    common = ["--dataset", "digits", "--arch", "cnn", "--width", "8", "--seed", "0", "--no-plots"]
    return root, {
        # 1 pre-training epoch, then two 2-epoch cycles: members at the ends of epochs 2 and 4
        "fge": train_cli(root, *common, "--method", "fge", "--epochs", "5", "--fge-start", "0.2",
                         "--name", "fge"),
        # averaging the weights at the ends of epochs 2, 3 and 4
        "swa": train_cli(root, *common, "--method", "swa", "--epochs", "4", "--swa-start", "0.5",
                         "--name", "swa"),
        "swag": train_cli(root, *common, "--method", "swag", "--epochs", "4", "--swa-start", "0.5",
                          "--members", "2", "--swag-rank", "3", "--name", "swag"),
        "swag-diag": train_cli(root, *common, "--method", "swag-diag", "--epochs", "4", "--swa-start", "0.5",
                               "--members", "2", "--name", "swag-diag"),
    }
