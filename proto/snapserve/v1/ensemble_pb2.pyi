from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DataType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DATA_TYPE_UNSPECIFIED: _ClassVar[DataType]
    FLOAT32: _ClassVar[DataType]
    FLOAT64: _ClassVar[DataType]
    FLOAT16: _ClassVar[DataType]
    INT64: _ClassVar[DataType]
    INT32: _ClassVar[DataType]
    INT16: _ClassVar[DataType]
    INT8: _ClassVar[DataType]
    UINT8: _ClassVar[DataType]
    BOOL: _ClassVar[DataType]
DATA_TYPE_UNSPECIFIED: DataType
FLOAT32: DataType
FLOAT64: DataType
FLOAT16: DataType
INT64: DataType
INT32: DataType
INT16: DataType
INT8: DataType
UINT8: DataType
BOOL: DataType

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: DataType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[_Union[DataType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class PredictRequest(_message.Message):
    __slots__ = ("model", "version", "input", "include_member_probabilities", "request_id")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_MEMBER_PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    input: Tensor
    include_member_probabilities: bool
    request_id: str
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., input: _Optional[_Union[Tensor, _Mapping]] = ..., include_member_probabilities: _Optional[bool] = ..., request_id: _Optional[str] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class PredictResponse(_message.Message):
    __slots__ = ("model", "version", "request_id", "probabilities", "top_class", "top_label", "predictive_entropy", "expected_entropy", "mutual_information", "vote_disagreement", "member_kl", "member_top_class", "member_probabilities", "error", "members_evaluated")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    TOP_CLASS_FIELD_NUMBER: _ClassVar[int]
    TOP_LABEL_FIELD_NUMBER: _ClassVar[int]
    PREDICTIVE_ENTROPY_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_ENTROPY_FIELD_NUMBER: _ClassVar[int]
    MUTUAL_INFORMATION_FIELD_NUMBER: _ClassVar[int]
    VOTE_DISAGREEMENT_FIELD_NUMBER: _ClassVar[int]
    MEMBER_KL_FIELD_NUMBER: _ClassVar[int]
    MEMBER_TOP_CLASS_FIELD_NUMBER: _ClassVar[int]
    MEMBER_PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_EVALUATED_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    request_id: str
    probabilities: Tensor
    top_class: Tensor
    top_label: _containers.RepeatedScalarFieldContainer[str]
    predictive_entropy: Tensor
    expected_entropy: Tensor
    mutual_information: Tensor
    vote_disagreement: Tensor
    member_kl: Tensor
    member_top_class: Tensor
    member_probabilities: Tensor
    error: Error
    members_evaluated: Tensor
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., request_id: _Optional[str] = ..., probabilities: _Optional[_Union[Tensor, _Mapping]] = ..., top_class: _Optional[_Union[Tensor, _Mapping]] = ..., top_label: _Optional[_Iterable[str]] = ..., predictive_entropy: _Optional[_Union[Tensor, _Mapping]] = ..., expected_entropy: _Optional[_Union[Tensor, _Mapping]] = ..., mutual_information: _Optional[_Union[Tensor, _Mapping]] = ..., vote_disagreement: _Optional[_Union[Tensor, _Mapping]] = ..., member_kl: _Optional[_Union[Tensor, _Mapping]] = ..., member_top_class: _Optional[_Union[Tensor, _Mapping]] = ..., member_probabilities: _Optional[_Union[Tensor, _Mapping]] = ..., error: _Optional[_Union[Error, _Mapping]] = ..., members_evaluated: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelSummary(_message.Message):
    __slots__ = ("name", "version", "versions", "method", "members")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    versions: _containers.RepeatedScalarFieldContainer[int]
    method: str
    members: int
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., versions: _Optional[_Iterable[int]] = ..., method: _Optional[str] = ..., members: _Optional[int] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelSummary]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelSummary, _Mapping]]] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("model", "version")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class Normalization(_message.Message):
    __slots__ = ("mean", "std", "axis")
    MEAN_FIELD_NUMBER: _ClassVar[int]
    STD_FIELD_NUMBER: _ClassVar[int]
    AXIS_FIELD_NUMBER: _ClassVar[int]
    mean: _containers.RepeatedScalarFieldContainer[float]
    std: _containers.RepeatedScalarFieldContainer[float]
    axis: int
    def __init__(self, mean: _Optional[_Iterable[float]] = ..., std: _Optional[_Iterable[float]] = ..., axis: _Optional[int] = ...) -> None: ...

class InputSpec(_message.Message):
    __slots__ = ("name", "dtype", "shape", "normalization", "kind")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    NORMALIZATION_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: DataType
    shape: _containers.RepeatedScalarFieldContainer[int]
    normalization: Normalization
    kind: str
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[_Union[DataType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., normalization: _Optional[_Union[Normalization, _Mapping]] = ..., kind: _Optional[str] = ...) -> None: ...

class Member(_message.Message):
    __slots__ = ("file", "sha256", "epoch", "step", "lr", "metrics")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    FILE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    file: str
    sha256: str
    epoch: int
    step: int
    lr: float
    metrics: _containers.ScalarMap[str, float]
    def __init__(self, file: _Optional[str] = ..., sha256: _Optional[str] = ..., epoch: _Optional[int] = ..., step: _Optional[int] = ..., lr: _Optional[float] = ..., metrics: _Optional[_Mapping[str, float]] = ...) -> None: ...

class ModelMetadata(_message.Message):
    __slots__ = ("name", "version", "versions", "method", "input", "classes", "members", "metrics", "temperature", "execution_provider", "max_batch_size", "manifest_json", "runtime")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class RuntimeEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    EXECUTION_PROVIDER_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_JSON_FIELD_NUMBER: _ClassVar[int]
    RUNTIME_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    versions: _containers.RepeatedScalarFieldContainer[int]
    method: str
    input: InputSpec
    classes: _containers.RepeatedScalarFieldContainer[str]
    members: _containers.RepeatedCompositeFieldContainer[Member]
    metrics: _containers.ScalarMap[str, float]
    temperature: float
    execution_provider: str
    max_batch_size: int
    manifest_json: str
    runtime: _containers.ScalarMap[str, str]
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., versions: _Optional[_Iterable[int]] = ..., method: _Optional[str] = ..., input: _Optional[_Union[InputSpec, _Mapping]] = ..., classes: _Optional[_Iterable[str]] = ..., members: _Optional[_Iterable[_Union[Member, _Mapping]]] = ..., metrics: _Optional[_Mapping[str, float]] = ..., temperature: _Optional[float] = ..., execution_provider: _Optional[str] = ..., max_batch_size: _Optional[int] = ..., manifest_json: _Optional[str] = ..., runtime: _Optional[_Mapping[str, str]] = ...) -> None: ...
