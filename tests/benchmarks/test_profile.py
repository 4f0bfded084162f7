"""benchmarks/profile.py's reading of py-spy and /proc, and the echo server's KServe answer."""

from __future__ import annotations

import os

import numpy as np
import pytest

from benchmarks.echo_server import canned_kserve_response
from benchmarks.profile import loop_shares, thread_kind, thread_times
from snapserve.proto.inference import grpc_service_pb2 as kpb

LOOP = ("thread (100): MainThread;0x1 (libc.so.6);<module> (server/__main__.py:5);"
        "BaseEventLoop.run_forever (asyncio/base_events.py:607);"
        "BaseEventLoop._run_once (asyncio/base_events.py:1922);Handle._run (asyncio/events.py:80)")


def test_loop_samples_are_split_by_the_innermost_owner_and_idle_waits_left_out() -> None:
    raw = "\n".join([
        f"{LOOP};handler (server/api/intake.py:170);_PyEval_EvalFrameDefault (libpython3.11.so) 6",
        f"{LOOP};handler (server/api/intake.py:170);array_from_bytes (proto/tensors.py:9);"
        "frombuffer (numpy/core/multiarray.so) 2",
        f"{LOOP};_handle_rpc (grpc/_cython/_cygrpc/aio/server.pyx.pxi:700) 4",
        f"{LOOP};start_in_thread (server/engine/handoff.py:45);"
        "PyThread_acquire_lock_timed (libpython3.11.so.1.0);0x2 (libc.so.6) 3",
        f"{LOOP};sendmsg (libc.so.6) 5",
        # The loop waiting in select: idle, left out.
        "thread (100);0x1 (libc.so.6);BaseEventLoop.run_forever (asyncio/base_events.py:607);"
        "EpollSelector.select (selectors.py:468);epoll_wait (libc.so.6) 50",
        # Start-up and another thread: left out.
        f"{LOOP};load_version (server/models/loading.py:1) 40",
        "thread (101): Thread-1;Thread.run (threading.py:982);epoll_wait (libc.so.6) 9",
    ])
    shares = loop_shares(raw)
    assert shares["owners"] == pytest.approx({
        "ours (snapserve)": 6 / 20, "numpy": 2 / 20, "grpc.aio (Cython and core)": 4 / 20,
        "waiting (a lock or the GIL)": 3 / 20, "system calls": 5 / 20})
    assert shares["ours"] == pytest.approx({"handler (server/api/intake.py)": 6 / 20,
                                            "array_from_bytes (proto/tensors.py)": 2 / 20})


def test_threads_are_told_apart_by_their_system_names() -> None:
    assert thread_kind("python", 7, 7) == "event loop"
    assert thread_kind("inference-0", 8, 7) == "inference"
    assert thread_kind("default-executo", 9, 7) == "gRPC"
    assert thread_kind("python", 10, 7) == "other"
    own = thread_times(os.getpid())
    assert own[os.getpid()][0] == "event loop" and own[os.getpid()][1] > 0


def test_the_echo_servers_kserve_answer_is_shaped_like_a_real_one() -> None:
    answer = kpb.ModelInferResponse.FromString(canned_kserve_response(classes=10, members=5))
    outputs = {o.name: list(o.shape) for o in answer.outputs}
    assert len(outputs) == len(answer.outputs)  # each output once
    assert outputs["probabilities"] == [1, 10]
    assert outputs["member_kl"] == [1, 5]
    assert len(answer.raw_output_contents) == len(answer.outputs)
    probabilities = np.frombuffer(answer.raw_output_contents[list(outputs).index("probabilities")],
                                  np.float32)
    assert probabilities.sum() == pytest.approx(1.0)
