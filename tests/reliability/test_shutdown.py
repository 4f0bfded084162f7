"""SIGTERM to a `python -m snapserve.server` process under load: health turns NOT_SERVING, every request
the server accepted gets its correct answer, later ones get UNAVAILABLE, and it exits 0.

The load and the checks are benchmarks/soak.py's (run_shutdown), at a smaller size.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.soak import MAX_BATCH, MODEL, Reference, ServerProcess, build_repository, run_shutdown
from tests.support.servers import PINNED_FLAGS

ARGS = (*PINNED_FLAGS, "--max-batch-size", str(MAX_BATCH), "--max-queue-size", "64",
        "--drain-window-s", "1", "--grace-s", "3")


@pytest.fixture(scope="module")
def soak_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_repository(tmp_path_factory.mktemp("soak") / "models")


@pytest.fixture(scope="module")
def reference(soak_repo: Path) -> Reference:
    return Reference(soak_repo / MODEL / "1")


def test_sigterm_under_load_answers_what_was_accepted_and_refuses_the_rest(
        soak_repo: Path, reference: Reference) -> None:
    with ServerProcess(soak_repo, *ARGS) as server:
        report = run_shutdown(server, reference, load_s=1.5, concurrency=32)
        log = "".join(server.log)
    before, after = report.tally_before, report.tally_after
    assert report.exit_code == 0, log
    assert report.health_after_sigterm == ["NOT_SERVING"]  # told before the port closed
    assert before["answered"] > 0 and before["answered"] == before["sent"], before
    # Clients that go elsewhere on UNAVAILABLE (as behind a balancer): nothing is cut off.
    assert after["lost"] == 0 and after["cut_off"] == 0, after
    assert after["refused"] > 0 and set(after["codes"]) <= {"OK", "UNAVAILABLE"}, after
    # Every request the model computed reached its client, with the right answer.
    assert report.computed_unanswered == 0, (report.computed, before, after)
    order = [log.index(line) for line in ("stopping (drain window", f"{MODEL}:1 closed:", "stopped serving")]
    assert order == sorted(order), log


def test_clients_that_keep_retrying_lose_nothing_either(soak_repo: Path,
                                                        reference: Reference) -> None:
    """They keep the server refusing until the grace period ends; what gRPC cuts off at its final
    stop (CANCELLED, grpc/grpc#41785) was never computed, as the server's own count shows."""
    with ServerProcess(soak_repo, *ARGS[:-1], "1") as server:
        report = run_shutdown(server, reference, load_s=1.0, concurrency=16,
                              retry_unavailable_s=0.05)
    assert report.exit_code == 0
    assert report.lost == 0, (report.tally_before, report.tally_after)
    assert report.tally_after["refused"] > 0
    assert report.computed_unanswered == 0
