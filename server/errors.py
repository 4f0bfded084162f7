"""The server's named exceptions. Only the API wing turns them into status codes
(`snapserve.server.api.status.STATUS_CODES`, the one table); nothing here knows gRPC."""

from __future__ import annotations


class ServerError(Exception):
    """Base of every error the server raises on purpose."""


class ConfigError(ServerError, ValueError):
    """A configuration value is invalid; the message names the field."""


class ModelNotFound(ServerError, LookupError):
    """No model of that name is loaded."""


class VersionNotFound(ServerError, LookupError):
    """The model is loaded, but not that version."""


class InvalidInput(ServerError, ValueError):
    """A request's input does not fit the model: shape, dtype, batch size, missing."""


class ModelLoadError(ServerError):
    """A model version cannot be served (bad manifest, missing or altered member files)."""

    # A short, fixed word for the metric snapserve_model_load_failures_total{reason}: the
    # message itself is for the log (bounded label values, unbounded messages).
    reason = "load_error"


class ManifestError(ModelLoadError):
    """manifest.json is missing, unreadable, or breaks the repository contract."""

    reason = "manifest"


class MemberFileMissing(ManifestError):
    """A file the manifest names is not in the version folder."""

    reason = "missing_file"


class ChecksumMismatch(ModelLoadError):
    """A member file's sha256 differs from the one in the manifest."""

    reason = "checksum"


class InvalidGraph(ModelLoadError):
    """ONNX Runtime cannot load a graph file (corrupted, truncated, not ONNX)."""

    reason = "invalid_onnx"


class GraphMismatch(ModelLoadError):
    """A graph loads, but its inputs or outputs are not what the manifest declares."""

    reason = "graph_mismatch"


class FusedOutputsMismatch(GraphMismatch):
    """A fused graph has an output that is no score this server knows
    (`snapserve.proto.scores.SCORE_NAMES`), or lacks `FUSED_REQUIRED_SCORES`: it was built for
    other scores than this server computes, so the version is refused. A graph that only lacks
    scores newer than it still loads."""


class ModelSettingsError(ModelLoadError):
    """A model's settings file (model-settings.yaml) does not parse or has a bad key or value."""

    reason = "settings"


class QueueFull(ServerError):
    """The batcher's bounded queue is full; the caller should back off and retry."""


class BatcherClosed(ServerError):
    """The batcher is shutting down and takes no more work."""


class ItemExpired(ServerError):
    """A queued item's deadline passed before it reached the model."""


class ItemTooLarge(ServerError, ValueError):
    """An item holds more examples than one batch may."""


class InferenceError(ServerError):
    """The model failed or returned something other than [batch, classes] logits."""


class ModelRefusedInput(InvalidInput):
    """The model failed on this request's values (an index out of range in an imported model),
    while the requests batched with it computed: the request is at fault, not the model."""


class NonFiniteOutput(InvalidInput):
    """The model's output for a request holds NaN or Inf although its input was finite (values
    that overflow the model): refused rather than answered with NaN probabilities."""


class MalformedRequest(ServerError, ValueError):
    """A request's bytes are not the protobuf message its method takes."""


class Overloaded(ServerError):
    """The server is at its bound of calls (or bytes) received and not yet queued; retry later."""


class InvalidModelName(ServerError, ValueError):
    """A model name that is not a plain name (empty, `..`, a path); refused before any file access."""


class NoLoadableVersion(ServerError):
    """An explicit load found the model in the repository, but none of its versions can be
    served (each refused at load, or none selected by the version policy)."""


class RepositoryControlDenied(ServerError):
    """Explicit model load or unload is not allowed: disabled on this server, or the caller is not
    authorised to do it."""


class ShuttingDown(ServerError):
    """The server is draining before it stops and takes no new calls."""


class Unauthenticated(ServerError):
    """The call carries no valid credentials (bearer token) where the server requires them."""
