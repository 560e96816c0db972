"""The rules a batch is checked against, shared by the checks of its bytes (``checks``, ``shape``) and those of
the instance's history (``ingest``): names, kinds, phases, where a refusal falls, and the stream-level refusals.

A refusal's stage says where it falls among the checks that need the instance's history, so that a batch is
refused with the same first reason whichever process found it:

1. ``STAGE_HEADER``: the header, the size, the devices;
2. ``STAGE_WORKLOAD``: workload ``index``'s names and phase, a series sent twice, in turn with each workload's
   device being known (in the batch, or sent before by the instance: history);
3. ``STAGE_SAMPLES``: the samples (times, counters); then each series' first sample against the instance's last
   stored one (history);
4. ``STAGE_POWER``: the power arrays' lengths.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from collector.errors import WattmeterError

PROTOCOL_MAJOR = 1
DEVICE_KINDS = frozenset({"gpu", "cpu", "dram"})
PHASES = frozenset({"training", "inference", "unknown"})
SPECIAL_WORKLOADS = frozenset({"idle", "system", "other"})  # sent with phase ""
MAX_NAME = 256  # characters in a hostname, id or workload name
MAX_VALID_NAMES = 65_536  # names remembered as checked (a fleet's hosts, devices and workloads)

STAGE_HEADER = 1
STAGE_WORKLOAD = 2
STAGE_SAMPLES = 3
STAGE_POWER = 4

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_valid_names: set[str] = set()


class StreamRefused(WattmeterError):
    """The stream cannot go on (not one bad batch): the gRPC server ends it with a status code."""


class GarbageBatch(StreamRefused):
    """The bytes are not a Batch."""


class NewerProtocol(StreamRefused):
    """The agent speaks a newer major protocol version than this aggregator."""


class HostNotAllowed(StreamRefused):
    """The batch names a host the stream's credentials (client cert, token) do not cover."""


@dataclass(frozen=True)
class Refusal:
    stage: int
    index: int  # the workload's, for STAGE_WORKLOAD
    message: str


class Refused(Exception):
    """A batch breaks a rule (raised inside the checks; the batch is then refused with ``refusal``). ``lookups``:
    for STAGE_WORKLOAD, the workloads before it on devices not in the batch (device, where), which the instance's
    history must know first."""

    def __init__(self, stage: int, message: str, index: int = 0, lookups: list[tuple[str, str]] | None = None) -> None:
        super().__init__(message)
        self.refusal = Refusal(stage, index, message)
        self.lookups = lookups or []


def name_error(what: str, value: str, required: bool = True) -> str | None:
    """Why ``value`` is not a valid name (``what`` says which); None when it is. Valid names are remembered."""
    if value in _valid_names:
        return None
    if not value:
        return f"{what} is empty" if required else None
    if len(value) > MAX_NAME:
        return f"{what} is longer than {MAX_NAME} characters"
    if _CONTROL.search(value):
        return f"{what} {value[:64]!r} has control characters"
    if len(_valid_names) >= MAX_VALID_NAMES:
        _valid_names.clear()
    _valid_names.add(value)
    return None


def too_many_samples(total: int, limit: int) -> str:
    return (
        f"{total} samples, more than max_batch_samples ({limit}): "
        "send smaller batches or raise [ingest] max_batch_samples"
    )


def where_device(index: int, device_id: str) -> str:
    return f"devices[{index}] ({device_id})"


def where_workload(index: int, device_id: str, workload: str, phase: str, job: str) -> str:
    return f"workloads[{index}] ({workload}/{phase}/{job} on {device_id})"
