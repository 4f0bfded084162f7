"""Bounds before bytes on the REST port, over raw sockets (a client that misbehaves on purpose):
header, body and keep-alive timeouts, the connection cap with its health reserve, compressed
bodies bounded while they inflate, auth decided on the headers, bodies counted against the
pending-bytes bound and the model's size, and aiohttp's own refusals quiet and unbranded."""

from __future__ import annotations

import asyncio
import gzip
import http.client
import json
import logging
import zlib
from pathlib import Path

import aiohttp
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from snapserve.server import RunningServer
from snapserve.server.config import HttpLimits, IntakeConfig
from snapserve.server.listeners import LINGER_GAP_S, LOOK_S
from tests.support.calls import digits_input
from tests.support.servers import serving
from tests.support.waiting import eventually

INFER = "/v2/models/digits/infer"
READ_S = 5.0


def infer_body(batch: int = 2) -> bytes:
    x = digits_input(batch)
    return json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape),
                                   "data": x.reshape(-1).tolist()}]}).encode()


async def raw(port: int, data: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    return reader, writer


def head(path: str = INFER, length: int | None = None, **headers: str) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json"]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    lines += [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body of one answer (Content-Length framed), within READ_S."""
    async with asyncio.timeout(READ_S):
        status_line = await reader.readline()
        headers: dict[str, str] = {}
        while (line := await reader.readline()) not in (b"\r\n", b""):
            key, _, value = line.decode().partition(":")
            headers[key.strip().lower()] = value.strip()
        body = await reader.readexactly(int(headers.get("content-length", "0")))
    return int(status_line.split()[1]), headers, body


async def closed(reader: asyncio.StreamReader, within_s: float) -> bool:
    try:
        async with asyncio.timeout(within_s):
            while await reader.read(65536):
                pass
        return True
    except (TimeoutError, ConnectionError):
        return False


async def healthy(port: int) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{port}/v2/health/ready",
                               timeout=aiohttp.ClientTimeout(total=1.0)) as response:
            assert response.status == 200


async def ok_infer(port: int, data: bytes | None = None, **headers: str) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as session:
        async with session.post(f"http://127.0.0.1:{port}{INFER}", data=data or infer_body(),
                                headers={k.replace("_", "-"): v for k, v in headers.items()}
                                ) as response:
            return response.status, json.loads(await response.read())


@pytest.fixture
async def limited(model_repo: Path) -> RunningServer:
    limits = HttpLimits(header_timeout_s=0.5, body_timeout_s=0.5, keepalive_timeout_s=0.5,
                        max_connections=4, reserved_connections=2)
    async with serving(model_repo, http_port=0, http=limits) as running:
        yield running


async def test_idle_half_sent_headers_and_stalled_bodies_are_closed(limited: RunningServer
                                                                    ) -> None:
    port = limited.http_port
    idle, _ = await raw(port, b"")
    half_head, _ = await raw(port, b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x")
    stalled, _ = await raw(port, head(length=20_000) + b'{"inputs": [')
    assert await closed(idle, 2.0) and await closed(half_head, 2.0)
    status, _, body = await answer(stalled)  # cut by the body timeout, told why, then closed
    assert status == 408 and b"http_body_timeout_s" in body
    assert await closed(stalled, 2.0)
    # After an answer, an idle keep-alive connection is closed too.
    kept, writer = await raw(port, head(length=len(infer_body())) + infer_body())
    assert (await answer(kept))[0] == 200
    assert await closed(kept, 2.0)
    await healthy(port)


async def test_at_the_cap_health_gets_in_and_idle_connections_make_room(limited: RunningServer
                                                                        ) -> None:
    port, server = limited.http_port, limited.http.server
    # Requests being answered hold their places: bodies still arriving (no timeout yet).
    busy = [await raw(port, head(length=1000) + b"{") for _ in range(4)]
    await eventually(lambda: len(server.open) == 4, "the four bodies arriving, each in a place")
    # The reserve answers health, and only health.
    reader, _ = await raw(port, b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await answer(reader))[0] == 200
    reader, _ = await raw(port, head(length=len(infer_body())) + infer_body())
    status, headers, body = await answer(reader)
    assert status == 503 and b"http_max_connections" in body
    assert headers["retry-after"] == "1"  # RFC 9110: when to come back
    for r, w in busy:
        w.close()
    await eventually(lambda: len(server.open) <= 2, "the closed connections' places freed")
    await healthy(port)


@pytest.fixture
async def patient(model_repo: Path) -> RunningServer:
    """Two places and one reserve, with timeouts far beyond the eviction grace."""
    limits = HttpLimits(header_timeout_s=8.0, body_timeout_s=8.0, keepalive_timeout_s=8.0,
                        max_connections=2, reserved_connections=1)
    async with serving(model_repo, http_port=0, http=limits) as running:
        yield running


HEALTH = b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\n\r\n"


async def test_eviction_spares_young_connections_and_closes_the_longest_waiting(
        patient: RunningServer) -> None:
    port, server = patient.http_port, patient.http.server
    grace = server.limits.evict_grace_s
    assert grace > 0
    client, client_w = await raw(port, HEALTH)  # opened first, then kept alive between requests
    assert (await answer(client))[0] == 200
    slow, slow_w = await raw(port, b"GET /v2/health/ready HTTP/1.1\r\nHo")  # headers, slowly
    # Writers are kept: a StreamWriter collected closes its connection.
    idle, idle_w = await raw(port, b"")  # the reserve place
    # Every place within its grace, the reserve one younger than the look: all are spared, and
    # a newcomer that sends nothing is held for the look, then closed.
    held, held_w = await raw(port, b"")
    assert await closed(held, 2 * LOOK_S)
    assert server.evicted == 0 and server.refused == 1 and len(server.open) == 3
    # Past the look, the reserve one still sending its request goes, though within the grace:
    # else a flood of fresh connections would keep the reserve from a probe.
    fresh, fresh_w = await raw(port, b"")
    assert await closed(idle, 1.0)
    assert server.evicted == 1 and server.refused == 1 and len(server.open) == 3
    await asyncio.sleep(grace + 0.2)
    client_w.write(HEALTH)  # back-to-back requests: it waits the least, though opened first
    assert (await answer(client))[0] == 200
    # Past the grace, a new connection closes the one waiting longest: the slow sender.
    late, late_w = await raw(port, b"")
    assert await closed(slow, 2.0)
    assert server.evicted == 2
    client_w.write(HEALTH)
    assert (await answer(client))[0] == 200
    # A health probe at the full count gets in, and is answered.
    probe, probe_w = await raw(port, HEALTH)
    assert (await answer(probe))[0] == 200
    for w in (held_w, fresh_w, idle_w, probe_w, late_w):
        w.close()
    slow_w.close()
    client_w.close()


async def accepted(proto: asyncio.BaseProtocol, sent: bytes = b""
                   ) -> tuple[asyncio.Transport, asyncio.StreamReader, asyncio.StreamWriter]:
    """`proto` (from the listener's factory) made on one end of a socket pair, as the loop's
    accept would, after the client's end has `sent`; the other end as a client's stream."""
    import socket

    ours, theirs = socket.socketpair()
    theirs.sendall(sent)
    loop = asyncio.get_running_loop()
    transport, _ = await loop.connect_accepted_socket(lambda: proto, ours)
    reader, writer = await asyncio.open_connection(sock=theirs)
    return transport, reader, writer


def close_all(made: list[tuple[asyncio.Transport, asyncio.StreamReader, asyncio.StreamWriter]]
              ) -> None:
    for transport, _, writer in made:
        writer.close()
        transport.close()


async def test_a_burst_of_accepts_takes_places_as_made_and_a_probe_beyond_them_is_answered(
        patient: RunningServer) -> None:
    """One accept burst calls the factory for each connection before any `connection_made`:
    places are decided as each is made, when the earlier ones can be judged. Beyond the places,
    with none to close (all young), a newcomer is held for a look at its request line: a health
    probe is admitted over the cap and answered, anything else is answered 503 and closed."""
    server = patient.http.server
    burst = [server() for _ in range(5)]  # two full places, the reserve, a probe, a client
    assert not server.open  # accepted, not made: no place yet
    made = [await accepted(p) for p in burst]
    assert len(server.open) == 3 and len(server.lobby) == 2 and server.evicted == 0
    _, probe, probe_w = made[3]
    probe_w.write(HEALTH)
    status, headers, _ = await answer(probe)
    assert status == 200 and headers["connection"] == "close"  # one answer over the cap
    assert await closed(probe, 1.0)
    _, client, client_w = made[4]
    client_w.write(head(length=len(infer_body())) + infer_body())
    status, headers, body = await answer(client)
    assert status == 503 and b"http_max_connections" in body
    assert headers["connection"] == "close" and "aiohttp" not in headers["server"].lower()
    assert server.refused == 1 and len(server.lobby) == 1  # reading on until the client closes
    client_w.close()
    await eventually(lambda: not server.lobby, "the refused client out of the lobby")
    assert server.evicted == 0
    assert server.over == 0 and len(server.open) == 3
    close_all(made)


async def test_a_probe_whose_request_is_in_when_it_is_made_is_admitted_at_once(
        patient: RunningServer) -> None:
    """No place, none to close: a newcomer whose health request is already in its socket is
    admitted over the cap as it is made, before any lobby, and answered."""
    server = patient.http.server
    made = [await accepted(server()) for _ in range(3)]  # every place young
    probe = await accepted(server(), sent=HEALTH)
    assert not server.lobby and server.over == 1 and server.evicted == 0
    assert (await answer(probe[1]))[0] == 200
    close_all([*made, probe])


def connection_metrics(running: RunningServer) -> dict[str, float]:
    """The REST listener's series as the metrics endpoint would serve them."""
    text = generate_latest(running.metrics.registry).decode()
    return {f"{s.name}:{next(iter(s.labels.values()))}": s.value
            for family in text_string_to_metric_families(text)
            if family.name.startswith("snapserve_http_connections") for s in family.samples}


async def test_the_listener_reports_its_places_and_closes_as_metrics(
        patient: RunningServer) -> None:
    port, server = patient.http_port, patient.http.server
    places = [await raw(port, b"") for _ in range(3)]  # two full places, the reserve
    held = await raw(port, b"")
    await asyncio.sleep(0.1)
    assert connection_metrics(patient) == {
        "snapserve_http_connections:full": 2, "snapserve_http_connections:reserve": 1,
        "snapserve_http_connections:over_cap": 0, "snapserve_http_connections:lobby": 1,
        "snapserve_http_connections_closed_total:evicted": 0,
        "snapserve_http_connections_closed_total:refused": 0,
        "snapserve_http_connections_closed_total:header_timeout": 0}
    assert await closed(held[0], 2 * LOOK_S)  # sent no request line in the look
    metrics = connection_metrics(patient)
    assert metrics["snapserve_http_connections:lobby"] == 0
    assert metrics["snapserve_http_connections_closed_total:refused"] == 1 == server.refused
    for _, w in (*places, held):
        w.close()


async def test_a_request_answered_503_from_the_lobby_is_read_on_not_reset(
        patient: RunningServer) -> None:
    """A client still sending its body when the lobby answers 503 gets the answer and a clean
    close: closing with its bytes unread would reset the connection under it."""
    port, server = patient.http_port, patient.http.server
    places = [await raw(port, b"") for _ in range(3)]  # every place young: none to close
    reader, writer = await raw(port, head(length=1000) + b"{")
    status, headers, body = await answer(reader)
    assert status == 503 and b"http_max_connections" in body and headers["retry-after"] == "1"
    for _ in range(3):  # the body goes on after the answer
        writer.write(b"0" * 100)
        await writer.drain()
        await asyncio.sleep(0.02)
    assert await closed(reader, 1.0)  # end of stream, not a reset
    writer.close()
    for _, w in places:
        w.close()


@pytest.mark.parametrize("line, wanted", [
    (b"GET /v2/health/ready HTTP/1.1\r\n", True), (b"HEAD /v2/health/live?x=1 HTTP/1.1", True),
    (b"GET /v2/health/ready\r\n", False), (b"GET /v2/heal", None), (b"GE", None), (b"", None),
    (b"POST ", False), (b"GET /v2/models/digits HTTP/1.1", False),
    (b"GET /v2/health/readyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyy", False), (b"\x16\x03\x01 x", False)])
async def test_the_lobby_judges_a_request_line_by_its_method_and_path(
        patient: RunningServer, line: bytes, wanted: bool | None) -> None:
    assert patient.http.server.reserved_request(line) is wanted


async def test_a_connection_whose_request_has_arrived_is_not_closed_for_room(
        patient: RunningServer) -> None:
    """Past the grace, idle by the server's count, yet its request is in the socket unread (the
    loop has not reached it): closing it would reset a probe's request. A newcomer with nothing
    else to close is refused; the waiting requests are answered."""
    server = patient.http.server
    made = [await accepted(server()) for _ in range(3)]
    await asyncio.sleep(server.limits.evict_grace_s + 0.2)
    for transport, _, writer in made:
        transport.pause_reading()
        writer.write(HEALTH)
        await writer.drain()
    await asyncio.sleep(0.05)
    newcomer = await accepted(server())
    assert await closed(newcomer[1], 1.0)
    assert server.refused == 1 and server.evicted == 0
    for transport, reader, _ in made:
        transport.resume_reading()
        assert (await answer(reader))[0] == 200
    close_all([*made, newcomer])


async def test_a_connection_that_closes_a_reserve_one_takes_the_reserve_place(
        patient: RunningServer) -> None:
    port, server = patient.http_port, patient.http.server
    # Both full places held by bodies still arriving: busy, never closed for room.
    busy = [await raw(port, head(length=1000) + b"{") for _ in range(2)]
    await asyncio.sleep(0.1)
    spare, spare_w = await raw(port, b"")  # the reserve place (its writer kept: open)
    await asyncio.sleep(server.limits.evict_grace_s + 0.2)
    # It closes the reserve connection and takes its place: health only, not a full place.
    newcomer, newcomer_w = await raw(port, head(length=len(infer_body())) + infer_body())
    status, _, body = await answer(newcomer)
    assert status == 503 and b"http_max_connections" in body
    assert await closed(spare, 2.0)
    assert server.full == 2
    # The 503'd one is gone: a probe takes the reserve place.
    reader, writer = await raw(port, HEALTH)
    assert (await answer(reader))[0] == 200
    for w in (spare_w, newcomer_w, writer, *(w for _, w in busy)):
        w.close()


async def test_a_body_trickled_below_the_minimum_rate_is_cut(limited: RunningServer) -> None:
    """A byte every tenth of a second never leaves a gap as long as the body timeout (0.5 s),
    yet falls far below http_body_min_kib_s: cut soon after the timeout, told why."""
    port = limited.http_port
    reader, writer = await raw(port, head(length=20_000) + b'{"inputs": [')
    loop = asyncio.get_running_loop()
    start = loop.time()
    status = None

    async def trickle() -> None:
        for _ in range(100):
            writer.write(b" ")
            await asyncio.sleep(0.1)

    sender = asyncio.ensure_future(trickle())
    try:
        status, _, body = await answer(reader)
    finally:
        sender.cancel()
    assert status == 408 and b"http_body_min_kib_s" in body, body
    assert loop.time() - start < 4.0
    assert await closed(reader, 2.0)


async def test_auth_refuses_on_the_headers_before_a_body_byte(model_repo: Path,
                                                             tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("sesame\n")
    async with serving(model_repo, http_port=0, security={"auth_token_file": tokens}) as running:
        reader, _ = await raw(running.http_port, head(length=50_000_000))  # no body byte sent
        status, headers, _ = await answer(reader)
        assert status == 401 and headers["www-authenticate"] == "Bearer"
        assert "retry-after" not in headers  # a token, not time, is what it lacks
        assert await closed(reader, 2.0)  # the body is not drained: the connection ends


def post_whole(port: int, body: bytes, **headers: str) -> tuple[int, bytes]:
    """POST `body` as a client that writes it whole before it reads the answer (http.client,
    and requests over it): a blocking call, for `asyncio.to_thread`."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=READ_S)
    try:
        connection.request("POST", INFER, body=body, headers={
            "Content-Type": "application/json", **{k.replace("_", "-"): v for k, v in headers.items()}})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


async def test_a_body_refused_on_its_headers_is_read_on_so_its_sender_gets_the_answer(
        model_repo: Path, tmp_path: Path) -> None:
    """Refused before its body was read (a missing token, a body over the server's limit), the
    rest is read and dropped after the answer: closing with it unread would reset the client's
    write, and a client that writes its whole body first would see a broken pipe, not why."""
    tokens = tmp_path / "tokens"
    tokens.write_text("sesame-sesame-sesame\n")
    async with serving(model_repo, http_port=0, security={"auth_token_file": tokens},
                       max_message_bytes=2**20) as running:
        port = running.http_port
        for _ in range(3):
            status, body = await asyncio.to_thread(post_whole, port, b"0" * 8_000_000)
            assert status == 401 and b"token" in body, body
            status, body = await asyncio.to_thread(post_whole, port, b"0" * 8_000_000,
                                                   Authorization="Bearer sesame-sesame-sesame")
            assert status == 413 and b"larger than this server's limit" in body, body
        # A client that waits for the answer before it sends is not waited for long.
        started = asyncio.get_running_loop().time()
        reader, _ = await raw(port, head(length=50_000_000))
        assert (await answer(reader))[0] == 401
        assert await closed(reader, 2.0)
        assert asyncio.get_running_loop().time() - started < LINGER_GAP_S + 1.0
        await healthy(port)


async def test_a_body_refused_on_a_reserve_place_is_read_on(limited: RunningServer) -> None:
    port = limited.http_port
    busy = [await raw(port, head(length=1000) + b"{") for _ in range(4)]  # every full place
    await eventually(lambda: len(limited.http.server.open) == 4, "the four bodies arriving")
    status, body = await asyncio.to_thread(post_whole, port, b"0" * 4_000_000)
    assert status == 503 and b"http_max_connections" in body, body
    for _, w in busy:
        w.close()
    await healthy(port)


async def test_compressed_bodies_are_bounded_while_they_inflate(model_repo: Path) -> None:
    async with serving(model_repo, http_port=0, max_message_bytes=32 * 2**20) as running:
        port = running.http_port
        status, answer_ = await ok_infer(port, gzip.compress(infer_body()), Content_Encoding="gzip")
        assert status == 200 and answer_["outputs"]
        status, answer_ = await ok_infer(port, zlib.compress(infer_body()),
                                         Content_Encoding="deflate")
        assert status == 200
        # A bomb: 64 MiB of zeros in ~64 KiB; refused within the bound, not inflated whole.
        bomb = gzip.compress(b"0" * (64 * 2**20), compresslevel=9)
        loop = asyncio.get_running_loop()
        started = loop.time()
        reader, _ = await raw(port, head(length=len(bomb), Content_Encoding="gzip") + bomb)
        status, _, body = await answer(reader)
        assert status == 413 and b"max_batch_size" in body, body  # the model's bound
        assert loop.time() - started < 2.0
        # Where only the server's bound holds (no such model), the ratio stops it first.
        reader, _ = await raw(port, head("/v2/models/nosuch/infer", length=len(bomb),
                                         Content_Encoding="gzip") + bomb)
        status, _, body = await answer(reader)
        assert status == 413 and b"max_inflate_ratio" in body, body
        for encoding in ("br", "compress", "gzip, gzip"):
            status, answer_ = await ok_infer(port, infer_body(), Content_Encoding=encoding)
            assert status == 415 and "gzip or deflate" in answer_["error"]
        status, answer_ = await ok_infer(port, b"\x1f\x8b not gzip", Content_Encoding="gzip")
        assert status == 400 and "Content-Encoding" in answer_["error"], answer_
        await healthy(port)


async def test_bodies_are_held_to_the_model_and_the_pending_bound(model_repo: Path) -> None:
    intake = IntakeConfig(max_pending_bytes=50_000)
    async with serving(model_repo, http_port=0, intake=intake) as running:
        port = running.http_port
        # A declared shape far beyond max_batch_size: 400 before the data is read as an array.
        huge = json.dumps({"inputs": [{"name": "input", "datatype": "FP32",
                                       "shape": [15_000_000], "data": [0.0]}]}).encode()
        status, answer_ = await ok_infer(port, huge)
        assert status == 400 and "does not match the model's" in answer_["error"], answer_
        # A declared length beyond what the model can take: 413 before a byte is read.
        reader, _ = await raw(port, head(length=57 * 2**20))
        status, _, body = await answer(reader)
        assert status == 413 and b"max_batch_size" in body
        # Two bodies on their way: the second declared length passes max_pending_bytes.
        first = await raw(port, head(length=40_000) + b"{")
        await eventually(lambda: running.intake.bytes == 40_000, "the first body's bytes held")
        second, writer = await raw(port, head(length=40_000) + b"{")
        status, headers, body = await answer(second)
        assert status == 429 and b"max_pending_bytes" in body and headers["retry-after"] == "1"
        assert running.intake.bytes == 40_000
        first[1].close()
        await healthy(port)


async def test_client_faults_answered_quietly_and_without_a_banner(
        rest: RunningServer, caplog: pytest.LogCaptureFixture) -> None:
    port = rest.http_port
    caplog.set_level(logging.DEBUG)
    reader, _ = await raw(port, b"GARBAGE \x00\xff /\r\n\r\n")
    status, headers, _ = await answer(reader)
    assert status == 400 and "aiohttp" not in headers.get("server", "").lower()
    reader, _ = await raw(port, b"GET /v2 HTTP/1.1\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n")
    status, headers, _ = await answer(reader)
    assert status in (400, 431) and "python" not in headers.get("server", "").lower()
    status, answer_ = await ok_infer(port, infer_body(), Content_Encoding="zstd")
    assert status == 415
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{port}/v2/models/digits/versions/{'9' * 5000}"
                               ) as response:
            assert response.status == 400
            assert "aiohttp" not in response.headers.get("Server", "").lower()
    # A client that goes away mid-body.
    _, writer = await raw(port, head(length=10_000) + b'{"inputs": [')
    await asyncio.sleep(0.05)
    writer.transport.abort()
    await asyncio.sleep(0.2)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]
    assert not [r for r in caplog.records if r.exc_info and r.levelno >= logging.WARNING]
    status, _ = await ok_infer(port)
    assert status == 200
