from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class HostIdentity(_message.Message):
    __slots__ = ("hostname", "machine_id", "boot_id")
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    MACHINE_ID_FIELD_NUMBER: _ClassVar[int]
    BOOT_ID_FIELD_NUMBER: _ClassVar[int]
    hostname: str
    machine_id: str
    boot_id: str
    def __init__(self, hostname: _Optional[str] = ..., machine_id: _Optional[str] = ..., boot_id: _Optional[str] = ...) -> None: ...

class DeviceSeries(_message.Message):
    __slots__ = ("device_id", "kind", "source", "time_ns", "energy_j", "power_w", "in_host_total")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    TIME_NS_FIELD_NUMBER: _ClassVar[int]
    ENERGY_J_FIELD_NUMBER: _ClassVar[int]
    POWER_W_FIELD_NUMBER: _ClassVar[int]
    IN_HOST_TOTAL_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    kind: str
    source: str
    time_ns: _containers.RepeatedScalarFieldContainer[int]
    energy_j: _containers.RepeatedScalarFieldContainer[float]
    power_w: _containers.RepeatedScalarFieldContainer[float]
    in_host_total: bool
    def __init__(self, device_id: _Optional[str] = ..., kind: _Optional[str] = ..., source: _Optional[str] = ..., time_ns: _Optional[_Iterable[int]] = ..., energy_j: _Optional[_Iterable[float]] = ..., power_w: _Optional[_Iterable[float]] = ..., in_host_total: _Optional[bool] = ...) -> None: ...

class WorkloadIdentity(_message.Message):
    __slots__ = ("workload", "phase", "job")
    WORKLOAD_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    workload: str
    phase: str
    job: str
    def __init__(self, workload: _Optional[str] = ..., phase: _Optional[str] = ..., job: _Optional[str] = ...) -> None: ...

class WorkloadSeries(_message.Message):
    __slots__ = ("workload", "device_id", "time_ns", "energy_j")
    WORKLOAD_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    TIME_NS_FIELD_NUMBER: _ClassVar[int]
    ENERGY_J_FIELD_NUMBER: _ClassVar[int]
    workload: WorkloadIdentity
    device_id: str
    time_ns: _containers.RepeatedScalarFieldContainer[int]
    energy_j: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, workload: _Optional[_Union[WorkloadIdentity, _Mapping]] = ..., device_id: _Optional[str] = ..., time_ns: _Optional[_Iterable[int]] = ..., energy_j: _Optional[_Iterable[float]] = ...) -> None: ...

class ProcessBinding(_message.Message):
    __slots__ = ("pid", "workload")
    PID_FIELD_NUMBER: _ClassVar[int]
    WORKLOAD_FIELD_NUMBER: _ClassVar[int]
    pid: int
    workload: WorkloadIdentity
    def __init__(self, pid: _Optional[int] = ..., workload: _Optional[_Union[WorkloadIdentity, _Mapping]] = ...) -> None: ...

class StepSeries(_message.Message):
    __slots__ = ("workload", "time_ns", "count")
    WORKLOAD_FIELD_NUMBER: _ClassVar[int]
    TIME_NS_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    workload: WorkloadIdentity
    time_ns: _containers.RepeatedScalarFieldContainer[int]
    count: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, workload: _Optional[_Union[WorkloadIdentity, _Mapping]] = ..., time_ns: _Optional[_Iterable[int]] = ..., count: _Optional[_Iterable[int]] = ...) -> None: ...

class WorkloadLabels(_message.Message):
    __slots__ = ("workload", "labels")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    WORKLOAD_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    workload: WorkloadIdentity
    labels: _containers.ScalarMap[str, str]
    def __init__(self, workload: _Optional[_Union[WorkloadIdentity, _Mapping]] = ..., labels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class RequestSpan(_message.Message):
    __slots__ = ("request_id", "start_ns", "end_ns", "hostname", "workload", "pid", "service_name", "model", "tenant", "labels", "input_tokens", "output_tokens", "prefill_end_ns", "queue_end_ns", "span_id")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    START_NS_FIELD_NUMBER: _ClassVar[int]
    END_NS_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    WORKLOAD_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    SERVICE_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_END_NS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_END_NS_FIELD_NUMBER: _ClassVar[int]
    SPAN_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    start_ns: int
    end_ns: int
    hostname: str
    workload: str
    pid: int
    service_name: str
    model: str
    tenant: str
    labels: _containers.ScalarMap[str, str]
    input_tokens: int
    output_tokens: int
    prefill_end_ns: int
    queue_end_ns: int
    span_id: str
    def __init__(self, request_id: _Optional[str] = ..., start_ns: _Optional[int] = ..., end_ns: _Optional[int] = ..., hostname: _Optional[str] = ..., workload: _Optional[str] = ..., pid: _Optional[int] = ..., service_name: _Optional[str] = ..., model: _Optional[str] = ..., tenant: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., input_tokens: _Optional[int] = ..., output_tokens: _Optional[int] = ..., prefill_end_ns: _Optional[int] = ..., queue_end_ns: _Optional[int] = ..., span_id: _Optional[str] = ...) -> None: ...

class Batch(_message.Message):
    __slots__ = ("protocol_major", "host", "agent_instance_id", "sequence", "created_ns", "oldest_pending_sequence", "devices", "workloads", "spans", "processes", "steps", "labels")
    PROTOCOL_MAJOR_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    AGENT_INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    CREATED_NS_FIELD_NUMBER: _ClassVar[int]
    OLDEST_PENDING_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    WORKLOADS_FIELD_NUMBER: _ClassVar[int]
    SPANS_FIELD_NUMBER: _ClassVar[int]
    PROCESSES_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    protocol_major: int
    host: HostIdentity
    agent_instance_id: str
    sequence: int
    created_ns: int
    oldest_pending_sequence: int
    devices: _containers.RepeatedCompositeFieldContainer[DeviceSeries]
    workloads: _containers.RepeatedCompositeFieldContainer[WorkloadSeries]
    spans: _containers.RepeatedCompositeFieldContainer[RequestSpan]
    processes: _containers.RepeatedCompositeFieldContainer[ProcessBinding]
    steps: _containers.RepeatedCompositeFieldContainer[StepSeries]
    labels: _containers.RepeatedCompositeFieldContainer[WorkloadLabels]
    def __init__(self, protocol_major: _Optional[int] = ..., host: _Optional[_Union[HostIdentity, _Mapping]] = ..., agent_instance_id: _Optional[str] = ..., sequence: _Optional[int] = ..., created_ns: _Optional[int] = ..., oldest_pending_sequence: _Optional[int] = ..., devices: _Optional[_Iterable[_Union[DeviceSeries, _Mapping]]] = ..., workloads: _Optional[_Iterable[_Union[WorkloadSeries, _Mapping]]] = ..., spans: _Optional[_Iterable[_Union[RequestSpan, _Mapping]]] = ..., processes: _Optional[_Iterable[_Union[ProcessBinding, _Mapping]]] = ..., steps: _Optional[_Iterable[_Union[StepSeries, _Mapping]]] = ..., labels: _Optional[_Iterable[_Union[WorkloadLabels, _Mapping]]] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ("agent_instance_id", "acked_sequence", "rejected_sequence", "error")
    AGENT_INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    ACKED_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    REJECTED_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    agent_instance_id: str
    acked_sequence: int
    rejected_sequence: int
    error: str
    def __init__(self, agent_instance_id: _Optional[str] = ..., acked_sequence: _Optional[int] = ..., rejected_sequence: _Optional[int] = ..., error: _Optional[str] = ...) -> None: ...

class SpanReport(_message.Message):
    __slots__ = ("spans",)
    SPANS_FIELD_NUMBER: _ClassVar[int]
    spans: _containers.RepeatedCompositeFieldContainer[RequestSpan]
    def __init__(self, spans: _Optional[_Iterable[_Union[RequestSpan, _Mapping]]] = ...) -> None: ...

class SpanReportResult(_message.Message):
    __slots__ = ("accepted", "rejected", "errors")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    accepted: int
    rejected: int
    errors: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, accepted: _Optional[int] = ..., rejected: _Optional[int] = ..., errors: _Optional[_Iterable[str]] = ...) -> None: ...
