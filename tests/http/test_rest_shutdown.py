"""SIGTERM to a `python -m snapserve.server` process under REST load: readiness turns 503 at once,
requests keep being answered through the drain window, then new ones get 503 with an error body,
every request the server accepted gets its correct answer, and it exits 0."""

from __future__ import annotations

import asyncio
import json
import random
import signal
from collections import Counter
from pathlib import Path

import aiohttp
import numpy as np
import pytest

from benchmarks.soak import MAX_BATCH, MODEL, Reference, ServerProcess, build_repository
from tests.support.servers import PINNED_FLAGS, free_port

ARGS = (*PINNED_FLAGS, "--max-batch-size", str(MAX_BATCH), "--max-queue-size", "64",
        "--drain-window-s", "0.5", "--grace-s", "3")


@pytest.fixture(scope="module")
def soak_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Reference]:
    repo = build_repository(tmp_path_factory.mktemp("rest-shutdown") / "models")
    return repo, Reference(repo / MODEL / "1")


async def _client(session: aiohttp.ClientSession, reference: Reference, seed: int,
                  signalled: asyncio.Event, tally: Counter[str]) -> None:
    """Valid requests one after another, until refused (503: go elsewhere) or the port closes."""
    rng = random.Random(seed)
    while True:
        x, expected = reference.sample(rng, rng.randint(1, 3))
        request = {"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape),
                               "data": x.ravel().tolist()}],
                   "outputs": [{"name": "probabilities"}]}
        when = "after" if signalled.is_set() else "before"
        try:
            async with session.post(f"/v2/models/{MODEL}/infer", json=request) as response:
                status, answer = response.status, json.loads(await response.read())
        except aiohttp.ClientConnectorError:
            tally[f"{when}: not connected"] += 1  # the port is closed: never accepted
            return
        except aiohttp.ClientError as exc:
            tally[f"{when}: cut off ({type(exc).__name__})"] += 1
            return
        if status == 200:
            got = np.asarray(answer["outputs"][0]["data"], dtype=np.float32).reshape(expected.shape)
            tally[f"{when}: {'answered' if Reference.matches(got, expected) else 'WRONG'}"] += 1
            continue
        if status == 503 and answer == {"error": "the server is shutting down; retry on another "
                                                 "instance"}:
            tally[f"{when}: refused"] += 1
            return
        tally[f"{when}: status {status} {answer}"] += 1
        return


async def _watch_ready(session: aiohttp.ClientSession, signalled: asyncio.Event,
                       seen: list[int]) -> None:
    await signalled.wait()
    try:
        async with session.get("/v2/health/ready") as response:
            seen.append(response.status)
    except aiohttp.ClientError:
        seen.append(0)


async def _load_then_sigterm(server: ServerProcess, port: int, reference: Reference,
                             load_s: float, clients: int) -> tuple[Counter[str], list[int], int]:
    tally: Counter[str] = Counter()
    signalled = asyncio.Event()
    ready: list[int] = []
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as session, \
            aiohttp.ClientSession(f"http://127.0.0.1:{port}") as probe:
        load = [asyncio.ensure_future(_client(session, reference, seed, signalled, tally))
                for seed in range(clients)]
        watcher = asyncio.ensure_future(_watch_ready(probe, signalled, ready))
        await asyncio.sleep(load_s)
        signalled.set()
        server.signal(signal.SIGTERM)
        code = await loop.run_in_executor(None, server.wait, 60)
        await asyncio.wait_for(asyncio.gather(*load, watcher), 30)
    return tally, ready, code


def test_sigterm_under_rest_load_answers_every_accepted_request(
        soak_model: tuple[Path, Reference]) -> None:
    repo, reference = soak_model
    port = free_port()
    with ServerProcess(repo, *ARGS, "--http-port", str(port)) as server:
        tally, ready, code = asyncio.run(_load_then_sigterm(server, port, reference, load_s=1.5,
                                                            clients=24))
        log = "".join(server.log)
    assert code == 0, log
    assert ready == [503], ready  # readiness fails first, while the port still answers
    assert tally["before: answered"] > 0 and tally["after: answered"] > 0, tally
    assert tally["after: refused"] > 0, tally  # once the drain window is over
    unexpected = {k: v for k, v in tally.items()
                  if not k.endswith(("answered", "refused", "not connected"))}
    assert not unexpected, (unexpected, tally)  # no wrong answer, no request cut off
    # Every request the model computed reached its client, with the right answer.
    answered = tally["before: answered"] + tally["after: answered"]
    assert sum(server.computed().values()) == answered, (server.computed(), tally)
    assert f"serving KServe v2 REST on http://127.0.0.1:{port}/v2" in log
