"""A trivial snapserve server: answers every Predict and KServe ModelInfer with one canned
response, computing nothing. Driving it with `ensemble-client bench` shows what the client and
gRPC alone cost on this machine: the floor under the real server's latency, and the load the
client can generate (so a real server's numbers are not the client's).

    python -m benchmarks.echo_server --port 50999 --classes 10 --members 5
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time

import grpc
import numpy as np

from snapserve.proto.inference import grpc_service_pb2 as kpb
from snapserve.proto.snapserve.v1 import ensemble_pb2 as pb
from snapserve.proto.scores import SCORES
from snapserve.proto.tensors import NUMPY_TO_DTYPE, NUMPY_TO_KSERVE, to_tensor

__all__ = ["canned_kserve_metadata", "canned_kserve_response", "canned_response", "serve"]

logger = logging.getLogger("benchmarks.echo_server")


def canned_response(classes: int, members: int) -> bytes:
    """A PredictResponse for one example, shaped like a real one (same fields, same sizes)."""
    response = pb.PredictResponse(model="echo", version=1)
    for spec in SCORES:  # every score a default answer carries, from the one table
        if not spec.on_request:
            to_tensor(np.zeros(spec.shape(1, members, classes), spec.dtype),
                      getattr(response, spec.name))
    to_tensor(np.full((1, classes), 1 / classes, np.float32), response.probabilities)
    response.top_label.append("0")
    return response.SerializeToString()


def canned_kserve_response(classes: int, members: int) -> bytes:
    """A ModelInferResponse for one example, with the outputs a real one carries."""
    response = kpb.ModelInferResponse(model_name="echo", model_version="1")
    for spec in SCORES:  # every score a default answer carries, from the one table
        if not spec.on_request:
            value = np.zeros(spec.shape(1, members, classes), spec.dtype)
            if spec.name == "probabilities":
                value[:] = 1 / classes
            response.outputs.add(name=spec.name, datatype=NUMPY_TO_KSERVE[value.dtype],
                                 shape=value.shape)
            response.raw_output_contents.append(value.tobytes())
    return response.SerializeToString()


def _metadata(shape: list[int]) -> bytes:
    return pb.ModelMetadata(name="echo", version=1, input=pb.InputSpec(
        name="input", dtype=NUMPY_TO_DTYPE[np.dtype(np.float32)], shape=shape)).SerializeToString()


def canned_kserve_metadata(shape: list[int]) -> bytes:
    return kpb.ModelMetadataResponse(name="echo", versions=["1"], platform="echo", inputs=[
        kpb.ModelMetadataResponse.TensorMetadata(name="input", datatype="FP32", shape=shape)]
    ).SerializeToString()


async def serve(port: int, classes: int, members: int, shape: list[int], delay_s: float = 0.0) -> None:
    answer, metadata = canned_response(classes, members), _metadata(shape)
    kserve_answer, kserve_metadata = canned_kserve_response(classes, members), canned_kserve_metadata(shape)

    async def predict(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        if delay_s:  # stands in for compute, off the event loop as the real server's is
            await asyncio.get_running_loop().run_in_executor(None, time.sleep, delay_s)
        return answer

    async def infer(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        if delay_s:
            await asyncio.get_running_loop().run_in_executor(None, time.sleep, delay_s)
        return kserve_answer

    async def get_model(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return metadata

    async def model_metadata(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return kserve_metadata

    # Generic handlers over raw bytes: no parsing at all, the cheapest server gRPC allows.
    handler = grpc.method_handlers_generic_handler("snapserve.v1.EnsembleService", {
        "Predict": grpc.unary_unary_rpc_method_handler(predict),
        "GetModel": grpc.unary_unary_rpc_method_handler(get_model)})
    kserve = grpc.method_handlers_generic_handler("inference.GRPCInferenceService", {
        "ModelInfer": grpc.unary_unary_rpc_method_handler(infer),
        "ModelMetadata": grpc.unary_unary_rpc_method_handler(model_metadata)})
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler, kserve))
    bound = server.add_insecure_port(f"127.0.0.1:{port}")  # port 0: any free one
    await server.start()
    logger.info("serving on 127.0.0.1:%d", bound)
    await server.wait_for_termination()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=50999)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--members", type=int, default=5)
    parser.add_argument("--shape", type=int, nargs="+", default=[-1, 1, 8, 8],
                        help="input shape GetModel reports (-1: the batch)")
    parser.add_argument("--delay-ms", type=float, default=0.0,
                        help="wait this long before answering, as if computing (default 0)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve(args.port, args.classes, args.members, args.shape, args.delay_ms / 1000))


if __name__ == "__main__":
    main()
