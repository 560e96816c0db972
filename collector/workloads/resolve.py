"""Resolve a process to the workload its energy is booked under.

Steps, first match wins; each is tried on the process itself, then on its ancestors (parent first, up to but not
including pid 1), before the next step is tried, so workers inherit what names their launcher (torchrun workers,
DataLoader workers, a server's engine processes):

1. registration: the identity a process registered over the agent's socket (``set_registration``);
2. environment: ``WATTMETER_WORKLOAD`` (with ``WATTMETER_PHASE``, ``WATTMETER_JOB``; ``SLURM_JOB_ID`` as the job
   when ``WATTMETER_JOB`` is unset);
3. rules: ``[[workloads.rules]]``, ``match_cmdline`` searched in the space-joined command line;
4. built-in recognisers (``RECOGNISERS``);
5. otherwise the process's own executable name, phase ``unknown``.

Whichever step names the workload, fields it leaves empty are filled in: the job from ``WATTMETER_JOB`` /
``SLURM_JOB_ID`` of the nearest process that sets one, then the Slurm job of the cgroup; the phase (when the
naming step gave none) from a recogniser; pod UID, container id, systemd unit and Slurm job from the process's own
cgroup.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

from collector.config import WorkloadRule
from collector.workloads.identity import PHASES, WorkloadIdentity
from collector.workloads.procfs import ProcessSample, ProcessStatic

StaticsLookup = Callable[[int, int], ProcessStatic | None]


class Recogniser(NamedTuple):
    """A well-known training or inference launcher, recognised from its command line.

    ``patterns`` are regular expressions searched in the space-joined command line. The workload is named after
    the model when one is on the command line (after one of ``model_flags``, ``--flag value`` or ``--flag=value``,
    or as the first positional argument after one of ``model_after``), else ``name``.
    """

    name: str
    phase: str
    patterns: tuple[str, ...]
    example: str
    model_flags: tuple[str, ...] = ()
    model_after: tuple[str, ...] = ()


# Inference servers first: their command lines are the more specific ones.
RECOGNISERS: tuple[Recogniser, ...] = (
    Recogniser(
        "vllm",
        "inference",
        (r"(?:^|[\s/])vllm\s+serve\b", r"\bvllm\.entrypoints\b"),
        "vllm serve meta-llama/Llama-3.1-8B-Instruct --tensor-parallel-size 2",
        ("--model",),
        ("serve",),
    ),
    Recogniser(
        "sglang",
        "inference",
        (r"\bsglang\.launch_server\b",),
        "python3 -m sglang.launch_server --model-path Qwen/Qwen2.5-7B-Instruct --port 30000",
        ("--model-path", "--model"),
    ),
    Recogniser(
        "tgi",
        "inference",
        (r"(?:^|[\s/])text-generation-launcher\b", r"(?:^|[\s/])text-generation-server\b"),
        "text-generation-launcher --model-id mistralai/Mistral-7B-Instruct-v0.3 --port 8080",
        ("--model-id",),
    ),
    Recogniser(
        "triton",
        "inference",
        (r"(?:^|[\s/])tritonserver\b",),
        "/opt/tritonserver/bin/tritonserver --model-repository=/models",
    ),
    Recogniser(
        "ollama",
        "inference",
        (r"(?:^|[\s/])ollama\s+(?:serve|runner)\b",),
        "/usr/local/bin/ollama serve",
    ),
    Recogniser(
        "llama.cpp",
        "inference",
        (r"(?:^|[\s/])llama-server\b", r"llama\.cpp/(?:build/bin/)?server\b"),
        "/opt/llama.cpp/build/bin/llama-server -m /models/llama-3-8b-instruct.Q4_K_M.gguf --port 8080",
        ("-m", "--model"),
    ),
    Recogniser(
        "tensorrt-llm",
        "inference",
        (r"(?:^|[\s/])trtllm-serve\b", r"\btensorrt_llm\b"),
        "trtllm-serve meta-llama/Llama-3.1-70B-Instruct --tp_size 8",
        ("--model", "--model_dir", "--engine_dir"),
        ("trtllm-serve", "serve"),
    ),
    Recogniser(
        "torchrun",
        "training",
        (r"(?:^|[\s/])torchrun\b", r"\btorch\.distributed\.(?:run|launch)\b"),
        "/usr/bin/python3 /usr/local/bin/torchrun --nproc_per_node=8 train.py --config llama.yaml",
    ),
    Recogniser(
        "deepspeed",
        "training",
        (r"\bdeepspeed\b",),
        "/usr/bin/python3 /usr/local/bin/deepspeed --num_gpus 8 train.py --deepspeed ds_config.json",
    ),
    Recogniser(
        "accelerate",
        "training",
        (r"(?:^|[\s/])accelerate\s+launch\b", r"\baccelerate\.commands\.launch\b"),
        "/usr/bin/python3 /usr/local/bin/accelerate launch --num_processes 8 train.py",
    ),
    Recogniser(
        "megatron",
        "training",
        (r"\bpretrain_gpt\.py\b", r"\b(?i:megatron)\b"),
        "python3 /workspace/Megatron-LM/pretrain_gpt.py --tensor-model-parallel-size 2 --num-layers 32",
    ),
    Recogniser(
        "lightning",
        "training",
        (r"(?:^|[\s/])lightning\s+fit\b", r"\b(?:pytorch_lightning|lightning\.pytorch)\b.*\sfit\b"),
        "/usr/bin/python3 /usr/local/bin/lightning fit --config config.yaml",
    ),
)

_COMPILED: tuple[tuple[Recogniser, re.Pattern[str]], ...] = tuple(
    (recogniser, re.compile("|".join(f"(?:{pattern})" for pattern in recogniser.patterns)))
    for recogniser in RECOGNISERS
)


def recogniser_table_markdown() -> str:
    """``RECOGNISERS`` as a Markdown table, for the README."""
    lines = ["| workload | phase | command line matches | example |", "|---|---|---|---|"]
    for recogniser in RECOGNISERS:
        patterns = ", ".join(f"`{pattern}`" for pattern in recogniser.patterns).replace("|", "\\|")
        lines.append(f"| {recogniser.name} | {recogniser.phase} | {patterns} | `{recogniser.example}` |")
    return "\n".join(lines)


def _tokens(cmdline: tuple[str, ...]) -> tuple[str, ...]:
    if len(cmdline) == 1:  # setproctitle-style: argv rewritten into one string
        return tuple(cmdline[0].split())
    return cmdline


def model_name(cmdline: tuple[str, ...], flags: tuple[str, ...], after: tuple[str, ...]) -> str:
    """The last path component of the model named on ``cmdline`` (``org/Model`` -> ``Model``); empty if none."""
    tokens = _tokens(cmdline)
    for index, token in enumerate(tokens):
        value = ""
        following = tokens[index + 1] if index + 1 < len(tokens) else ""
        if token in flags:
            value = following
        elif token.startswith("--") and "=" in token and token.split("=", 1)[0] in flags:
            value = token.split("=", 1)[1]
        elif (
            after
            and token.rsplit("/", 1)[-1] in after
            and following
            and not following.startswith("-")
            and following not in after
        ):
            value = following
        name = value.rstrip("/").rsplit("/", 1)[-1]
        if name:
            return name
    return ""


def recognise(cmdline: tuple[str, ...]) -> tuple[Recogniser, str] | None:
    """The first built-in recogniser matching ``cmdline``, with the workload name it gives; None if none does."""
    if not cmdline:
        return None
    text = " ".join(cmdline)
    for recogniser, pattern in _COMPILED:
        if pattern.search(text):
            model = model_name(cmdline, recogniser.model_flags, recogniser.model_after)
            return recogniser, model or recogniser.name
    return None


class _Named(NamedTuple):
    identity: WorkloadIdentity
    phase_given: bool


class Resolver:
    """Resolves pids to ``WorkloadIdentity``, caching each (pid, starttime)'s answer for the process's life.

    A cached answer is dropped when any registration changes (``generation``) or, through ``prune``, when the
    process is gone. A process keeps its identity when its parent exits later (it is re-parented, not renamed).
    """

    def __init__(
        self,
        rules: Sequence[WorkloadRule] = (),
        registrations: Mapping[int, WorkloadIdentity] | None = None,
    ) -> None:
        self._rules = tuple((re.compile(rule.match_cmdline), rule) for rule in rules)
        # pid -> (starttime, identity); a None starttime binds to the first process seen with that pid
        self._registrations: dict[int, tuple[int | None, WorkloadIdentity]] = {
            pid: (None, identity) for pid, identity in (registrations or {}).items()
        }
        self._cache: dict[tuple[int, int, str], tuple[int, WorkloadIdentity]] = {}
        self.generation = 0

    def set_registration(self, pid: int, starttime: int, identity: WorkloadIdentity) -> None:
        """Book process (pid, starttime) and its descendants under ``identity``; starttime in clock ticks."""
        self._registrations[pid] = (starttime, identity)
        self.generation += 1

    def drop_registration(self, pid: int) -> None:
        """Forget the registration of ``pid``, if any."""
        if self._registrations.pop(pid, None) is not None:
            self.generation += 1

    def registrations(self) -> dict[int, WorkloadIdentity]:
        """The registrations held now, by pid."""
        return {pid: identity for pid, (_, identity) in self._registrations.items()}

    def prune(self, snapshot: Mapping[int, ProcessSample]) -> None:
        """Drop cached answers for processes not in ``snapshot`` and registrations whose pid was reused."""
        stale = [
            key
            for key in self._cache
            if (s := snapshot.get(key[0])) is None or s.starttime != key[1] or s.comm != key[2]
        ]
        for key in stale:
            del self._cache[key]
        reused = [
            pid
            for pid, (starttime, _) in self._registrations.items()
            if starttime is not None and (s := snapshot.get(pid)) is not None and s.starttime != starttime
        ]
        for pid in reused:
            self.drop_registration(pid)

    def cached(self) -> int:
        """How many (pid, starttime) answers are cached."""
        return len(self._cache)

    def identities_by_pid(self) -> dict[int, WorkloadIdentity]:
        """pid -> identity of the processes resolved and alive at the last ``prune``. Safe from another thread
        than the scan's: the cache is copied in one C-level step, during which no Python code runs."""
        cached = list(self._cache.items())
        return {pid: identity for (pid, _, _), (_, identity) in cached}

    def live_identities(self) -> set[WorkloadIdentity]:
        """The identities of the processes resolved and still alive at the last ``prune``."""
        return {identity for _, identity in self._cache.values()}

    def resolve(self, pid: int, snapshot: Mapping[int, ProcessSample], statics: StaticsLookup) -> WorkloadIdentity:
        """The identity of ``pid`` as in ``snapshot`` (one ``ProcessTable.scan``), with ``statics`` usually
        ``ProcessTable.static``. A pid not in the snapshot is ``unknown``/``unknown`` with an empty origin.
        """
        sample = snapshot.get(pid)
        if sample is None:
            return WorkloadIdentity("unknown", "unknown")
        key = (pid, sample.starttime, sample.comm)  # a new comm at the same start time: it exec'd
        hit = self._cache.get(key)
        if hit is not None and hit[0] == self.generation:
            return hit[1]
        identity = self._resolve(sample, snapshot, statics)
        self._cache[key] = (self.generation, identity)
        return identity

    def _resolve(
        self, sample: ProcessSample, snapshot: Mapping[int, ProcessSample], statics: StaticsLookup
    ) -> WorkloadIdentity:
        chain = _ancestry(sample, snapshot)
        named = self._from_registration(chain)
        infos = [statics(process.pid, process.starttime) for process in chain]
        own = infos[0]
        if named is None:
            named = (
                _from_environment(infos)
                or self._from_rules(infos)
                or _from_recognisers(infos)
                or _Named(WorkloadIdentity(own.exe if own else sample.comm, "unknown", origin="executable"), False)
            )
        identity = named.identity
        changes: dict[str, Any] = {}  # str values only; Any because replace() checks each field's own type
        slurm_env = _nearest_env(infos, "SLURM_JOB_ID")
        if not identity.job:
            cgroup_job = own.slurm_job if own else ""
            changes["job"] = _nearest_env(infos, "WATTMETER_JOB") or slurm_env or cgroup_job
        if not named.phase_given:
            phase = _nearest_env(infos, "WATTMETER_PHASE")
            if phase not in PHASES:
                recognised = _from_recognisers(infos)
                phase = recognised.identity.phase if recognised else "unknown"
            changes["phase"] = phase
        if own is not None:
            for field, value in (
                ("pod", own.pod_uid),
                ("container", own.container_id),
                ("unit", own.unit),
                ("slurm_job", own.slurm_job or slurm_env),
            ):
                if not getattr(identity, field) and value:
                    changes[field] = value
        elif not identity.slurm_job and slurm_env:
            changes["slurm_job"] = slurm_env
        return dataclasses.replace(identity, **changes) if changes else identity

    def _from_registration(self, chain: list[ProcessSample]) -> _Named | None:
        for process in chain:
            registered = self._registrations.get(process.pid)
            if registered is None:
                continue
            starttime, identity = registered
            if starttime is None:
                self._registrations[process.pid] = (process.starttime, identity)
            elif starttime != process.starttime:
                continue  # the registered process is gone and its pid reused
            return _Named(dataclasses.replace(identity, origin="registration"), True)
        return None

    def _from_rules(self, infos: list[ProcessStatic | None]) -> _Named | None:
        if not self._rules:
            return None
        for info in infos:
            if info is None or not info.cmdline:
                continue
            text = " ".join(info.cmdline)
            for pattern, rule in self._rules:
                if pattern.search(text):
                    identity = WorkloadIdentity(
                        rule.workload or info.exe, rule.phase or "unknown", job=rule.job or "", origin="rule"
                    )
                    return _Named(identity, rule.phase is not None)
        return None


def _ancestry(sample: ProcessSample, snapshot: Mapping[int, ProcessSample]) -> list[ProcessSample]:
    """``sample``, then its parent, grandparent... up to but not including pid 1; stops at loops and unknowns."""
    chain = [sample]
    seen = {sample.pid}
    child = sample
    while child.ppid > 1 and child.ppid not in seen:
        parent = snapshot.get(child.ppid)
        # a "parent" that started after its child is a reused pid: the real parent exited before this scan
        if parent is None or parent.starttime > child.starttime:
            break
        chain.append(parent)
        seen.add(parent.pid)
        child = parent
    return chain


def _nearest_env(infos: list[ProcessStatic | None], key: str) -> str:
    for info in infos:
        if info is not None and (value := info.environ.get(key)):
            return value
    return ""


def _from_environment(infos: list[ProcessStatic | None]) -> _Named | None:
    for info in infos:
        if info is None or not (workload := info.environ.get("WATTMETER_WORKLOAD")):
            continue
        phase = info.environ.get("WATTMETER_PHASE", "")
        slurm_job = info.environ.get("SLURM_JOB_ID", "")
        job = info.environ.get("WATTMETER_JOB") or slurm_job
        identity = WorkloadIdentity(
            workload,
            phase if phase in PHASES else "unknown",
            job=job,
            slurm_job=slurm_job,
            origin="environment",
        )
        return _Named(identity, bool(phase))
    return None


def _from_recognisers(infos: list[ProcessStatic | None]) -> _Named | None:
    for info in infos:
        if info is None:
            continue
        recognised = recognise(info.cmdline)
        if recognised is not None:
            recogniser, workload = recognised
            return _Named(WorkloadIdentity(workload, recogniser.phase, origin="recogniser"), True)
    return None
