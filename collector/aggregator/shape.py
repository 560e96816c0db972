"""A batch's shape: what its fields other than the sample values say (devices, workloads, names, how many samples
each series has, where its arrays lie in the bytes), checked, and the structures the sample checks need.

An agent sends the same shape every second until its devices or workloads change, so ``Shapes`` keeps the last
shape of each agent instance and finds it again in the next batch through its ``wire.Template`` (the same bytes
around the arrays: the same fields, so the same shape). Only a shape that breaks no rule is kept: a batch that
matches one needs only its sample values checked.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from collector.aggregator import wire
from collector.aggregator.columns import Segments
from collector.aggregator.rules import (
    DEVICE_KINDS,
    PHASES,
    SPECIAL_WORKLOADS,
    STAGE_HEADER,
    STAGE_WORKLOAD,
    Refused,
    name_error,
    too_many_samples,
    where_device,
    where_workload,
)
from collector.proto import wattmeter_pb2 as pb
from collector.store.base import Int64Array
from collector.store.rows import DeviceRow, WorkloadKey

DEVICE_KEY: WorkloadKey = ("", "", "")  # a device's own energy in rollups
MAX_SHAPES = 2048  # agent instances whose last shape is kept, per process (~35 KB each: 8 GPUs, 24 workloads)
SeriesKey = tuple[str, tuple[str, str, str] | None]  # (device_id, workload identity or None for the device)


@dataclass(frozen=True)
class Shape:
    samples: int  # time_ns values, all series
    devices: dict[str, bool]  # device_id -> in_host_total, in batch order
    device_ids: list[str]
    device_rows: list[DeviceRow]  # of devices with samples, sorted
    workload_devices: list[str]
    identities: list[WorkloadKey]
    lookups: list[tuple[str, str]]  # (device, where) of workloads on a device not in the batch, in order
    device_segments: Segments
    workload_segments: Segments
    power_counts: list[int]
    # series are numbered devices first, then workloads
    segments: Segments  # of all series
    bucket_devices: npt.NDArray[np.object_]  # per series: its rollups' device
    bucket_keys: npt.NDArray[np.object_]  # per series: its rollups' workload (DEVICE_KEY for a device's own)
    ranks: Int64Array  # per series: its place in the order of (device, workload)
    present_devices: list[int]  # the devices with samples
    present_workloads: list[int]  # the workloads with samples
    present_numbers: Int64Array  # the series with samples
    present_keys: list[SeriesKey]
    present_positions: list[int]  # in batch.devices or batch.workloads

    @property
    def devices_with_samples(self) -> int:
        return len(self.present_devices)

    workload_keys: list[WorkloadKey]  # every workload the rows name, sorted
    # the first count that does not match its time_ns count, in the order the checks meet them; None: all match
    device_count_error: str | None
    workload_count_error: str | None
    power_count_error: str | None

    @property
    def whole(self) -> bool:
        """Every count matches: a batch of this shape breaks no rule but by its sample values."""
        return self.device_count_error is None and self.workload_count_error is None and self.power_count_error is None

    def where(self, workloads: bool, index: int) -> str:
        if not workloads:
            return where_device(index, self.device_ids[index])
        return where_workload(index, self.workload_devices[index], *self.identities[index])

    @classmethod
    def of(cls, batch: pb.Batch, layout: wire.Layout | None, max_samples: int) -> Shape:
        """Check ``batch``'s shape (``layout``: its arrays, None to count them in the parsed message); raises
        ``Refused``."""
        if layout is not None:
            times = [(r[1] - r[0]) // wire.VALUE_BYTES for r in layout.devices]
            energy = [(r[3] - r[2]) // wire.VALUE_BYTES for r in layout.devices]
            power = [(r[5] - r[4]) // wire.VALUE_BYTES for r in layout.devices]
            workload_times = [(r[1] - r[0]) // wire.VALUE_BYTES for r in layout.workloads]
            workload_energy = [(r[3] - r[2]) // wire.VALUE_BYTES for r in layout.workloads]
        else:
            times = [len(s.time_ns) for s in batch.devices]
            energy = [len(s.energy_j) for s in batch.devices]
            power = [len(s.power_w) for s in batch.devices]
            workload_times = [len(s.time_ns) for s in batch.workloads]
            workload_energy = [len(s.energy_j) for s in batch.workloads]
        total = sum(times) + sum(workload_times)
        if total > max_samples:
            raise Refused(STAGE_HEADER, too_many_samples(total, max_samples))
        devices, rows = _devices(batch, times)
        device_ids = list(devices)  # in batch order: a device appears once
        identities, workload_devices, lookups = _workloads(batch, devices)

        def count_error(counts: list[int], of: list[int], what: str, workloads: bool, zero: bool = False) -> str | None:
            for index, (count, expected) in enumerate(zip(counts, of, strict=True)):
                if count != expected and not (zero and count == 0):
                    where = (
                        where_workload(index, workload_devices[index], *identities[index])
                        if workloads
                        else where_device(index, device_ids[index])
                    )
                    return f"{where}: {count} {what} values for {expected} time_ns values"
            return None

        keys: list[SeriesKey] = [(device_id, None) for device_id in device_ids]
        keys += [(device_id, identity) for device_id, identity in zip(workload_devices, identities, strict=True)]
        buckets = [(device_id, DEVICE_KEY) for device_id in device_ids]
        buckets += [(device_id, identity) for device_id, identity in zip(workload_devices, identities, strict=True)]
        ranks = [0] * len(buckets)
        for rank, index in enumerate(sorted(range(len(buckets)), key=buckets.__getitem__)):
            ranks[index] = rank
        present_devices = [i for i, count in enumerate(times) if count]
        present_workloads = [i for i, count in enumerate(workload_times) if count]
        present_numbers = present_devices + [len(times) + i for i in present_workloads]
        workload_keys = {identity for identity, count in zip(identities, workload_times, strict=True) if count}
        if any(times):
            workload_keys.add(DEVICE_KEY)
        return cls(
            samples=total,
            devices=devices,
            device_ids=device_ids,
            device_rows=rows,
            workload_devices=workload_devices,
            identities=identities,
            lookups=lookups,
            device_segments=Segments.of(times),
            workload_segments=Segments.of(workload_times),
            power_counts=power,
            segments=Segments.of(times + workload_times),
            bucket_devices=_objects([device for device, _ in buckets]),
            bucket_keys=_objects([key for _, key in buckets]),
            ranks=np.array(ranks, dtype=np.int64),
            present_devices=present_devices,
            present_workloads=present_workloads,
            present_numbers=np.array(present_numbers, dtype=np.int64),
            present_keys=[keys[n] for n in present_numbers],
            present_positions=present_devices + present_workloads,
            workload_keys=sorted(workload_keys),
            device_count_error=count_error(energy, times, "energy_j", False),
            workload_count_error=count_error(workload_energy, workload_times, "energy_j", True),
            power_count_error=count_error(power, times, "power_w", False, zero=True),
        )


def _objects(items: list[object]) -> npt.NDArray[np.object_]:
    """``items`` as a numpy array of objects (tuples stay items, not rows)."""
    out = np.empty(len(items), dtype=object)
    out[:] = items
    return out


def _devices(batch: pb.Batch, times: list[int]) -> tuple[dict[str, bool], list[DeviceRow]]:
    in_batch: dict[str, bool] = {}  # device_id -> in_host_total
    rows: set[DeviceRow] = set()
    for index, series in enumerate(batch.devices):
        device_id = series.device_id
        error = name_error(f"devices[{index}].device_id", device_id)
        if error:
            raise Refused(STAGE_HEADER, error)
        if device_id in in_batch:
            raise Refused(STAGE_HEADER, f"{where_device(index, device_id)}: the device appears twice in the batch")
        kind = series.kind
        if kind not in DEVICE_KINDS:
            raise Refused(
                STAGE_HEADER,
                f"{where_device(index, device_id)}: unknown device kind {kind[:64]!r} (gpu, cpu or dram)",
            )
        source = series.source
        error = name_error(f"{where_device(index, device_id)}.source", source, required=False)
        if error:
            raise Refused(STAGE_HEADER, error)
        in_host_total = series.in_host_total
        in_batch[device_id] = in_host_total
        if times[index]:
            rows.add((device_id, kind, source, bool(in_host_total)))
    return in_batch, sorted(rows)


def _workloads(
    batch: pb.Batch, in_batch: dict[str, bool]
) -> tuple[list[WorkloadKey], list[str], list[tuple[str, str]]]:
    """Each workload series' identity and device, and (device, where) of those on a device not in the batch."""
    identities: list[WorkloadKey] = []
    device_ids: list[str] = []
    lookups: list[tuple[str, str]] = []
    seen: set[tuple[str, WorkloadKey]] = set()
    for index, series in enumerate(batch.workloads):
        workload = series.workload
        identity = (workload.workload, workload.phase, workload.job)
        device_id = series.device_id
        error = (
            name_error("workload", identity[0])
            or name_error("job", identity[2], required=False)
            or name_error("device_id", device_id)
        )
        if error is None:
            phase = identity[1]
            if phase == "" and identity[0] not in SPECIAL_WORKLOADS:
                error = "phase is empty, which only idle, system and other may have"
            elif phase != "" and phase not in PHASES:
                error = f"unknown phase {phase[:64]!r} (training, inference or unknown)"
            elif (device_id, identity) in seen:
                error = "the series appears twice in the batch"
        if error is not None:
            raise Refused(STAGE_WORKLOAD, f"{where_workload(index, device_id, *identity)}: {error}", index, lookups)
        seen.add((device_id, identity))
        if device_id not in in_batch:
            lookups.append((device_id, where_workload(index, device_id, *identity)))
        identities.append(identity)
        device_ids.append(device_id)
    return identities, device_ids, lookups


class Shapes:
    """The last whole shape of each agent instance (least recently used ones go), and its template."""

    def __init__(self, capacity: int = MAX_SHAPES) -> None:
        self.capacity = capacity
        self._shapes: OrderedDict[str, tuple[wire.Template, Shape]] = OrderedDict()

    def find(self, instance_id: str, data: bytes) -> tuple[Shape, wire.Layout] | None:
        known = self._shapes.get(instance_id)
        if known is None:
            return None
        template, shape = known
        layout = template.match(data)
        if layout is None:
            return None
        self._shapes.move_to_end(instance_id)
        return shape, layout

    def keep(self, instance_id: str, data: bytes, spans: wire.Spans, layout: wire.Layout, shape: Shape) -> None:
        template = wire.Template.of(data, spans, layout) if shape.whole else None
        if template is None:
            return
        self._shapes[instance_id] = (template, shape)
        self._shapes.move_to_end(instance_id)
        while len(self._shapes) > self.capacity:
            self._shapes.popitem(last=False)
