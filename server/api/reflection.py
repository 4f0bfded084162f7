"""gRPC server reflection for every service the server offers, so `grpcurl list` works.

grpc_reflection answers from one descriptor pool; the native and health services live in
protobuf's default pool, the KServe ones in their own (proto.inference.POOL, see
proto/generate.py). So reflection gets a pool of its own holding copies of every file involved.
"""

from __future__ import annotations

import grpc
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import FileDescriptor, ServiceDescriptor
from grpc_reflection.v1alpha import reflection, reflection_pb2

__all__ = ["enable_reflection"]


def _add_file(pool: descriptor_pool.DescriptorPool, file: FileDescriptor, added: set[str]) -> None:
    if file.name in added:
        return
    for dependency in file.dependencies:  # a file's imports must be in the pool before it
        _add_file(pool, dependency, added)
    pool.AddSerializedFile(file.serialized_pb)
    added.add(file.name)


def enable_reflection(server: grpc.aio.Server, services: list[ServiceDescriptor]) -> None:
    """Serve grpc.reflection.v1alpha.ServerReflection describing `services` and itself."""
    services = [*services, reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"]]
    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()
    for service in services:
        _add_file(pool, service.file, added)
    reflection.enable_server_reflection([s.full_name for s in services], server, pool=pool)
