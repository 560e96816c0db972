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
