"""Which asyncio HTTP stack and JSON library for the REST front end: measured, not guessed.

    python -m benchmarks.http_stacks [--duration 5] [--concurrency 1,32]

Each candidate server (a subprocess) does what the REST front end does per request, with no
model: it decodes a KServe v2 infer request for one digits example ([1, 1, 8, 8] FP32) into a
numpy array and answers the seven default outputs, in JSON (`data` lists) and in Triton's binary
tensor extension (a JSON header, then the raw bytes). One aiohttp client (keep-alive, one
connection per caller) drives every candidate the same way, so the differences are the
server's; its CPU time per request is read from /proc.

Candidates: aiohttp.web (AppRunner + TCPSite, in the caller's event loop) and Starlette on
uvicorn (httptools parser), each with orjson and with the standard json module. The result went
into docs/performance.md ("The HTTP front end").
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

__all__ = ["main"]

_CLK_TCK = os.sysconf("SC_CLK_TCK")
STACKS = ("aiohttp", "starlette")
JSON_LIBS = ("orjson", "json")
HEADER = "Inference-Header-Content-Length"
_LISTENING = re.compile(r"listening on (\d+)")
CLASSES, MEMBERS = 10, 5


def _outputs() -> list[tuple[str, str, list[int], np.ndarray]]:
    f32, i64 = np.float32, np.int64
    return [("probabilities", "FP32", [1, CLASSES], np.full((1, CLASSES), 0.1, f32)),
            *[(n, "FP32", [1], np.zeros(1, f32)) for n in
              ("predictive_entropy", "expected_entropy", "mutual_information", "vote_disagreement")],
            ("member_kl", "FP32", [1, MEMBERS], np.zeros((1, MEMBERS), f32)),
            ("member_top_class", "INT64", [1, MEMBERS], np.zeros((1, MEMBERS), i64))]


def _codec(json_lib: str) -> tuple[Callable[[bytes], Any], Callable[[Any], bytes]]:
    if json_lib == "orjson":
        import orjson

        return orjson.loads, lambda obj: orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY)
    return json.loads, lambda obj: json.dumps(obj, separators=(",", ":")).encode()


def _answer(json_lib: str) -> Callable[[bytes, str | None], tuple[bytes, dict[str, str]]]:
    """The per-request work: decode the input tensor, encode the outputs."""
    loads, dumps = _codec(json_lib)
    outputs = _outputs()

    def answer(body: bytes, header_length: str | None) -> tuple[bytes, dict[str, str]]:
        if header_length is None:  # JSON tensors
            request = loads(body)
            tensor = request["inputs"][0]
            x = np.asarray(tensor["data"], dtype=np.float32).reshape(tensor["shape"])
            data = [{"name": n, "datatype": d, "shape": s,
                     "data": (a.ravel() if json_lib == "orjson" else a.ravel().tolist())}
                    for n, d, s, a in outputs]
            return dumps({"model_name": "echo", "model_version": "1", "outputs": data}), {}
        size = int(header_length)
        request = loads(body[:size])
        x = np.frombuffer(body[size:], dtype="<f4").reshape(request["inputs"][0]["shape"])
        blobs = [a.tobytes() for *_, a in outputs]
        header = dumps({"model_name": "echo", "model_version": "1", "outputs": [
            {"name": n, "datatype": d, "shape": s, "parameters": {"binary_data_size": len(b)}}
            for (n, d, s, _), b in zip(outputs, blobs)]})
        assert x.size == 64
        return header + b"".join(blobs), {HEADER: str(len(header))}

    return answer


async def _serve_aiohttp(json_lib: str) -> None:
    from aiohttp import web

    answer = _answer(json_lib)

    async def infer(request: web.Request) -> web.Response:
        body, headers = answer(await request.read(), request.headers.get(HEADER))
        content_type = "application/octet-stream" if headers else "application/json"
        return web.Response(body=body, headers=headers, content_type=content_type)

    app = web.Application()
    app.router.add_post("/v2/models/{model}/infer", infer)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    print(f"listening on {runner.addresses[0][1]}", flush=True)
    await asyncio.Event().wait()


def _serve_starlette(json_lib: str) -> None:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    answer = _answer(json_lib)

    async def infer(request: Request) -> Response:
        body, headers = answer(await request.body(), request.headers.get(HEADER))
        media = "application/octet-stream" if headers else "application/json"
        return Response(body, headers=headers, media_type=media)

    app = Starlette(routes=[Route("/v2/models/{model}/infer", infer, methods=["POST"])])
    import socket

    # IPPROTO_TCP named: asyncio sets TCP_NODELAY only on sockets that say so (else Nagle and
    # delayed ACKs add ~40 ms to every answer).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)  # connections wait in the backlog until uvicorn accepts
    print(f"listening on {sock.getsockname()[1]}", flush=True)
    config = uvicorn.Config(app, http="httptools", loop="asyncio", access_log=False,
                            log_level="warning", lifespan="off")
    asyncio.run(uvicorn.Server(config).serve(sockets=[sock]))


def _request(binary: bool) -> tuple[bytes, dict[str, str]]:
    x = np.random.default_rng(0).normal(size=(1, 1, 8, 8)).astype(np.float32)
    if not binary:
        body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 8, 8],
                            "data": x.ravel().tolist()}]}
        return json.dumps(body).encode(), {"Content-Type": "application/json"}
    header = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 8, 8],
                                     "parameters": {"binary_data_size": x.nbytes}}],
                         "parameters": {"binary_data_output": True}}).encode()
    return header + x.tobytes(), {HEADER: str(len(header)),
                                  "Content-Type": "application/octet-stream"}


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


async def _drive(port: int, binary: bool, concurrency: int, duration: float,
                 pid: int) -> dict[str, float]:
    import aiohttp

    body, headers = _request(binary)
    url = f"http://127.0.0.1:{port}/v2/models/echo/infer"
    latencies: list[float] = []
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        async def caller(until: float, record: bool) -> None:
            while (began := time.perf_counter()) < until:
                async with session.post(url, data=body, headers=headers) as response:
                    await response.read()
                    assert response.status == 200
                if record:
                    latencies.append(time.perf_counter() - began)

        await asyncio.gather(*(caller(time.perf_counter() + 1.0, False)
                               for _ in range(concurrency)))  # warm-up
        cpu0 = _cpu_seconds(pid)
        await asyncio.gather(*(caller(time.perf_counter() + duration, True)
                               for _ in range(concurrency)))
        cpu = _cpu_seconds(pid) - cpu0
    ms = np.asarray(latencies) * 1e3
    return {"requests_per_s": len(latencies) / duration, "p50_ms": float(np.percentile(ms, 50)),
            "server_cpu_ms_per_request": 1e3 * cpu / max(len(latencies), 1)}


def _measure(stack: str, json_lib: str, levels: list[int], duration: float) -> list[dict]:
    process = subprocess.Popen([sys.executable, "-m", "benchmarks.http_stacks", "--serve", stack,
                                "--json-lib", json_lib], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        match = _LISTENING.search(process.stdout.readline())
        if match is None:
            raise RuntimeError(f"{stack} did not start")
        port = int(match.group(1))
        rows = []
        for binary in (False, True):
            for level in levels:
                result = asyncio.run(_drive(port, binary, level, duration, process.pid))
                rows.append({"stack": stack, "json": json_lib,
                             "body": "binary" if binary else "JSON", "concurrency": level,
                             **result})
                print(f"{stack:10} {json_lib:7} {rows[-1]['body']:7} c={level:<3} "
                      f"{result['requests_per_s']:8.1f} req/s  p50 {result['p50_ms']:6.2f} ms  "
                      f"server CPU {result['server_cpu_ms_per_request']:.3f} ms/req", flush=True)
        return rows
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=10)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--serve", choices=STACKS, help=argparse.SUPPRESS)
    parser.add_argument("--json-lib", choices=JSON_LIBS, default="orjson", help=argparse.SUPPRESS)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--concurrency", default="1,32")
    args = parser.parse_args(argv)
    if args.serve == "aiohttp":
        asyncio.run(_serve_aiohttp(args.json_lib))
        return 0
    if args.serve == "starlette":
        _serve_starlette(args.json_lib)
        return 0
    levels = [int(c) for c in args.concurrency.split(",")]
    print(f"load average before: {os.getloadavg()}")
    for stack in STACKS:
        for json_lib in JSON_LIBS:
            _measure(stack, json_lib, levels, args.duration)
    print(f"load average after: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
