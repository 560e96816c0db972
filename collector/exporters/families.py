"""The agent's metrics: every family ``/metrics`` serves, built from the sampler's latest state."""

from __future__ import annotations

from collections.abc import Sequence

from collector import __version__
from collector.attribution import IDLE, SpecialKey
from collector.exporters.exposition import Family
from collector.readings import DeviceKind
from collector.sampler import Sampler
from collector.workloads.tracker import WorkloadTracker, label_values

GPU_LABELS = ("gpu", "uuid", "model")
CPU_LABELS = ("package", "domain", "source")
GPU_INFO_LABELS = (*GPU_LABELS, "source", "energy_method", "mig_mode", "mig_instances", "power_scope")

# (key, name, help) of the GPU status gauges, read at the slow interval
_GPU_STATUS = (
    ("power_limit_w", "wattmeter_gpu_power_limit_watts", "Enforced GPU power limit (W)."),
    ("utilization_ratio", "wattmeter_gpu_utilization_ratio", "Fraction of time a kernel ran on the GPU (0-1)."),
    ("memory_used_bytes", "wattmeter_gpu_memory_used_bytes", "GPU memory in use (bytes)."),
    ("temperature_c", "wattmeter_gpu_temperature_celsius", "GPU die temperature (degrees Celsius)."),
    ("sm_clock_hz", "wattmeter_gpu_sm_clock_hertz", "GPU SM clock (Hz)."),
    (
        "module_power_w",
        "wattmeter_gpu_module_power_watts",
        "Module-scope power (Grace Hopper: GPU, CPU and memory of the module) (W).",
    ),
)


def sampler_families(sampler: Sampler, extra_sources: Sequence[tuple[str, bool, int]] = ()) -> list[Family]:
    """The device and source families; ``extra_sources`` are (name, up, errors) of parts outside the sampler
    (the workload scanner) that report in ``wattmeter_source_up`` and ``wattmeter_source_errors_total`` too."""
    gpu_energy = Family(
        "wattmeter_gpu_energy_joules",
        "counter",
        "GPU energy (J); counts on from the hardware counter (NVML: energy since driver load).",
        GPU_LABELS,
    )
    gpu_power = Family("wattmeter_gpu_power_watts", "gauge", "GPU power draw now (W).", GPU_LABELS)
    gpu_status = {key: Family(name, "gauge", doc, GPU_LABELS) for key, name, doc in _GPU_STATUS}
    gpu_processes = Family("wattmeter_gpu_processes", "gauge", "Processes running on the GPU.", GPU_LABELS)
    gpu_up = Family(
        "wattmeter_gpu_up", "gauge", "1 if the GPU answered its last read, 0 if it is lost or failing.", GPU_LABELS
    )
    gpu_info = Family(
        "wattmeter_gpu_info",
        "gauge",
        "GPU facts: energy_method is counter (hardware energy counter), integrated (power integrated by the "
        "agent) or simulated.",
        GPU_INFO_LABELS,
    )
    cpu_energy = Family(
        "wattmeter_cpu_energy_joules",
        "counter",
        'CPU/DRAM energy per RAPL domain (J); source="model" marks an estimate, not a measurement.',
        CPU_LABELS,
    )
    cpu_power = Family(
        "wattmeter_cpu_power_watts",
        "gauge",
        'CPU/DRAM power per RAPL domain over the last read interval (W); source="model" is an estimate.',
        CPU_LABELS,
    )
    source_up = Family("wattmeter_source_up", "gauge", "1 if the source's last read succeeded.", ("source",))
    source_errors = Family(
        "wattmeter_source_errors", "counter", "Failed reads and device errors per source.", ("source",)
    )
    durations = Family(
        "wattmeter_source_read_duration_seconds", "histogram", "Time one read of the source took (s).", ("source",)
    )

    for state in sampler.states:
        name = (state.name,)
        source_up.add(name, 1.0 if state.up else 0.0)
        source_errors.add(name, float(state.errors_total))
        histogram = state.read_durations
        durations.add_histogram(name, histogram.cumulative(), histogram.sum_s)
        readings, statuses, device_up = state.readings, state.statuses, state.device_up
        for info in state.devices:
            reading = readings.get(info.device_id)
            if info.kind is DeviceKind.GPU:
                labels = (str(info.index), info.uuid, info.model)
                attributes = dict(info.attributes)
                gpu_info.add(
                    (
                        *labels,
                        info.source,
                        info.method.value,
                        attributes.get("mig_mode", ""),
                        attributes.get("mig_instances", "0"),
                        attributes.get("power_scope", "gpu"),
                    ),
                    1.0,
                )
                gpu_up.add(labels, 1.0 if state.up and device_up.get(info.device_id) else 0.0)
                if reading is not None:
                    gpu_energy.add(labels, reading.energy_j)
                    if reading.power_w is not None:
                        gpu_power.add(labels, reading.power_w)
                status = statuses.get(info.device_id)
                if status is None:
                    continue
                for key, family in gpu_status.items():
                    value = getattr(status, key)
                    if value is not None:
                        family.add(labels, float(value))
                gpu_processes.add(labels, float(len(status.processes)))
            elif reading is not None:
                labels = (info.package, info.domain, info.source)
                cpu_energy.add(labels, reading.energy_j)
                if reading.power_w is not None:
                    cpu_power.add(labels, reading.power_w)

    for extra_name, up, errors in extra_sources:
        source_up.add((extra_name,), 1.0 if up else 0.0)
        source_errors.add((extra_name,), float(errors))

    build = Family("wattmeter_build_info", "gauge", "Wattmeter version.", ("version",))
    build.add((__version__,), 1.0)
    return [
        gpu_energy,
        gpu_power,
        *gpu_status.values(),
        gpu_processes,
        gpu_up,
        gpu_info,
        cpu_energy,
        cpu_power,
        source_up,
        source_errors,
        durations,
        build,
    ]


WORKLOAD_LABELS = ("workload", "phase", "job", "device")
WORKLOAD_INFO_LABELS = ("workload", "phase", "job", "namespace", "pod", "container", "unit", "slurm_job")


def workload_families(tracker: WorkloadTracker) -> list[Family]:
    """Energy per workload and device, idle energy per device, energy per phase, and who each workload is."""
    energy = Family(
        "wattmeter_workload_energy_joules",
        "counter",
        "Device energy attributed to a workload (J); workload=system is CPU/DRAM energy in no workload's CPU time, "
        "workload=other the workloads folded past [workloads] max_series.",
        WORKLOAD_LABELS,
    )
    power = Family("wattmeter_workload_power_watts", "gauge", "Workload power on the device (W).", WORKLOAD_LABELS)
    idle = Family("wattmeter_idle_energy_joules", "counter", "GPU energy while no process ran on it (J).", ("device",))
    phase_energy = Family("wattmeter_phase_energy_joules", "counter", "Host energy per workload phase (J).", ("phase",))
    info = Family(
        "wattmeter_workload_info",
        "gauge",
        "Who a workload is: Kubernetes, systemd and Slurm facts.",
        WORKLOAD_INFO_LABELS,
    )
    label_info = Family(
        "wattmeter_workload_label_info",
        "gauge",
        "Labels a workload's processes registered with (collector.client.register(labels=...)), one series each.",
        ("workload", "phase", "job", "label", "value"),
    )
    series, phases = tracker.snapshot()
    workloads = set()
    for key, device_id, joules, power_w in series:
        if key == IDLE:
            idle.add((device_id,), joules)
            continue
        labels = (*label_values(key), device_id)
        energy.add(labels, joules)
        power.add(labels, power_w)
        if not isinstance(key, SpecialKey):
            workloads.add(key)
    for phase in sorted(phases):
        phase_energy.add((phase,), phases[phase])
    for key in sorted(workloads):
        identity = tracker.identities.get(key)
        if identity is not None:
            info.add(
                (*key, identity.namespace, identity.pod, identity.container, identity.unit, identity.slurm_job), 1.0
            )
            for name, value in identity.labels:
                label_info.add((*key, name, value), 1.0)
    return [energy, power, idle, phase_energy, info, label_info]
