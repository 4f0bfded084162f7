"""`make demo`: train a snapshot ensemble on MNIST-1D, serve it over gRPC, query it, print a table.

Each step uses the product as a user would: the `trainer` CLI writes a model version, the
`ensemble-server` process serves the repository on 127.0.0.1, and the Python client sends the
held-out test set (raw inputs; the client applies the normalisation the server advertises).

MNIST-1D rather than digits: a small CNN saturates digits (no test error left for an ensemble
to fix or for a score to flag), while on MNIST-1D's 1,000 test sequences it still makes a few
dozen errors, enough to show the ensemble beating its members and the served scores finding
the mistakes (the AUROC line, and the accuracy when the most uncertain 5% are refused).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from snapserve.client import EnsembleClient
from snapserve.trainer.datasets import load_dataset
from snapserve.trainer.metrics import auroc, rejection_curve

ROOT = Path(__file__).resolve().parent.parent
SERVING_LINE = re.compile(r"serving on ([\d.]+):(\d+)")


def train(args: argparse.Namespace) -> None:
    cmd = [sys.executable, "-m", "snapserve.trainer", "train", "--method", "snapshot", "--dataset", args.dataset,
           "--arch", args.arch, "--width", str(args.width), "--epochs", str(args.epochs), "--members", str(args.members),
           "--lr", str(args.lr), "--seed", str(args.seed), "--threads", str(args.threads),
           "--out", str(args.out), "--name", args.name]
    print(f"$ trainer {' '.join(cmd[3:])}", flush=True)
    subprocess.run(cmd, check=True)


def start_server(repository: Path) -> tuple[subprocess.Popen[str], str]:
    """Start `ensemble-server` on a free port and wait for its 'serving on HOST:PORT' line."""
    cmd = [sys.executable, "-m", "snapserve.server", "--model-repository", str(repository),
           "--host", "127.0.0.1", "--port", "0", "--http-port", "0"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, bufsize=1)
    deadline = time.monotonic() + 60
    assert proc.stderr is not None
    for line in proc.stderr:
        sys.stderr.write(f"  [server] {line}")
        match = SERVING_LINE.search(line)
        if match:
            # Keep draining the server's log, or it blocks once the pipe buffer is full.
            threading.Thread(target=_echo, args=(proc.stderr,), daemon=True).start()
            return proc, f"{match.group(1)}:{match.group(2)}"
        if time.monotonic() > deadline:
            break
    proc.kill()
    raise SystemExit("the server did not report 'serving on HOST:PORT' within 60 s")


def _echo(stream) -> None:  # type: ignore[no-untyped-def]
    for line in stream:
        sys.stderr.write(f"  [server] {line}")


def stop_server(proc: subprocess.Popen[str]) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()


def query(target: str, name: str, x: np.ndarray, batch: int) -> dict[str, np.ndarray]:
    """Send the test set in requests of `batch` examples; gather every score the server returns."""
    parts: dict[str, list[np.ndarray]] = {}
    with EnsembleClient(target) as client:
        for start in range(0, len(x), batch):
            # Raw pixels: the model's graphs apply its normalisation.
            pred = client.predict(name, x[start:start + batch], member_probabilities=True)
            for key in ("probabilities", "member_probabilities", "mutual_information",
                        "vote_disagreement", "predictive_entropy", "member_kl"):
                parts.setdefault(key, []).append(getattr(pred, key))
        version = pred.version
    out = {key: np.concatenate(chunks) for key, chunks in parts.items()}
    out["version"] = np.asarray(version)
    return out


def print_table(result: dict[str, np.ndarray], y: np.ndarray) -> None:
    members = result["member_probabilities"]  # [N, M, C]
    ensemble_correct = result["probabilities"].argmax(1) == y
    print(f"\nserved version {int(result['version'])}: {len(y)} held-out test examples, "
          f"{members.shape[1]} members\n")
    print(f"{'model':<12} {'accuracy':>9} {'mean KL to ensemble':>20}")
    for m in range(members.shape[1]):
        acc = (members[:, m].argmax(1) == y).mean()
        print(f"{f'member {m}':<12} {acc:>9.4f} {result['member_kl'][:, m].mean():>20.4f}")
    member_mean = np.mean([(members[:, m].argmax(1) == y).mean() for m in range(members.shape[1])])
    print(f"{'members mean':<12} {member_mean:>9.4f}")
    print(f"{'ensemble':<12} {ensemble_correct.mean():>9.4f}")
    wrong = ~ensemble_correct
    print(f"\n{'disagreement (mean)':<22} {'all':>8} {'correct':>8} {'wrong':>8}")
    for key in ("mutual_information", "vote_disagreement", "predictive_entropy"):
        v = result[key]
        on_wrong = f"{v[wrong].mean():>8.4f}" if wrong.any() else f"{'-':>8}"
        print(f"{key:<22} {v.mean():>8.4f} {v[ensemble_correct].mean():>8.4f} {on_wrong}")
    print_scores_at_work(result, ensemble_correct)
    order = np.argsort(-result["mutual_information"])[:5]
    print("\nmost disputed test examples (highest mutual information):")
    print(f"{'index':>6} {'true':>5} {'pred':>5} {'p(pred)':>8} {'MI':>8} {'votes':>6}  member votes")
    for i in order:
        votes = members[i].argmax(1)
        pred = int(result["probabilities"][i].argmax())
        print(f"{i:>6} {int(y[i]):>5} {pred:>5} {result['probabilities'][i, pred]:>8.3f} "
              f"{result['mutual_information'][i]:>8.4f} {result['vote_disagreement'][i]:>6.2f}  "
              f"{' '.join(str(v) for v in votes)}")


def print_scores_at_work(result: dict[str, np.ndarray], correct: np.ndarray) -> None:
    """Do the served scores flag the ensemble's errors? The AUROC of each (0.5: chance), and
    what refusing the most uncertain 5% of requests by a threshold on one of them buys."""
    keys = ("mutual_information", "vote_disagreement", "predictive_entropy")
    aurocs = {k: auroc(result[k], ~correct) for k in keys}
    print("\nAUROC for flagging the ensemble's errors: " + "  ".join(
        f"{k} {'-' if v is None else f'{v:.3f}'}" for k, v in aurocs.items()))
    for key in ("predictive_entropy", "mutual_information"):
        curve = rejection_curve(result[key], correct, fractions=(0.0, 0.05))
        print(f"refusing the most uncertain 5% ({key} > {curve['threshold'][1]:.4f}, {curve['refused'][1]:.1%} "
              f"refused): accuracy {curve['accuracy'][0]:.4f} -> {curve['accuracy'][1]:.4f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("models"))
    parser.add_argument("--name", default="mnist1d")
    parser.add_argument("--dataset", default="mnist1d")
    parser.add_argument("--arch", default="cnn1d")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--members", type=int, default=5)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    # One thread: a model this small gains little from two, and on a busy machine two threads
    # spin waiting for each other (measured: 50 epochs took 335 s with two, 26 s with one).
    parser.add_argument("--threads", type=int, default=1, help="training threads")
    parser.add_argument("--batch", type=int, default=32, help="examples per request")
    args = parser.parse_args(argv)

    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    started = time.monotonic()
    train(args)
    proc, target = start_server(args.out)
    try:
        data = load_dataset(args.dataset)
        result = query(target, args.name, data.test.x, args.batch)
    finally:
        code = stop_server(proc)
    print_table(result, data.test.y)
    print(f"\nserver stopped (exit code {code}); demo took {time.monotonic() - started:.0f} s")
    return 0 if code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
