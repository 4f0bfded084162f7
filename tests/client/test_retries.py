"""Retries, deadlines and balancing: two real servers, one drained while a client calls them."""

from __future__ import annotations

import json
import threading
import time
from concurrent import futures
from pathlib import Path
from typing import Iterator

import grpc
import numpy as np
import pytest

from snapserve.client import ClientError, EnsembleClient
from snapserve.client.channels import RetryPolicy, channel_options, resolve_target, service_config
from snapserve.proto.snapserve.v1 import ensemble_pb2 as pb
from snapserve.proto.snapserve.v1 import ensemble_pb2_grpc as pb_grpc
from tests.support.servers import ThreadedServer, local_config


@pytest.fixture
def two_servers(model_repo: Path) -> Iterator[tuple[ThreadedServer, ThreadedServer]]:
    servers = ThreadedServer(local_config(model_repo)), ThreadedServer(local_config(model_repo))
    yield servers
    for server in servers:
        if server.thread.is_alive():
            server.stop()


def answered(server: ThreadedServer) -> int:
    return server.running.registry.get("digits").statistics.success.count


def x() -> np.ndarray:
    return np.random.default_rng(0).uniform(0, 16, size=(1, 1, 4, 4)).astype(np.float32)


def test_service_config_asks_grpc_for_backoff_jitter_and_round_robin() -> None:
    config = json.loads(service_config(RetryPolicy()))
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    assert config["healthCheckConfig"] == {"serviceName": ""}
    (method,) = config["methodConfig"]
    assert method["name"] == [{}]  # every method of every service
    assert method["retryPolicy"] == {"maxAttempts": 5, "initialBackoff": "0.05s",
                                     "maxBackoff": "1.0s", "backoffMultiplier": 2.0,
                                     "retryableStatusCodes": ["UNAVAILABLE", "RESOURCE_EXHAUSTED"]}
    options = dict(channel_options(1024, None, None, [("grpc.keepalive_time_ms", 10_000)]))
    assert "grpc.service_config" not in options  # the load generator's: no retries
    assert options["grpc.keepalive_time_ms"] == 10_000
    with pytest.raises(ValueError, match="max_attempts"):
        RetryPolicy(max_attempts=6)


def test_a_list_of_addresses_is_one_balanced_target() -> None:
    assert resolve_target("dns:///svc:50051") == "dns:///svc:50051"
    assert resolve_target(["10.0.0.5:50051", "10.0.0.6:50051"]) == "ipv4:10.0.0.5:50051,10.0.0.6:50051"
    assert resolve_target(["[::1]:1", "[::1]:2"]) == "ipv6:[::1]:1,[::1]:2"
    with pytest.raises(ValueError, match="dns:///"):
        resolve_target(["snapserve-0:50051"])
    with pytest.raises(ValueError, match="mix"):
        resolve_target(["10.0.0.5:1", "[::1]:2"])


def test_round_robin_spreads_calls_over_both_servers(
        two_servers: tuple[ThreadedServer, ThreadedServer]) -> None:
    with EnsembleClient([s.target for s in two_servers], timeout=10) as client:
        for _ in range(20):
            client.predict("digits", x())
    counts = [answered(s) for s in two_servers]
    # Evenly once both connections are up; the first calls go to whichever connected first.
    assert sum(counts) == 20 and min(counts) >= 5, counts


@pytest.mark.parametrize("health_checked", [True, False], ids=["health-checked", "retries-only"])
def test_draining_one_of_two_servers_reaches_the_caller_as_no_error(
        two_servers: tuple[ThreadedServer, ThreadedServer], health_checked: bool) -> None:
    """Retries alone carry the calls the draining server refuses (UNAVAILABLE) to the other;
    with health checking the balancer also stops sending to it once it says NOT_SERVING."""
    first, second = two_servers
    options = [] if health_checked else [
        ("grpc.service_config", service_config(RetryPolicy(), "round_robin", None))]
    errors: list[ClientError] = []
    calls = 0
    done = threading.Event()

    def loop(client: EnsembleClient) -> None:
        nonlocal calls
        while not done.is_set():
            try:
                client.predict("digits", x())
            except ClientError as exc:
                errors.append(exc)
            calls += 1

    with EnsembleClient([first.target, second.target], timeout=10, options=options) as client:
        client.predict("digits", x())  # both connections up before the loop starts
        worker = threading.Thread(target=loop, args=(client,))
        worker.start()
        try:
            time.sleep(0.3)
            assert answered(first) > 0 and answered(second) > 0, "round robin before the drain"
            first.stop(grace=2.0)  # what SIGTERM does: refuse new calls, finish the rest, stop
            after = answered(second)
            time.sleep(0.3)
        finally:
            done.set()
            worker.join(timeout=30)
    assert errors == []
    assert answered(second) > after, "the remaining server took over"
    if not health_checked:  # the refusals happened, and were retried on the other server
        assert first.running.drain.refused > 0
    assert calls > 20


class Refusing(pb_grpc.EnsembleServiceServicer):
    """ListModels refuses with `code` the first `refusals` times, then answers."""

    def __init__(self, code: grpc.StatusCode, refusals: int) -> None:
        self.code, self.refusals, self.attempts = code, refusals, []

    def ListModels(self, request: pb.ListModelsRequest,
                   context: grpc.ServicerContext) -> pb.ListModelsResponse:
        self.attempts.append(time.monotonic())
        if len(self.attempts) <= self.refusals:
            context.abort(self.code, "refused")
        return pb.ListModelsResponse()


@pytest.fixture
def refusing() -> Iterator[tuple[Refusing, str]]:
    servicer = Refusing(grpc.StatusCode.RESOURCE_EXHAUSTED, 2)
    server = grpc.server(futures.ThreadPoolExecutor(2))
    pb_grpc.add_EnsembleServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(None)


@pytest.mark.parametrize("code, refusals, attempts, ok", [
    (grpc.StatusCode.RESOURCE_EXHAUSTED, 2, 3, True),  # a full queue: tried again
    (grpc.StatusCode.UNAVAILABLE, 9, 3, False),  # the policy's 3 attempts, then the caller hears
    (grpc.StatusCode.INVALID_ARGUMENT, 9, 1, False),  # never retried: the request is wrong
])
def test_which_refusals_are_retried_and_how_often(
        refusing: tuple[Refusing, str], code: grpc.StatusCode, refusals: int, attempts: int,
        ok: bool) -> None:
    servicer, target = refusing
    servicer.code, servicer.refusals = code, refusals
    policy = RetryPolicy(max_attempts=3, initial_backoff_s=0.01, max_backoff_s=0.05)
    with EnsembleClient(target, timeout=10, retry=policy) as client:
        if ok:
            assert client.list_models() == []
        else:
            with pytest.raises(ClientError) as info:
                client.list_models()
            assert info.value.code == code
    assert len(servicer.attempts) == attempts


def test_the_default_deadline_bounds_every_attempt() -> None:
    start = time.monotonic()
    with EnsembleClient("127.0.0.1:1", timeout=0.5) as client:
        with pytest.raises(ClientError) as info:
            client.list_models()
    assert info.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    assert time.monotonic() - start < 3
