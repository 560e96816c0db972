"""The committed gencode in collector/proto matches wattmeter.proto (run `make proto` after editing the .proto)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROTO = "collector/proto/wattmeter.proto"
GENERATED = ("wattmeter_pb2.py", "wattmeter_pb2.pyi", "wattmeter_pb2_grpc.py")


def test_committed_gencode_is_current(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools")
    (tmp_path / "collector" / "proto").mkdir(parents=True)
    shutil.copy(ROOT / PROTO, tmp_path / PROTO)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-I.",
            "--python_out=.",
            "--pyi_out=.",
            "--grpc_python_out=.",
            PROTO,
        ],
        cwd=tmp_path,
        check=True,
    )
    for name in GENERATED:
        fresh = (tmp_path / "collector" / "proto" / name).read_text()
        committed = (ROOT / "collector" / "proto" / name).read_text()
        assert committed == fresh, f"collector/proto/{name} is stale: run `make proto` and commit the result"


def test_messages_round_trip_and_ignore_unknown_fields() -> None:
    from collector.proto import wattmeter_pb2 as pb

    batch = pb.Batch(protocol_major=1, agent_instance_id="a", sequence=7)
    series = batch.devices.add(device_id="gpu0", kind="gpu", source="nvml")
    series.time_ns.extend([1, 2])
    series.energy_j.extend([0.5, 1.0])
    wire = batch.SerializeToString()
    # a newer agent's field (number 99, varint 5) appended: an older reader skips it
    newer = wire + bytes([99 << 3 & 0x7F | 0x80, 99 >> 4, 5])
    parsed = pb.Batch.FromString(newer)
    assert parsed.sequence == 7
    assert list(parsed.devices[0].energy_j) == [0.5, 1.0]


def _older_batch_class() -> type:
    """``Batch`` as an aggregator from before steps and labels (fields 11 and 12) knows it."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    from collector.proto import wattmeter_pb2 as pb

    file = descriptor_pb2.FileDescriptorProto()
    pb.DESCRIPTOR.CopyToProto(file)
    file.name = "older_wattmeter.proto"
    file.package = "older.v1"
    for message in file.message_type:
        for one in [*message.field, *(f for nested in message.nested_type for f in nested.field)]:
            if one.HasField("type_name"):
                one.type_name = one.type_name.replace(".wattmeter.v1.", ".older.v1.")
    for service in file.service:
        for method in service.method:
            method.input_type = method.input_type.replace(".wattmeter.v1.", ".older.v1.")
            method.output_type = method.output_type.replace(".wattmeter.v1.", ".older.v1.")
    batch = next(m for m in file.message_type if m.name == "Batch")
    kept = [f for f in batch.field if f.number not in (11, 12)]
    del batch.field[:]
    batch.field.extend(kept)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("older.v1.Batch"))


def test_steps_and_labels_round_trip_and_an_older_reader_skips_them() -> None:
    from collector.proto import wattmeter_pb2 as pb

    identity = pb.WorkloadIdentity(workload="llama-ft", phase="training", job="42")
    batch = pb.Batch(protocol_major=1, agent_instance_id="a", sequence=3)
    batch.devices.add(device_id="gpu0", kind="gpu", source="nvml", time_ns=[1, 2], energy_j=[0.5, 1.0])
    batch.steps.add(workload=identity, time_ns=[10, 20], count=[5, 2**40 + 7])
    batch.labels.add(workload=identity, labels={"flexible": "true", "team": "nlp"})
    wire = batch.SerializeToString()

    parsed = pb.Batch.FromString(wire)
    assert parsed == batch
    assert list(parsed.steps[0].count) == [5, 2**40 + 7]
    assert dict(parsed.labels[0].labels) == {"flexible": "true", "team": "nlp"}

    older = _older_batch_class()()
    older.ParseFromString(wire)  # an aggregator that knows neither field keeps everything else
    assert older.sequence == 3
    assert list(older.devices[0].energy_j) == [0.5, 1.0]
    assert not hasattr(older, "steps") and not hasattr(older, "labels")

    # a newer agent's field inside a StepSeries (number 15, varint 1) is skipped, the known ones read
    series = pb.StepSeries(workload=identity, time_ns=[10], count=[5]).SerializeToString() + bytes([15 << 3, 1])
    read = pb.StepSeries.FromString(series)
    assert (read.workload.workload, list(read.count)) == ("llama-ft", [5])
