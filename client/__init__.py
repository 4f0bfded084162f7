"""snapserve client: Python API and CLI for snapserve.v1.EnsembleService.

    from snapserve.client import EnsembleClient
    with EnsembleClient("127.0.0.1:50051") as c:
        p = c.predict("digits", x)  # raw inputs: the model normalises them
        p.probabilities, p.mutual_information, p.vote_disagreement

Failures raise ClientError (with .code, a grpc.StatusCode, and .message from the server).
A secured server: EnsembleClient(target, tls_ca=..., tls_cert=..., tls_key=..., token=...)
(client/credentials.py; docs/reliability.md). UNAVAILABLE and RESOURCE_EXHAUSTED are retried
with backoff (retry=RetryPolicy(...), or None), every call has a deadline (timeout=, 30 s), and a
dns:/// target or a list of addresses is balanced round-robin (client/channels.py).
"""

from snapserve.client.async_client import AsyncEnsembleClient
from snapserve.client.channels import RetryPolicy
from snapserve.client.errors import ClientError
from snapserve.client.messages import InputSpec, ModelInfo, ModelSummary, Normalization, Prediction
from snapserve.client.sync_client import EnsembleClient

__all__ = ["AsyncEnsembleClient", "ClientError", "EnsembleClient", "InputSpec", "ModelInfo",
           "ModelSummary", "Normalization", "Prediction", "RetryPolicy"]
