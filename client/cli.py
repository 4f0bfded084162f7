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
from snapserve.client.inputs import InputFileError, fit_input, read_input
from snapserve.client.channels import DEFAULT_TARGET, DEFAULT_TIMEOUT_S
from snapserve.client.messages import ModelSummary, Prediction
from snapserve.client.sync_client import EnsembleClient


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
