"""gRPC server reflection for every service the server offers, so `grpcurl list` works.

grpc_reflection answers from one descriptor pool; the native and health services live in
protobuf's default pool, the KServe ones in their own (proto.inference.POOL, see
proto/generate.py). So reflection gets a pool of its own holding copies of every file involved.
"""

from __future__ import annotations

import grpc
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import FileDescriptor, ServiceDescriptor
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

__all__ = ["enable_reflection"]


def _add_file(pool: descriptor_pool.DescriptorPool, file: FileDescriptor, added: set[str]) -> None:
    if file.name in added:
        return
    for dependency in file.dependencies:  # a file's imports must be in the pool before it
        _add_file(pool, dependency, added)
    pool.AddSerializedFile(file.serialized_pb)
    added.add(file.name)


def enable_reflection(server: grpc.aio.Server,
                      services: list[ServiceDescriptor]) -> dict[str, grpc.RpcMethodHandler]:
    """Serve grpc.reflection.v1alpha.ServerReflection describing `services` and itself; its
    handler, by full method path, for the C++ front end."""
    services = [*services, reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"]]
    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()
    for service in services:
        _add_file(pool, service.file, added)
    servicer = reflection.aio.ReflectionServicer([s.full_name for s in services], pool=pool)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString)
    return {f"/{reflection.SERVICE_NAME}/ServerReflectionInfo": handler}
