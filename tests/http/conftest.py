"""Fixtures for the KServe v2 REST front end: a real server with REST on a free port, the real
`tritonclient.http.aio` against it, tritonclient's gRPC client against the same server (for
answers to compare), and a plain aiohttp session for hand-written (curl-style) requests."""

from __future__ import annotations

from pathlib import Path
from typing import AsyncIterator

import aiohttp
import pytest
import tritonclient.grpc.aio as triton_grpc
import tritonclient.http.aio as triton_http

from snapserve.server import RunningServer
from tests.support.calls import triton_client
from tests.support.servers import serving


@pytest.fixture
async def rest(model_repo: Path) -> AsyncIterator[RunningServer]:
    async with serving(model_repo, http_port=0) as running:
        yield running


@pytest.fixture
async def http_client(rest: RunningServer) -> AsyncIterator[triton_http.InferenceServerClient]:
    async with triton_client(rest, rest=True) as client:
        yield client


@pytest.fixture
async def grpc_client(rest: RunningServer) -> AsyncIterator[triton_grpc.InferenceServerClient]:
    async with triton_client(rest) as client:
        yield client


@pytest.fixture
async def session(rest: RunningServer) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(f"http://127.0.0.1:{rest.http_port}") as s:
        yield s
