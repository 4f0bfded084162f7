"""A batch's answers when the model refuses part of it: bisection of bad batches.

The common case is one run and one check of the outputs. A run the model refuses is re-run in
halves until the requests it cannot compute are found (`_isolate`), and a non-finite output is
looked for per request: those requests alone are refused, the rest of the batch answered.
"""

from __future__ import annotations

import logging

import numpy as np

from snapserve.proto.scores import EnsembleScores
from snapserve.server.engine.runtime import EnsembleRuntime
from snapserve.server.errors import InferenceError, InvalidInput, ModelRefusedInput, NonFiniteOutput

__all__ = ["REFUSED_MESSAGE", "answer_batch", "join", "split_rows"]

logger = logging.getLogger(__name__)

# What a client is told when the model failed on its values alone: ONNX Runtime's own text
# names internal nodes and tensors, so it goes to the log, not to the caller.
REFUSED_MESSAGE = ("the model could not compute this request's input: its values are outside "
                   "what the model accepts (e.g. an index out of range); the other requests of "
                   "its batch were answered, and the server log has the model's own error")


def answer_batch(runtime: EnsembleRuntime, inputs: list[np.ndarray], allow_nonfinite: bool,
                 name: str) -> tuple[list[EnsembleScores | InvalidInput], list[EnsembleScores]]:
    """Each request's scores or why it is refused, and the answered scores for the observers
    (the whole batch's at once when every request was answered). `name` labels the log line.

    The scores come from the fused graph or numpy over the whole batch, so the caller only
    slices views. The inputs were checked per request, so that a bad one is refused before it
    takes a place in the queue; what only the model can find is found here, with one log line
    for the batch."""
    try:
        scores = runtime.scores(join(inputs))
    except InferenceError as exc:
        results = _halves(runtime, inputs, exc)
    else:
        if allow_nonfinite or np.isfinite(scores.probabilities).all():
            return split_rows(scores, inputs), [scores]
        results = list(split_rows(scores, inputs))
    failed = [r for r in results if isinstance(r, InferenceError)]
    if failed:
        cause = str(failed[0]).splitlines()[0] if str(failed[0]) else type(failed[0]).__name__
        logger.warning("%s: the model could not compute %d of %d requests of a batch (refused "
                       "with INVALID_ARGUMENT; the others were answered): %s",
                       name, len(failed), len(inputs), cause)
    answers = [ModelRefusedInput(REFUSED_MESSAGE) if isinstance(r, InferenceError)
               else r if allow_nonfinite else _finite_or_refused(r, x)
               for r, x in zip(results, inputs)]
    return answers, [a for a in answers if not isinstance(a, InvalidInput)]


def join(inputs: list[np.ndarray]) -> np.ndarray:
    """The requests as one batch: one copy joins them; a lone request's read-only view of its
    message goes as is."""
    return inputs[0] if len(inputs) == 1 else np.concatenate(inputs, axis=0)


def split_rows(scores: EnsembleScores, inputs: list[np.ndarray]) -> list[EnsembleScores]:
    """The batch's scores cut back into each request's rows (views)."""
    if len(inputs) == 1:
        return [scores]
    bounds = np.cumsum([0] + [len(i) for i in inputs]).tolist()
    return [scores.rows(a, b) for a, b in zip(bounds[:-1], bounds[1:])]


def _isolate(runtime: EnsembleRuntime,
             inputs: list[np.ndarray]) -> list[EnsembleScores | InferenceError]:
    """Each request's scores, or the error the model raised on it alone. A failed batch is
    re-run in halves (bisection): k bad requests among n cost about 2k*log2(n) extra runs,
    and the good ones are answered."""
    try:
        return split_rows(runtime.scores(join(inputs)), inputs)
    except InferenceError as exc:
        return _halves(runtime, inputs, exc)


def _halves(runtime: EnsembleRuntime, inputs: list[np.ndarray],
            exc: InferenceError) -> list[EnsembleScores | InferenceError]:
    """After `inputs` failed together with `exc`: each half on its own (_isolate)."""
    if len(inputs) == 1:
        return [exc]
    half = len(inputs) // 2
    return _isolate(runtime, inputs[:half]) + _isolate(runtime, inputs[half:])


def _finite_or_refused(scores: EnsembleScores, x: np.ndarray) -> EnsembleScores | InvalidInput:
    """The scores, or NonFiniteOutput naming the examples whose probabilities are NaN or Inf
    (finite inputs can overflow a model: 3e38 everywhere gives Inf logits, NaN softmax)."""
    finite = np.isfinite(scores.probabilities).reshape(len(x), -1).all(axis=1)
    if finite.all():
        return scores
    bad = np.flatnonzero(~finite).tolist()
    largest = float(np.max(np.abs(x))) if x.size and x.dtype.kind in "fiu" else float("nan")
    return NonFiniteOutput(
        f"the model's output for example{'s' if len(bad) > 1 else ''} "
        f"{', '.join(map(str, bad))} of this request is not finite (NaN or Inf): the input "
        f"drives the model beyond the range of its numbers (largest |value| sent: {largest:.3g}); "
        "send inputs of the scale the model was trained on (normalised as its metadata says)")
