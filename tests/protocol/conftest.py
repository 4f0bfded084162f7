"""Fixtures for protocol tests: a real server with metrics, and the real `tritonclient.grpc.aio`.

Our own `inference.*` messages live in a private descriptor pool (proto/generate.py), so
tritonclient's copies can be imported in the same process.
"""

from __future__ import annotations

from pathlib import Path
from typing import AsyncIterator

import pytest
import tritonclient.grpc.aio as triton

from snapserve.server import RunningServer
from tests.support.calls import triton_client
from tests.support.servers import serving


@pytest.fixture
async def running(model_repo: Path) -> AsyncIterator[RunningServer]:
    async with serving(model_repo, metrics_port=0, http_port=0) as server:
        yield server


@pytest.fixture
async def client(running: RunningServer) -> AsyncIterator[triton.InferenceServerClient]:
    async with triton_client(running) as c:
        yield c
