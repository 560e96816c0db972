"""A fake ``libnvidia-ml.so``: the C library beneath pynvml, so pynvml's own wrappers run in tests.

pynvml looks every C function up with ``getattr(pynvml.nvmlLib, name)``; ``installed(fake)`` puts a
``FakeNvmlLibrary`` there. Its methods take the ctypes arguments pynvml passes (``byref(x)`` arrives as a
CArgObject whose ``_obj`` is ``x``; arrays and plain ctypes values arrive as they are) and return NVML return
codes like the C functions. A function the fake does not define raises AttributeError, which pynvml reports as
``NVMLError_FunctionNotFound``, so a call to a misspelled or unimplemented function fails the test.

Units follow NVML: energy in mJ, power in mW, clocks in MHz, timestamps in microseconds since the epoch.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pynvml

SUCCESS: int = pynvml.NVML_SUCCESS
NOT_SUPPORTED: int = pynvml.NVML_ERROR_NOT_SUPPORTED
_CARG_OBJECT: Any = type(ctypes.byref(ctypes.c_int()))


@dataclass
class FakeProcess:
    """A process on a fake GPU; ``used_memory_bytes=None`` is NVML's "not available"."""

    pid: int
    used_memory_bytes: int | None = None
    graphics: bool = False


@dataclass
class FakeUtilSample:
    """One per-process utilisation sample (``sm_util`` in percent, ``timestamp_us`` since the epoch)."""

    pid: int
    timestamp_us: int
    sm_util: int
    mem_util: int = 0


@dataclass
class FakeGpu:
    """One fake GPU. Flip the fields between reads to simulate what the hardware does.

    ``errors`` forces a return code for a named C function (e.g. ``{"nvmlDeviceGetTemperature": 3}``);
    ``field_errors`` forces a per-field return in ``nvmlDeviceGetFieldValues`` by field id.
    ``lost`` makes every call on this GPU return NVML_ERROR_GPU_IS_LOST.
    """

    uuid: str
    name: str = "NVIDIA H100 80GB HBM3"
    energy_mj: int = 0
    power_mw: int = 100_000
    power_avg_mw: int = 95_000
    module_power_mw: int = 300_000
    supports_energy_field: bool = True
    supports_instant_power: bool = True
    supports_module_power: bool = False
    supports_power_usage: bool = True
    lost: bool = False
    power_limit_mw: int | None = 700_000
    utilization_gpu: int | None = 50
    utilization_memory: int = 20
    memory_total: int = 80 * 1024**3
    memory_used: int | None = 10 * 1024**3
    temperature_c: int | None = 45
    sm_clock_mhz: int | None = 1980
    processes: list[FakeProcess] = field(default_factory=list)
    util_samples: list[FakeUtilSample] | None = field(default_factory=list)
    mig_mode: int | None = None  # None: MIG not supported; else NVML_DEVICE_MIG_DISABLE / _ENABLE
    mig_slots: int = 7
    mig_instances: tuple[int, ...] = ()  # slot indexes that hold a MIG device
    errors: dict[str, int] = field(default_factory=dict)
    field_errors: dict[int, int] = field(default_factory=dict)


class _Struct(pynvml.struct_c_nvmlDevice_t):  # type: ignore[misc]
    """A device handle target; its address identifies the GPU (kept alive by the library)."""


class FakeNvmlLibrary:
    """The fake C library. ``calls`` records ``(function, gpu index or None)`` for every call made."""

    def __init__(self, gpus: list[FakeGpu], clock_us: int = 1_700_000_000_000_000) -> None:
        self.gpus = gpus
        self.clock_us = clock_us  # field timestamps; 0 makes NVML report no timestamp
        self.init_result = SUCCESS
        self.initialized = False
        self.calls: list[tuple[str, int | None]] = []
        self._handles: dict[int, int] = {}  # address of a handle's struct -> GPU index
        self._structs: list[_Struct] = []
        self._mig_structs: dict[tuple[int, int], _Struct] = {}
        for index in range(len(gpus)):
            self._new_handle(index)

        def nvmlErrorString(result: Any) -> bytes:  # a function, because pynvml sets .restype on it
            self._record("nvmlErrorString")
            return f"fake NVML error {int(result)}".encode()

        self.nvmlErrorString = nvmlErrorString

    # -- test controls -------------------------------------------------------------------------------------

    def _new_handle(self, index: int) -> None:
        struct = _Struct()
        if index < len(self._structs):
            self._handles.pop(ctypes.addressof(self._structs[index]), None)
            self._structs[index] = struct
        else:
            self._structs.append(struct)
        self._handles[ctypes.addressof(struct)] = index

    def reattach(self, index: int) -> None:
        """The GPU came back (e.g. after a reset): old handles stop working, new ones must be acquired."""
        self.gpus[index].lost = False
        self._new_handle(index)

    def reload_driver(self) -> None:
        """The driver was unloaded and loaded again: NVML is uninitialised and every old handle is invalid.

        Leave ``init_result`` at an error (e.g. NVML_ERROR_DRIVER_NOT_LOADED) while the driver is still away.
        """
        self.initialized = False
        for index in range(len(self.gpus)):
            self._new_handle(index)

    def count(self, function: str, index: int | None = None) -> int:
        return sum(1 for name, i in self.calls if name == function and (index is None or i == index))

    def advance(self, seconds: float) -> None:
        self.clock_us += int(seconds * 1e6)

    # -- helpers -------------------------------------------------------------------------------------------

    def _record(self, name: str, index: int | None = None) -> None:
        self.calls.append((name, index))

    def _gpu(self, name: str, handle: Any) -> tuple[int, FakeGpu | None, int]:
        """Resolve a handle; returns (index, gpu, return code to give back if not SUCCESS)."""
        if not self.initialized:
            self._record(name)
            return -1, None, pynvml.NVML_ERROR_UNINITIALIZED
        if not isinstance(handle, pynvml.c_nvmlDevice_t):
            raise TypeError(f"{name}: expected a c_nvmlDevice_t handle, got {type(handle).__name__}")
        index = self._handles.get(ctypes.addressof(handle.contents))
        self._record(name, index)
        if index is None:
            return -1, None, pynvml.NVML_ERROR_INVALID_ARGUMENT
        gpu = self.gpus[index]
        if gpu.lost:
            return index, None, pynvml.NVML_ERROR_GPU_IS_LOST
        if name in gpu.errors:
            return index, None, gpu.errors[name]
        return index, gpu, SUCCESS

    @staticmethod
    def _out(ref: Any) -> Any:
        """The ctypes object behind ``byref(x)``."""
        if type(ref) is not _CARG_OBJECT:
            raise TypeError(f"expected byref(...), got {type(ref).__name__}")
        return ref._obj

    def _point(self, ref: Any, struct: _Struct) -> None:
        self._out(ref).contents = struct

    # -- init ----------------------------------------------------------------------------------------------

    def nvmlInitWithFlags(self, flags: int) -> int:
        self._record("nvmlInitWithFlags")
        if self.init_result == SUCCESS:
            self.initialized = True
        return self.init_result

    def nvmlInit_v2(self) -> int:
        return self.nvmlInitWithFlags(0)

    def nvmlShutdown(self) -> int:
        self._record("nvmlShutdown")
        if not self.initialized:
            return int(pynvml.NVML_ERROR_UNINITIALIZED)
        self.initialized = False
        return SUCCESS

    def nvmlSystemGetDriverVersion(self, buf: Any, size: Any) -> int:
        self._record("nvmlSystemGetDriverVersion")
        buf.value = b"550.54.15"
        return SUCCESS

    # -- enumeration ---------------------------------------------------------------------------------------

    def nvmlDeviceGetCount_v2(self, count_ref: Any) -> int:
        self._record("nvmlDeviceGetCount_v2")
        if not self.initialized:
            return int(pynvml.NVML_ERROR_UNINITIALIZED)
        self._out(count_ref).value = len(self.gpus)
        return SUCCESS

    def nvmlDeviceGetHandleByIndex_v2(self, index: ctypes.c_uint, device_ref: Any) -> int:
        i = int(index.value)
        self._record("nvmlDeviceGetHandleByIndex_v2", i)
        if not self.initialized:
            return int(pynvml.NVML_ERROR_UNINITIALIZED)
        if not 0 <= i < len(self.gpus):
            return int(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        if self.gpus[i].lost:
            return int(pynvml.NVML_ERROR_GPU_IS_LOST)
        if "nvmlDeviceGetHandleByIndex_v2" in self.gpus[i].errors:
            return self.gpus[i].errors["nvmlDeviceGetHandleByIndex_v2"]
        self._point(device_ref, self._structs[i])
        return SUCCESS

    def nvmlDeviceGetHandleByUUID(self, uuid: ctypes.c_char_p, device_ref: Any) -> int:
        wanted = (uuid.value or b"").decode()
        for i, gpu in enumerate(self.gpus):
            if gpu.uuid == wanted:
                self._record("nvmlDeviceGetHandleByUUID", i)
                if not self.initialized:
                    return int(pynvml.NVML_ERROR_UNINITIALIZED)
                if gpu.lost:
                    return int(pynvml.NVML_ERROR_GPU_IS_LOST)
                self._point(device_ref, self._structs[i])
                return SUCCESS
        self._record("nvmlDeviceGetHandleByUUID")
        return int(pynvml.NVML_ERROR_NOT_FOUND)

    def nvmlDeviceGetUUID(self, handle: Any, buf: Any, size: ctypes.c_uint) -> int:
        _, gpu, ret = self._gpu("nvmlDeviceGetUUID", handle)
        if gpu is None:
            return ret
        buf.value = gpu.uuid.encode()
        return SUCCESS

    def nvmlDeviceGetName(self, handle: Any, buf: Any, size: ctypes.c_uint) -> int:
        _, gpu, ret = self._gpu("nvmlDeviceGetName", handle)
        if gpu is None:
            return ret
        buf.value = gpu.name.encode()
        return SUCCESS

    # -- MIG -----------------------------------------------------------------------------------------------

    def nvmlDeviceGetMigMode(self, handle: Any, current_ref: Any, pending_ref: Any) -> int:
        _, gpu, ret = self._gpu("nvmlDeviceGetMigMode", handle)
        if gpu is None:
            return ret
        if gpu.mig_mode is None:
            return NOT_SUPPORTED
        self._out(current_ref).value = gpu.mig_mode
        self._out(pending_ref).value = gpu.mig_mode
        return SUCCESS

    def nvmlDeviceGetMaxMigDeviceCount(self, handle: Any, count_ref: Any) -> int:
        _, gpu, ret = self._gpu("nvmlDeviceGetMaxMigDeviceCount", handle)
        if gpu is None:
            return ret
        if gpu.mig_mode is None:
            return NOT_SUPPORTED
        self._out(count_ref).value = gpu.mig_slots
        return SUCCESS

    def nvmlDeviceGetMigDeviceHandleByIndex(self, handle: Any, slot: ctypes.c_uint, mig_ref: Any) -> int:
        index, gpu, ret = self._gpu("nvmlDeviceGetMigDeviceHandleByIndex", handle)
        if gpu is None:
            return ret
        s = int(slot.value)
        if gpu.mig_mode != pynvml.NVML_DEVICE_MIG_ENABLE or s >= gpu.mig_slots:
            return int(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        if s not in gpu.mig_instances:
            return int(pynvml.NVML_ERROR_NOT_FOUND)
        struct = self._mig_structs.setdefault((index, s), _Struct())
        self._point(mig_ref, struct)
        return SUCCESS

    # -- power and energy ----------------------------------------------------------------------------------

    def nvmlDeviceGetFieldValues(self, handle: Any, count: ctypes.c_int32, values_ref: Any) -> int:
        _, gpu, ret = self._gpu("nvmlDeviceGetFieldValues", handle)
        if gpu is None:
            return ret
        values = self._out(values_ref)
        n = int(count.value)
        if n > len(values):
            raise TypeError(f"nvmlDeviceGetFieldValues: count {n} > array length {len(values)}")
        for i in range(n):
            v = values[i]
            v.timestamp = self.clock_us
            v.latencyUsec = 0
            v.nvmlReturn, v.valueType, number = self._field(gpu, int(v.fieldId), int(v.scopeId))
            if v.nvmlReturn == SUCCESS:
                v.value.ullVal = number
        return SUCCESS

    @staticmethod
    def _field(gpu: FakeGpu, field_id: int, scope_id: int) -> tuple[int, int, int]:
        if field_id in gpu.field_errors:
            return gpu.field_errors[field_id], 0, 0
        ull = pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG
        if field_id == pynvml.NVML_FI_DEV_ENERGY and gpu.supports_energy_field:
            return SUCCESS, ull, gpu.energy_mj
        if field_id == pynvml.NVML_FI_DEV_POWER_INSTANT:
            if scope_id == pynvml.NVML_POWER_SCOPE_MODULE:
                if gpu.supports_module_power:
                    return SUCCESS, ull, gpu.module_power_mw
            elif scope_id == pynvml.NVML_POWER_SCOPE_GPU and gpu.supports_instant_power:
                return SUCCESS, ull, gpu.power_mw
        return NOT_SUPPORTED, 0, 0

    def nvmlDeviceGetPowerUsage(self, handle: Any, power_ref: Any) -> int:
        _, gpu, ret = self._gpu("nvmlDeviceGetPowerUsage", handle)
        if gpu is None:
            return ret
        if not gpu.supports_power_usage:
            return NOT_SUPPORTED
        self._out(power_ref).value = gpu.power_avg_mw
        return SUCCESS

    def nvmlDeviceGetEnforcedPowerLimit(self, handle: Any, limit_ref: Any) -> int:
        _, gpu, ret = self._gpu("nvmlDeviceGetEnforcedPowerLimit", handle)
        if gpu is None:
            return ret
        if gpu.power_limit_mw is None:
            return NOT_SUPPORTED
        self._out(limit_ref).value = gpu.power_limit_mw
        return SUCCESS

    # -- status --------------------------------------------------------------------------------------------

    def nvmlDeviceGetUtilizationRates(self, handle: Any, util_ref: Any) -> int:
        _, gpu, ret = self._gpu("nvmlDeviceGetUtilizationRates", handle)
        if gpu is None:
            return ret
        if gpu.utilization_gpu is None:
            return NOT_SUPPORTED
        util = self._out(util_ref)
        util.gpu = gpu.utilization_gpu
        util.memory = gpu.utilization_memory
        return SUCCESS

    def nvmlDeviceGetMemoryInfo(self, handle: Any, memory_ref: Any) -> int:
        _, gpu, ret = self._gpu("nvmlDeviceGetMemoryInfo", handle)
        if gpu is None:
            return ret
        if gpu.memory_used is None:
            return NOT_SUPPORTED
        memory = self._out(memory_ref)
        memory.total = gpu.memory_total
        memory.used = gpu.memory_used
        memory.free = gpu.memory_total - gpu.memory_used
        return SUCCESS

    def nvmlDeviceGetTemperature(self, handle: Any, sensor: ctypes.c_uint, temp_ref: Any) -> int:
        _, gpu, ret = self._gpu("nvmlDeviceGetTemperature", handle)
        if gpu is None:
            return ret
        if gpu.temperature_c is None or int(sensor.value) != pynvml.NVML_TEMPERATURE_GPU:
            return NOT_SUPPORTED
        self._out(temp_ref).value = gpu.temperature_c
        return SUCCESS

    def nvmlDeviceGetClockInfo(self, handle: Any, clock_type: ctypes.c_uint, clock_ref: Any) -> int:
        _, gpu, ret = self._gpu("nvmlDeviceGetClockInfo", handle)
        if gpu is None:
            return ret
        if gpu.sm_clock_mhz is None or int(clock_type.value) != pynvml.NVML_CLOCK_SM:
            return NOT_SUPPORTED
        self._out(clock_ref).value = gpu.sm_clock_mhz
        return SUCCESS

    def _processes(self, name: str, handle: Any, count_ref: Any, infos: Any, graphics: bool) -> int:
        _, gpu, ret = self._gpu(name, handle)
        if gpu is None:
            return ret
        procs = [p for p in gpu.processes if p.graphics == graphics]
        count = self._out(count_ref)
        if not procs:
            count.value = 0
            return SUCCESS
        if infos is None or count.value < len(procs):
            count.value = len(procs)
            return int(pynvml.NVML_ERROR_INSUFFICIENT_SIZE)
        for i, proc in enumerate(procs):
            infos[i].pid = proc.pid
            used = proc.used_memory_bytes
            infos[i].usedGpuMemory = used if used is not None else pynvml.NVML_VALUE_NOT_AVAILABLE_ulonglong.value
        count.value = len(procs)
        return SUCCESS

    def nvmlDeviceGetComputeRunningProcesses_v3(self, handle: Any, count_ref: Any, infos: Any) -> int:
        return self._processes("nvmlDeviceGetComputeRunningProcesses_v3", handle, count_ref, infos, False)

    def nvmlDeviceGetGraphicsRunningProcesses_v3(self, handle: Any, count_ref: Any, infos: Any) -> int:
        return self._processes("nvmlDeviceGetGraphicsRunningProcesses_v3", handle, count_ref, infos, True)

    def nvmlDeviceGetProcessUtilization(
        self, handle: Any, samples: Any, count_ref: Any, last_seen: ctypes.c_ulonglong
    ) -> int:
        _, gpu, ret = self._gpu("nvmlDeviceGetProcessUtilization", handle)
        if gpu is None:
            return ret
        if gpu.util_samples is None:
            return NOT_SUPPORTED
        fresh = [s for s in gpu.util_samples if s.timestamp_us > int(last_seen.value)]
        count = self._out(count_ref)
        if not fresh:
            return int(pynvml.NVML_ERROR_NOT_FOUND)
        if samples is None or count.value < len(fresh):
            count.value = len(fresh)
            return int(pynvml.NVML_ERROR_INSUFFICIENT_SIZE)
        for i, s in enumerate(fresh):
            samples[i].pid = s.pid
            samples[i].timeStamp = s.timestamp_us
            samples[i].smUtil = s.sm_util
            samples[i].memUtil = s.mem_util
        count.value = len(fresh)
        return SUCCESS


@contextmanager
def installed(fake: FakeNvmlLibrary) -> Iterator[FakeNvmlLibrary]:
    """Make pynvml use ``fake`` as its C library for the duration of the block."""
    saved_lib = pynvml.nvmlLib
    saved_cache = dict(pynvml._nvmlGetFunctionPointer_cache)
    pynvml.nvmlLib = fake
    pynvml._nvmlGetFunctionPointer_cache.clear()
    try:
        yield fake
    finally:
        pynvml.nvmlLib = saved_lib
        pynvml._nvmlGetFunctionPointer_cache.clear()
        pynvml._nvmlGetFunctionPointer_cache.update(saved_cache)


@contextmanager
def library_missing() -> Iterator[None]:
    """Make loading libnvidia-ml fail as on a host without the NVIDIA driver (CDLL raises OSError)."""

    def no_library(*args: Any, **kwargs: Any) -> Any:
        raise OSError("libnvidia-ml.so.1: cannot open shared object file: No such file or directory")

    saved_lib, saved_cdll = pynvml.nvmlLib, pynvml.CDLL
    saved_cache = dict(pynvml._nvmlGetFunctionPointer_cache)
    pynvml.nvmlLib = None
    pynvml.CDLL = no_library
    pynvml._nvmlGetFunctionPointer_cache.clear()
    try:
        yield
    finally:
        pynvml.nvmlLib, pynvml.CDLL = saved_lib, saved_cdll
        pynvml._nvmlGetFunctionPointer_cache.clear()
        pynvml._nvmlGetFunctionPointer_cache.update(saved_cache)
