"""Shared fixtures for the trainer tests: real data (scikit-learn digits), real torch, no mocks."""

from __future__ import annotations

import pytest
import torch

from trainer.data import Dataset, load_dataset

# The test machine's CPU is shared: small models gain nothing from more threads.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def digits() -> Dataset:
    return load_dataset("digits")
