"""Our proto/inference/*.proto against tritonclient's own descriptors: every field we define has
Triton's name, number, type and label, and every RPC its request and response types and
streaming. Fields and RPCs we leave out are fine (a reader sees them unset / UNIMPLEMENTED)."""

from __future__ import annotations

import pytest
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor
from tritonclient.grpc import model_config_pb2 as triton_config
from tritonclient.grpc import service_pb2 as triton_service

from snapserve.proto.inference import POOL
from snapserve.proto.inference import grpc_service_pb2 as kpb
from snapserve.proto.inference import model_config_pb2 as mc


def _messages(descriptor: Descriptor) -> list[Descriptor]:
    return [descriptor] + [m for nested in descriptor.nested_types for m in _messages(nested)]


OURS = [m for module in (kpb, mc) for top in module.DESCRIPTOR.message_types_by_name.values()
        for m in _messages(top)]


def _field_type(field: FieldDescriptor) -> str:
    if field.message_type is not None:
        return field.message_type.full_name
    return field.enum_type.full_name if field.enum_type is not None else str(field.type)


@pytest.mark.parametrize("ours", OURS, ids=lambda d: d.full_name)
def test_every_field_matches_triton(ours: Descriptor) -> None:
    theirs = triton_service.DESCRIPTOR.pool.FindMessageTypeByName(ours.full_name)
    for field in ours.fields:
        other = theirs.fields_by_name.get(field.name)
        assert other is not None, f"{ours.full_name}.{field.name} is not Triton's"
        assert (field.number, _field_type(field), field.is_repeated) == \
            (other.number, _field_type(other), other.is_repeated), f"{ours.full_name}.{field.name}"
        assert (field.containing_oneof.name if field.containing_oneof else None) == \
            (other.containing_oneof.name if other.containing_oneof else None)


@pytest.mark.parametrize("ours", [e for e in mc.DESCRIPTOR.enum_types_by_name.values()] +
                         [e for m in OURS for e in m.enum_types], ids=lambda e: e.full_name)
def test_every_enum_value_matches_triton(ours: EnumDescriptor) -> None:
    theirs = triton_config.DESCRIPTOR.pool.FindEnumTypeByName(ours.full_name)
    assert {v.name: v.number for v in ours.values}.items() <= \
        {v.name: v.number for v in theirs.values}.items()


def test_every_rpc_matches_triton() -> None:
    ours = kpb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    theirs = triton_service.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert ours.full_name == "inference.GRPCInferenceService"
    for method in ours.methods:
        other = theirs.methods_by_name[method.name]
        assert (method.input_type.full_name, method.output_type.full_name,
                method.client_streaming, method.server_streaming) == \
            (other.input_type.full_name, other.output_type.full_name,
             other.client_streaming, other.server_streaming)
    assert {m.name for m in ours.methods} >= {
        "ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata",
        "ModelInfer", "ModelConfig", "ModelStatistics", "RepositoryIndex",
        "RepositoryModelLoad", "RepositoryModelUnload"}


def test_our_messages_live_in_their_own_pool() -> None:
    # Both definitions of inference.ModelInferRequest are loaded in this process; ours are in
    # proto.inference.POOL, tritonclient's in protobuf's default pool.
    assert kpb.DESCRIPTOR.pool is POOL
    assert POOL.FindMessageTypeByName("inference.ModelInferRequest") is \
        kpb.ModelInferRequest.DESCRIPTOR
    assert triton_service.DESCRIPTOR.pool is not POOL
