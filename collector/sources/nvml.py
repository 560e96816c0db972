"""NVIDIA GPUs through NVML: energy from the driver's total-energy counter, power, and slow-changing status.

Units: NVML reports energy in millijoules, power in milliwatts, clocks in MHz and field timestamps in
microseconds since the Unix epoch; everything leaving this module is in joules, watts, hertz and nanoseconds.

Every NVML call goes through one boundary (``_nvml_boundary``) that maps ``pynvml.NVMLError`` to
``collector.errors``: errors that concern the library as a whole become ``SourceError``, the rest concern one
GPU and become ``DeviceLost`` (or ``PermissionDeniedError``). A GPU that fails is retried with exponential
backoff while the others keep going. When the library as a whole fails (a driver reload), ``read`` raises
``SourceError`` and re-initialises NVML with the same backoff, keeping every GPU's energy total.
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

from collector.config import AgentConfig
from collector.counters import EnergyCounter, PowerIntegrator
from collector.errors import DeviceLost, PermissionDeniedError, SourceError, SourceUnavailable
from collector.readings import DeviceInfo, DeviceKind, DeviceReading, DeviceStatus, EnergyMethod, GpuProcess
from collector.sources.base import Source, register_source

log = logging.getLogger(__name__)

T = TypeVar("T")

BACKOFF_INITIAL_S = 1.0
BACKOFF_MAX_S = 60.0

# NVML return codes (nvml.h); fixed by the C ABI, so they need not be looked up on the injected module.
_SUCCESS = 0
_ERROR_UNINITIALIZED = 1
_ERROR_NOT_SUPPORTED = 3
_ERROR_NO_PERMISSION = 4
_ERROR_NOT_FOUND = 6
_ERROR_DRIVER_NOT_LOADED = 9
_ERROR_LIBRARY_NOT_FOUND = 12
_ERROR_FUNCTION_NOT_FOUND = 13
_ERROR_LIB_RM_VERSION_MISMATCH = 18

# Errors after which no GPU can answer: the library, not a device, is broken.
_LIBRARY_ERRORS = frozenset(
    {
        _ERROR_UNINITIALIZED,
        _ERROR_DRIVER_NOT_LOADED,
        _ERROR_LIBRARY_NOT_FOUND,
        _ERROR_FUNCTION_NOT_FOUND,
        _ERROR_LIB_RM_VERSION_MISMATCH,
    }
)


def _error_code(exc: BaseException) -> int | None:
    value = getattr(exc, "value", None)
    return value if isinstance(value, int) else None


def _translate(exc: BaseException, device_id: str) -> SourceError:
    """Map one NVMLError to the collector's error types."""
    code = _error_code(exc)
    if code in _LIBRARY_ERRORS:
        return SourceError(f"NVML: {exc}")
    if code == _ERROR_NO_PERMISSION:
        return PermissionDeniedError(f"{device_id}: NVML: {exc} (run the agent with access to /dev/nvidia*)")
    return DeviceLost(device_id, f"NVML: {exc}")


@contextmanager
def _nvml_boundary(nvml: Any, device_id: str) -> Iterator[None]:
    """The one place where NVML errors become collector errors."""
    try:
        yield
    except nvml.NVMLError as exc:
        raise _translate(exc, device_id) from exc


def _optional(nvml: Any, fn: Callable[..., T], *args: Any, absent: frozenset[int] | None = None) -> T | None:
    """Call ``fn``; None when the GPU does not support it (other errors reach the boundary)."""
    codes = absent if absent is not None else frozenset({_ERROR_NOT_SUPPORTED})
    try:
        return fn(*args)
    except nvml.NVMLError as exc:
        if _error_code(exc) in codes:
            return None
        raise


@dataclass
class _Gpu:
    """State of one GPU. Counters are touched only by ``read``; the rest is shared under the source's lock.

    ``discovered`` is False for a GPU whose description failed at open: it is kept, down, and described again
    when it first answers. ``stale`` means NVML was re-initialised since ``handle`` was acquired.
    """

    index: int
    device_id: str
    uuid: str
    handle: Any
    energy_field: bool
    instant_field: bool
    module_field: bool
    info: DeviceInfo
    discovered: bool = True
    stale: bool = False
    counter: EnergyCounter = field(default_factory=lambda: EnergyCounter(scale_j=1e-3))
    integrator: PowerIntegrator = field(default_factory=PowerIntegrator)
    down_reason: str | None = None
    retry_at_ns: int = 0
    backoff_s: float = BACKOFF_INITIAL_S
    module_power_w: float | None = None
    process_seen_us: int = 0


@dataclass(frozen=True)
class _Sample:
    """What one ``nvmlDeviceGetFieldValues`` call returned for one GPU; absent fields are None."""

    energy_mj: int | None
    energy_ts_us: int
    power_mw: int | None
    power_ts_us: int
    module_power_mw: int | None


class NvmlSource(Source):
    """NVIDIA GPUs, one ``DeviceInfo`` per physical GPU (``gpu{index}`` in NVML's enumeration order).

    Energy comes from ``NVML_FI_DEV_ENERGY`` (mJ since driver load; Volta and later), folded into a total that
    never goes backwards across driver reloads and GPU resets. Older GPUs have their power integrated instead
    (``EnergyMethod.INTEGRATED``). Power is ``NVML_FI_DEV_POWER_INSTANT`` (mW), or
    ``nvmlDeviceGetPowerUsage`` (mW, a 1 s average on Ampere and Hopper) only where that field is missing.

    ``nvml`` is the pynvml module (injectable for tests); ``monotonic_ns`` is the clock for ``mono_ns``, backoff
    and power integration, ``time_ns`` the wall time used for ``time_ns`` when NVML gives no field timestamp.
    ``library_path`` loads libnvidia-ml from that path instead of the dynamic loader's default.
    """

    name = "nvml"

    def __init__(
        self,
        interval_s: float = 0.1,
        slow_interval_s: float | None = 1.0,
        nvml: Any = None,
        monotonic_ns: Callable[[], int] = time.monotonic_ns,
        time_ns: Callable[[], int] = time.time_ns,
        library_path: str | None = None,
    ) -> None:
        if nvml is None:
            import pynvml

            nvml = pynvml
        self.interval_s = interval_s
        self.slow_interval_s = slow_interval_s
        self._nvml = nvml
        self._monotonic_ns = monotonic_ns
        self._time_ns = time_ns
        self._library_path = library_path
        self._gpus: list[_Gpu] = []
        # Guards the fields of _Gpu that read() and read_status() share, and the library state below; never
        # held across an NVML call.
        self._lock = threading.Lock()
        self._opened = False
        # Set while NVML as a whole is broken: why, and when read() next re-initialises it.
        self._library_down: str | None = None
        self._library_retry_at_ns = 0
        # None while NVML works; kept across a re-initialisation until a read succeeds, so it keeps growing
        # when NVML initialises but fails again at once.
        self._library_backoff_s: float | None = None
        self._warned: set[str] = set()  # messages already logged by _warn_once

    # -- lifecycle -------------------------------------------------------------------------------------------

    def open(self) -> None:
        """Initialise NVML and describe every GPU; raises SourceUnavailable when there is no usable GPU."""
        nvml = self._nvml
        self._init_library()
        self._opened = True
        try:
            with _nvml_boundary(nvml, "nvml"):
                count = int(nvml.nvmlDeviceGetCount())
        except SourceError as exc:
            self.close()
            raise SourceUnavailable(f"NVML could not count GPUs: {exc}") from exc
        if count == 0:
            self.close()
            raise SourceUnavailable("NVML found no usable NVIDIA GPU on this host")
        gpus: list[_Gpu] = []
        for index in range(count):
            try:
                gpu = self._discover(index)
            except (DeviceLost, PermissionDeniedError) as exc:
                # Kept as a known GPU that is down (wattmeter_gpu_up 0), described again once it answers.
                gpu = self._undiscovered(index)
                self._mark_down(gpu, str(exc), self._monotonic_ns())
            except SourceError:
                self.close()  # the library broke while opening: the caller retries open()
                raise
            gpus.append(gpu)
        self._gpus = gpus

    def _init_library(self) -> None:
        nvml = self._nvml
        try:
            if self._library_path is not None and nvml.nvmlLib is None:
                nvml.nvmlLib = ctypes.CDLL(self._library_path)
            nvml.nvmlInit()
        except OSError as exc:
            raise SourceUnavailable(f"NVML library could not be loaded: {exc}") from exc
        except nvml.NVMLError as exc:
            code = _error_code(exc)
            if code == _ERROR_LIBRARY_NOT_FOUND:
                reason = "libnvidia-ml.so.1 not found (no NVIDIA driver installed)"
            elif code == _ERROR_DRIVER_NOT_LOADED:
                reason = "NVIDIA driver not loaded"
            else:
                reason = str(exc)
            raise SourceUnavailable(f"NVML unavailable: {reason}") from exc

    def _undiscovered(self, index: int) -> _Gpu:
        """A GPU NVML counts but could not describe: UUID and model unknown until it answers."""
        return self._gpu(index, handle=None, uuid="", model="", fields=(False, False, False), attributes=())

    def _discover(self, index: int) -> _Gpu:
        nvml = self._nvml
        with _nvml_boundary(nvml, f"gpu{index}"):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            uuid = _text(nvml.nvmlDeviceGetUUID(handle))
            model = _text(nvml.nvmlDeviceGetName(handle))
            fields = self._probe_fields(handle)
            attributes = (*self._mig_attributes(handle), ("power_scope", "module" if fields[2] else "gpu"))
        return self._gpu(index, handle, uuid, model, fields, attributes)

    def _gpu(
        self,
        index: int,
        handle: Any,
        uuid: str,
        model: str,
        fields: tuple[bool, bool, bool],
        attributes: tuple[tuple[str, str], ...],
    ) -> _Gpu:
        energy_field, instant_field, module_field = fields
        device_id = f"gpu{index}"
        info = DeviceInfo(
            device_id=device_id,
            kind=DeviceKind.GPU,
            source=self.name,
            vendor="NVIDIA",
            model=model,
            index=index,
            uuid=uuid,
            method=EnergyMethod.COUNTER if energy_field or handle is None else EnergyMethod.INTEGRATED,
            attributes=attributes,
        )
        return _Gpu(
            index=index,
            device_id=device_id,
            uuid=uuid,
            handle=handle,
            energy_field=energy_field,
            instant_field=instant_field,
            module_field=module_field,
            info=info,
            discovered=handle is not None,
        )

    def _probe_fields(self, handle: Any) -> tuple[bool, bool, bool]:
        """Which of energy, instant power and module-scope power this GPU answers (asked once, at open)."""
        nvml = self._nvml
        ids = [
            nvml.NVML_FI_DEV_ENERGY,
            nvml.NVML_FI_DEV_POWER_INSTANT,
            (nvml.NVML_FI_DEV_POWER_INSTANT, nvml.NVML_POWER_SCOPE_MODULE),
        ]
        values = _optional(
            nvml,
            nvml.nvmlDeviceGetFieldValues,
            handle,
            ids,
            absent=frozenset({_ERROR_NOT_SUPPORTED, _ERROR_FUNCTION_NOT_FOUND}),
        )
        if values is None:
            return False, False, False
        ok = [int(v.nvmlReturn) == _SUCCESS for v in values]
        return ok[0], ok[1], ok[2]

    def _mig_attributes(self, handle: Any) -> tuple[tuple[str, str], ...]:
        nvml = self._nvml
        modes = _optional(nvml, nvml.nvmlDeviceGetMigMode, handle)
        if modes is None:
            return (("mig_mode", "unsupported"),)
        if int(modes[0]) != nvml.NVML_DEVICE_MIG_ENABLE:
            return (("mig_mode", "disabled"),)
        slots = _optional(nvml, nvml.nvmlDeviceGetMaxMigDeviceCount, handle) or 0
        absent = frozenset({_ERROR_NOT_FOUND, _ERROR_NOT_SUPPORTED, 2})  # 2: NVML_ERROR_INVALID_ARGUMENT
        instances = sum(
            _optional(nvml, nvml.nvmlDeviceGetMigDeviceHandleByIndex, handle, slot, absent=absent) is not None
            for slot in range(int(slots))
        )
        return (("mig_mode", "enabled"), ("mig_instances", str(instances)))

    def devices(self) -> Sequence[DeviceInfo]:
        """The GPUs as described now. A GPU that failed discovery at open has uuid "" and model "" here until it
        first answers; the sampler takes ``devices()`` once, at open, so its labels keep those until a restart.
        """
        with self._lock:
            return tuple(gpu.info for gpu in self._gpus)

    def close(self) -> None:
        """Shut NVML down; errors are swallowed because there is nothing left to do about them."""
        if not self._opened:
            return
        self._opened = False
        try:
            self._nvml.nvmlShutdown()
        except Exception as exc:  # close must not fail the agent's shutdown
            log.debug("NVML shutdown failed: %s", exc)

    # -- fast path -------------------------------------------------------------------------------------------

    def read(self) -> Sequence[DeviceReading]:
        """One reading per GPU that answered: energy in J (monotonic), power in W, times in ns.

        Makes at most one ``nvmlDeviceGetFieldValues`` call per GPU. Raises SourceError only when NVML as a
        whole stopped working (uninitialised, driver gone); a failing GPU is just left out. After such an error
        NVML is re-initialised at the first read past the backoff (1 s doubling to 60 s); until then every read
        raises SourceError without calling NVML.
        """
        with self._lock:
            library_down, retry_at_ns = self._library_down, self._library_retry_at_ns
        if library_down is not None:
            mono_ns = self._monotonic_ns()
            if mono_ns < retry_at_ns:
                raise SourceError(library_down)
            self._reinit(mono_ns)
        try:
            readings = self._read_gpus()
        except SourceError as exc:  # _read_gpus handles a GPU's own errors: this one concerns the library
            self._library_failed(str(exc), self._monotonic_ns())
            raise
        if self._library_backoff_s is not None:
            with self._lock:
                self._library_backoff_s = None
        return readings

    def _read_gpus(self) -> list[DeviceReading]:
        readings: list[DeviceReading] = []
        for gpu in self._gpus:
            mono_ns = self._monotonic_ns()
            with self._lock:
                down, stale, retry_at_ns = gpu.down_reason is not None, gpu.stale, gpu.retry_at_ns
            if down and mono_ns < retry_at_ns:
                continue
            refresh = down or stale
            try:
                with _nvml_boundary(self._nvml, gpu.device_id):
                    if not gpu.discovered:
                        handle = self._rediscover(gpu)
                    elif refresh:
                        handle = self._reacquire(gpu)
                    else:
                        handle = gpu.handle
                    sample = self._sample(gpu, handle)
                    power_mw = sample.power_mw
                    power_ts_us = sample.power_ts_us
                    if power_mw is None:
                        power_mw = _optional(self._nvml, self._nvml.nvmlDeviceGetPowerUsage, handle)
                        power_ts_us = 0
            except (DeviceLost, PermissionDeniedError) as exc:
                self._mark_down(gpu, str(exc), mono_ns)
                continue
            if refresh:
                if down:
                    log.info("NVML: %s is back", gpu.device_id)
                # The power drawn while the GPU (or NVML) was away is unknown: integrate afresh, keep the total.
                gpu.integrator.restart()
            readings.append(self._reading(gpu, sample, power_mw, power_ts_us, mono_ns))
            with self._lock:
                gpu.handle = handle
                gpu.stale = False
                gpu.down_reason = None
                gpu.backoff_s = BACKOFF_INITIAL_S
                gpu.module_power_w = sample.module_power_mw / 1000.0 if sample.module_power_mw is not None else None
        return readings

    def _library_failed(self, reason: str, mono_ns: int) -> None:
        """NVML as a whole failed: every handle is now suspect; re-initialise after the backoff."""
        with self._lock:
            first = self._library_backoff_s is None
            backoff_s = BACKOFF_INITIAL_S if self._library_backoff_s is None else self._library_backoff_s * 2.0
            backoff_s = min(backoff_s, BACKOFF_MAX_S)
            self._library_backoff_s = backoff_s
            self._library_down = reason
            self._library_retry_at_ns = mono_ns + int(backoff_s * 1e9)
            for gpu in self._gpus:
                gpu.stale = True
        if first:
            log.warning("NVML stopped working: %s; re-initialising it in %g s", reason, backoff_s)
        else:
            log.debug("NVML still not working: %s; next try in %g s", reason, backoff_s)

    def _reinit(self, mono_ns: int) -> None:
        """Shut NVML down and initialise it again; handles are re-acquired by ``_read_gpus`` (they are stale)."""
        try:
            self._nvml.nvmlShutdown()
        except Exception as exc:  # the library may already be gone; init below is what matters
            log.debug("NVML shutdown before re-initialisation failed: %s", exc)
        try:
            self._init_library()
        except SourceUnavailable as exc:
            reason = f"NVML re-initialisation failed: {exc}"
            self._library_failed(reason, mono_ns)
            raise SourceError(reason) from exc
        with self._lock:
            self._library_down = None
        log.info("NVML re-initialised")

    def _rediscover(self, gpu: _Gpu) -> Any:
        """Describe a GPU that failed discovery at open, keeping its state objects (the counters); its handle."""
        fresh = self._discover(gpu.index)
        with self._lock:
            gpu.uuid = fresh.uuid
            gpu.handle = fresh.handle
            gpu.energy_field = fresh.energy_field
            gpu.instant_field = fresh.instant_field
            gpu.module_field = fresh.module_field
            gpu.info = fresh.info
            gpu.discovered = True
        return fresh.handle

    def _reacquire(self, gpu: _Gpu) -> Any:
        """A fresh handle for a GPU that was down: by UUID (stable across resets), else by index."""
        nvml = self._nvml
        try:
            return nvml.nvmlDeviceGetHandleByUUID(gpu.uuid)
        except nvml.NVMLError:
            return nvml.nvmlDeviceGetHandleByIndex(gpu.index)

    def _sample(self, gpu: _Gpu, handle: Any) -> _Sample:
        nvml = self._nvml
        wanted: list[tuple[str, Any]] = []
        if gpu.energy_field:
            wanted.append(("energy", nvml.NVML_FI_DEV_ENERGY))
        if gpu.instant_field:
            wanted.append(("power", nvml.NVML_FI_DEV_POWER_INSTANT))
        if gpu.module_field:
            wanted.append(("module", (nvml.NVML_FI_DEV_POWER_INSTANT, nvml.NVML_POWER_SCOPE_MODULE)))
        got: dict[str, tuple[int, int]] = {}
        if wanted:
            values = nvml.nvmlDeviceGetFieldValues(handle, [fid for _, fid in wanted])
            for (key, _), value in zip(wanted, values, strict=True):
                ret = int(value.nvmlReturn)
                if ret == _ERROR_NOT_SUPPORTED:
                    continue
                if ret != _SUCCESS:
                    raise nvml.NVMLError(ret)
                got[key] = (_field_int(value), int(value.timestamp))
        energy = got.get("energy")
        power = got.get("power")
        module = got.get("module")
        return _Sample(
            energy_mj=energy[0] if energy else None,
            energy_ts_us=energy[1] if energy else 0,
            power_mw=power[0] if power else None,
            power_ts_us=power[1] if power else 0,
            module_power_mw=module[0] if module else None,
        )

    def _reading(
        self, gpu: _Gpu, sample: _Sample, power_mw: int | None, power_ts_us: int, mono_ns: int
    ) -> DeviceReading:
        wall_ns = self._time_ns()
        power_w = power_mw / 1000.0 if power_mw is not None else None
        if gpu.energy_field:
            if sample.energy_mj is not None:
                gpu.counter.update(sample.energy_mj)
            energy_j = gpu.counter.total_j
            ts_us = sample.energy_ts_us or power_ts_us
        else:
            if power_w is not None:
                # Monotonic time of the read: field timestamps are wall clock, which NTP can step.
                gpu.integrator.update(power_w, mono_ns)
            energy_j = gpu.integrator.total_j
            ts_us = power_ts_us
        return DeviceReading(
            device_id=gpu.device_id,
            energy_j=energy_j,
            power_w=power_w,
            mono_ns=mono_ns,
            time_ns=ts_us * 1000 if ts_us else wall_ns,
        )

    def _warn_once(self, key: str, message: str, *args: object) -> None:
        with self._lock:
            if key in self._warned:
                return
            self._warned.add(key)
        log.warning(message, *args)

    def _mark_down(self, gpu: _Gpu, reason: str, mono_ns: int) -> None:
        with self._lock:
            if gpu.down_reason is None:
                log.warning("NVML: %s down: %s", gpu.device_id, reason)
                gpu.backoff_s = BACKOFF_INITIAL_S
            else:
                gpu.backoff_s = min(gpu.backoff_s * 2.0, BACKOFF_MAX_S)
            gpu.down_reason = reason
            gpu.retry_at_ns = mono_ns + int(gpu.backoff_s * 1e9)

    def device_errors(self) -> dict[str, str]:
        with self._lock:
            return {gpu.device_id: gpu.down_reason for gpu in self._gpus if gpu.down_reason is not None}

    # -- slow path -------------------------------------------------------------------------------------------

    def read_status(self) -> Sequence[DeviceStatus]:
        """Power limit (W), utilisation 0..1, memory used (bytes), temperature (C), SM clock (Hz), processes.

        A value the GPU does not support is None; a GPU that errors is left out (``read`` decides it is down).
        Nothing is read while NVML is down or a GPU's handle is stale (``read`` re-acquires it).
        """
        with self._lock:
            if self._library_down is not None:
                return []
            snapshot = [(gpu, gpu.handle) for gpu in self._gpus if gpu.down_reason is None and not gpu.stale]
        statuses: list[DeviceStatus] = []
        for gpu, handle in snapshot:
            try:
                with _nvml_boundary(self._nvml, gpu.device_id):
                    status = self._status(gpu, handle)
            except SourceError as exc:
                reason = str(exc)
                self._warn_once(f"status {gpu.device_id} {reason}", "NVML: no status for %s: %s", gpu.device_id, reason)
                continue
            statuses.append(status)
        return statuses

    def _status(self, gpu: _Gpu, handle: Any) -> DeviceStatus:
        nvml = self._nvml
        limit_mw = _optional(nvml, nvml.nvmlDeviceGetEnforcedPowerLimit, handle)
        util = _optional(nvml, nvml.nvmlDeviceGetUtilizationRates, handle)
        memory = _optional(nvml, nvml.nvmlDeviceGetMemoryInfo, handle)
        temperature = _optional(nvml, nvml.nvmlDeviceGetTemperature, handle, nvml.NVML_TEMPERATURE_GPU)
        sm_mhz = _optional(nvml, nvml.nvmlDeviceGetClockInfo, handle, nvml.NVML_CLOCK_SM)
        processes, listed = self._processes(gpu, handle)
        with self._lock:
            module_power_w = gpu.module_power_w
        return DeviceStatus(
            device_id=gpu.device_id,
            power_limit_w=limit_mw / 1000.0 if limit_mw is not None else None,
            utilization_ratio=int(util.gpu) / 100.0 if util is not None else None,
            memory_used_bytes=int(memory.used) if memory is not None else None,
            temperature_c=float(temperature) if temperature is not None else None,
            sm_clock_hz=float(sm_mhz) * 1e6 if sm_mhz is not None else None,
            module_power_w=module_power_w,
            processes=processes,
            processes_listed=listed,
        )

    def _processes(self, gpu: _Gpu, handle: Any) -> tuple[tuple[GpuProcess, ...], bool]:
        """The GPU's processes, and whether the driver listed its compute processes at all."""
        nvml = self._nvml
        memory: dict[int, int | None] = {}
        listed = False
        for getter in (nvml.nvmlDeviceGetComputeRunningProcesses, nvml.nvmlDeviceGetGraphicsRunningProcesses):
            found = self._process_query(getter, handle)
            listed = listed or (found is not None and getter is nvml.nvmlDeviceGetComputeRunningProcesses)
            for proc in found or ():
                pid = int(proc.pid)
                used = proc.usedGpuMemory
                if memory.get(pid) is None:
                    memory[pid] = int(used) if used is not None else None
        # NOT_FOUND: no sample since the last timestamp; SUCCESS raised by pynvml when there are zero samples.
        absent = frozenset({_ERROR_NOT_SUPPORTED, _ERROR_NOT_FOUND, _SUCCESS})
        samples = self._process_query(nvml.nvmlDeviceGetProcessUtilization, handle, gpu.process_seen_us, absent=absent)
        # the mean of a process's samples since the last read: its share over the interval, not one instant;
        # once the GPU has samples, a process without any did not run a kernel in that time (0)
        sums: dict[int, list[float]] = {}
        for sample in samples or ():
            pid, stamp = int(sample.pid), int(sample.timeStamp)
            sums.setdefault(pid, []).append(int(sample.smUtil) / 100.0)
            gpu.process_seen_us = max(gpu.process_seen_us, stamp)
        processes = tuple(
            GpuProcess(
                pid=pid,
                used_memory_bytes=used,
                sm_utilization_ratio=(sum(sums[pid]) / len(sums[pid]) if pid in sums else 0.0) if sums else None,
            )
            for pid, used in sorted(memory.items())
        )
        return processes, listed

    def _process_query(
        self, fn: Callable[..., T], *args: Any, absent: frozenset[int] = frozenset({_ERROR_NOT_SUPPORTED})
    ) -> T | None:
        """A process query; NO_PERMISSION (usual in containers) is absent like NOT_SUPPORTED, and logged once."""
        try:
            return _optional(self._nvml, fn, *args, absent=absent)
        except self._nvml.NVMLError as exc:
            if _error_code(exc) != _ERROR_NO_PERMISSION:
                raise
        self._warn_once(
            "process-permission",
            "NVML: not allowed to query GPU processes (%s); per-process metrics are off. Run the agent with access "
            "to other users' processes (as root, sharing the host PID namespace: hostPID: true in Kubernetes).",
            getattr(fn, "__name__", "process query"),
        )
        return None


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _field_int(value: Any) -> int:
    """The integer in an nvmlFieldValue_t, whichever member of the value union NVML filled."""
    kind = int(value.valueType)
    union = value.value
    if kind == 0:  # NVML_VALUE_TYPE_DOUBLE
        return int(union.dVal)
    if kind == 1:
        return int(union.uiVal)
    if kind == 2:
        return int(union.ulVal)
    if kind == 4:
        return int(union.sllVal)
    if kind == 5:
        return int(union.siVal)
    if kind == 6:
        return int(union.usVal)
    return int(union.ullVal)


@register_source("nvml")
def _build(config: AgentConfig) -> NvmlSource | None:
    cfg = config.sources.nvml
    if not cfg.enabled:
        return None
    return NvmlSource(
        interval_s=cfg.interval_s,
        slow_interval_s=cfg.slow_interval_s,
        library_path=cfg.library_path,
    )
