"""`ensemble-client` (also `python -m snapserve.client`): query a snapserve server from the shell.

    ensemble-client predict --model digits --input x.npy (or x.csv) [--normalize] [--json] [--no-split]
    ensemble-client models [--json]
    ensemble-client model --model digits
    ensemble-client bench --model digits --concurrency 1,8,32 [--request-rate R] [--json out.json]

Exit status: 0 ok, 1 the server refused the call, 2 bad command line or input file.
"""

from __future__ import annotations

import argparse
import functools
import dataclasses
import json
import os
import sys
from typing import Any, Callable, TextIO

import numpy as np

from snapserve.proto.version import package_version
from snapserve.client.bench import add_bench_parser
from snapserve.client.credentials import read_token_file
from snapserve.client.errors import ClientError
from snapserve.client.channels import DEFAULT_TARGET, DEFAULT_TIMEOUT_S
from snapserve.client.messages import InputSpec, ModelSummary, Prediction
from snapserve.client.sync_client import EnsembleClient


class InputFileError(Exception):
    """The --input file is missing, not a numeric .npy array, or does not fit the model."""


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", default=DEFAULT_TARGET, help="server host:port (default %(default)s)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S,
                        help="per-call deadline in seconds, retries included (default %(default)s)")
    parser.add_argument("--tls", action="store_true",
                        help="use TLS with the system's CA roots (implied by --tls-ca/--tls-cert)")
    parser.add_argument("--tls-ca", default=None, help="PEM CA that signed the server's certificate")
    parser.add_argument("--tls-cert", default=None, help="PEM client certificate (mutual TLS)")
    parser.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    parser.add_argument("--token-file", default=None,
                        help="file whose first line is a bearer token ('#' comments skipped)")


def build_parser() -> argparse.ArgumentParser:
    # allow_abbrev=False: a prefix of one flag must never be read as another.
    parser = argparse.ArgumentParser(prog="ensemble-client",
                                     description="Query a snapserve ensemble server.", allow_abbrev=False)
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    commands = parser.add_subparsers(dest="command", required=True,
                                     parser_class=functools.partial(argparse.ArgumentParser,
                                                                    allow_abbrev=False))

    predict = commands.add_parser("predict", help="predict a batch from a .npy file")
    _common(predict)
    predict.add_argument("--model", required=True)
    predict.add_argument("--version", type=int, default=0, help="0: the server's default")
    predict.add_argument("--input", required=True,
                         help=".npy array [batch, ...] (one example without the batch axis also "
                              "works), or a .csv of one example per row")
    predict.add_argument("--no-split", dest="split", action="store_false",
                         help="refuse a batch above the model's max_batch_size instead of sending "
                              "it as several requests")
    predict.add_argument("--normalize", action="store_true",
                         help="apply the model's (x - mean) / std first: only for versions whose "
                              "input kind is 'normalized' (exported before the graphs normalised); "
                              "a no-op for the others")
    predict.add_argument("--members", action="store_true", help="include member probabilities (JSON)")
    predict.add_argument("--json", action="store_true", help="print JSON instead of a table")
    predict.set_defaults(run=run_predict)

    models = commands.add_parser("models", help="list the served models")
    _common(models)
    models.add_argument("--json", action="store_true")
    models.set_defaults(run=run_models)

    model = commands.add_parser("model", help="print a model's metadata as JSON")
    _common(model)
    model.add_argument("--model", required=True)
    model.add_argument("--version", type=int, default=0)
    model.set_defaults(run=run_model)

    add_bench_parser(commands, _common)  # the load generator: client/bench.py
    return parser


def prediction_table(prediction: Prediction) -> str:
    lines = [f"{prediction.model} version {prediction.version}: {len(prediction)} examples",
             f"{'#':>4}  {'label':<12} {'prob':>7} {'mutual_info':>12} {'vote_disagree':>14}"]
    for i in range(len(prediction)):
        top = prediction.top_class[i]
        lines.append(f"{i:>4}  {str(prediction.top_label[i]):<12} "
                     f"{prediction.probabilities[i, top]:>7.4f} "
                     f"{prediction.mutual_information[i]:>12.5f} "
                     f"{prediction.vote_disagreement[i]:>14.3f}")
    return "\n".join(lines)


def models_table(models: list[ModelSummary]) -> str:
    lines = [f"{'model':<20} {'version':>7} {'members':>7}  {'method':<10} versions"]
    lines += [f"{m.name:<20} {m.version:>7} {m.members:>7}  {m.method:<10} "
              f"{','.join(map(str, m.versions))}" for m in models]
    return "\n".join(lines)


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.dtype):
        return str(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


_CSV_SUFFIXES = (".csv", ".tsv", ".txt")


def read_csv(path: str) -> np.ndarray:
    """A CSV (or TSV) of numbers, one example per row; a header line is skipped."""
    delimiter = "\t" if path.lower().endswith(".tsv") else ","
    try:
        with open(path, encoding="utf-8") as handle:
            first = handle.readline()
        header = any(c.isalpha() and c not in "eE" for c in first) or "nan" in first.lower()
        x = np.loadtxt(path, delimiter=delimiter, skiprows=1 if header else 0, ndmin=2,
                       dtype=np.float64)
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise InputFileError(f"cannot read {path} as CSV (numbers, one example per row, "
                             f"'{delimiter}'-separated): {exc}") from exc
    return x


def read_input(path: str) -> np.ndarray:
    """The --input array, checked before any call: a readable .npy (or CSV) of real numbers."""
    if path.lower().endswith(_CSV_SUFFIXES):
        x = read_csv(path)
        if x.size == 0:
            raise InputFileError(f"{path} holds no numbers; expected one example per row")
        return x
    try:
        x = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        if _is_text(path):
            raise InputFileError(f"{path} is text, not a .npy array: name it .csv to read it as "
                                 "CSV (one example per row), or save it with np.save") from exc
        raise InputFileError(f"cannot read {path} as a .npy array: {exc}") from exc
    if not isinstance(x, np.ndarray):  # an .npz archive
        raise InputFileError(f"{path} is an .npz archive; save one array with np.save")
    if x.dtype.kind not in "biuf" or x.size == 0 or x.ndim == 0:
        raise InputFileError(f"{path} holds a {x.dtype} array of shape {list(x.shape)}; "
                             "expected a non-empty array of numbers")
    return x


def _is_text(path: str) -> bool:
    try:
        with open(path, "rb") as handle:
            head = handle.read(512)
    except OSError:
        return False
    return bool(head) and not head.startswith(b"\x93NUMPY") and all(
        32 <= b < 127 or b in b"\t\r\n" for b in head)


def _fits(shape: tuple[int, ...], expected: tuple[int, ...]) -> bool:
    return len(shape) == len(expected) and all(e == -1 or s == e for s, e in zip(shape, expected))


def _with_unit_axes(shape: tuple[int, ...], expected: tuple[int, ...]) -> tuple[int, ...] | None:
    """`shape` ([B, ...]) as `expected`, with the size-1 axes it lacks put back; None: no fit."""
    if _fits(shape, expected):
        return shape
    batch, *rest = shape
    sizes = iter(rest)
    full = (batch, *(1 if d == 1 else next(sizes, 0) for d in expected[1:]))
    return full if next(sizes, None) is None and _fits(full, expected) else None


def fit_input(x: np.ndarray, spec: InputSpec, path: str = "input") -> np.ndarray:
    """`x` as a batch of the model's input ([B, ...], its dtype). Also accepted: one example
    without the batch axis, and either without the model's size-1 axes (for a [-1, 1, 8, 8]
    model: [B, 8, 8], [1, 8, 8] or [8, 8])."""
    features = tuple(spec.shape[1:])
    flat = (x.shape[0], int(np.prod(features))) if x.ndim == 2 and -1 not in features else None
    for shape in (x.shape, (1, *x.shape)):  # a batch, else one example
        full = _with_unit_axes(shape, spec.shape)
        if full is not None:
            return x.reshape(full).astype(spec.dtype, copy=False)
    if flat is not None and x.shape == flat:  # rows of flat features (a CSV): reshaped
        return x.reshape(x.shape[0], *features).astype(spec.dtype, copy=False)
    raise InputFileError(f"{path} has shape {list(x.shape)}; the model takes {list(spec.shape)} "
                         f"(-1: the batch), or one example of {list(spec.shape[1:])}")


def run_predict(client: EnsembleClient, args: argparse.Namespace, out: TextIO) -> None:
    x = read_input(args.input)  # checked before the server is asked anything
    x = fit_input(x, client.get_model(args.model, args.version).input, args.input)
    prediction = client.predict(args.model, x, version=args.version, normalize=args.normalize,
                                member_probabilities=args.members, split=args.split)
    if args.json:
        json.dump({"model": prediction.model, "version": prediction.version,
                   "examples": prediction.to_records()}, out, indent=2)
        out.write("\n")
    else:
        print(prediction_table(prediction), file=out)


def run_models(client: EnsembleClient, args: argparse.Namespace, out: TextIO) -> None:
    models = client.list_models()
    if args.json:
        json.dump([dataclasses.asdict(m) for m in models], out, indent=2)
        out.write("\n")
    else:
        print(models_table(models), file=out)


def run_model(client: EnsembleClient, args: argparse.Namespace, out: TextIO) -> None:
    info = client.get_model(args.model, args.version)
    json.dump(_jsonable(dataclasses.asdict(info)), out, indent=2)
    out.write("\n")


def main(argv: list[str] | None = None, out: TextIO | None = None) -> int:
    try:
        return _main(argv, out)
    except BrokenPipeError:  # `ensemble-client predict --json | head`: the reader had enough
        # Python flushes stdout again at exit; pointed at /dev/null, that flush is quiet too.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


def _main(argv: list[str] | None, out: TextIO | None) -> int:
    args = build_parser().parse_args(argv)
    out = sys.stdout if out is None else out
    run: Callable[[EnsembleClient, argparse.Namespace, TextIO], None] = args.run
    try:
        client = EnsembleClient(args.target, timeout=args.timeout, tls=args.tls, tls_ca=args.tls_ca,
                                tls_cert=args.tls_cert, tls_key=args.tls_key,
                                token=None if args.token_file is None
                                else read_token_file(args.token_file))
    except ValueError as exc:  # unreadable certificate or token file
        print(f"error: {exc}", file=sys.stderr)
        return 2
    with client:
        try:
            run(client, args, out)
        except ClientError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        except (InputFileError, ValueError) as exc:  # ValueError: normalisation does not fit x
            print(f"error: {exc}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
