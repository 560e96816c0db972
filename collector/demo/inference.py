"""The demo's synthetic inference server: one process on a simulated GPU that serves made-up requests and reports
each one through the client library (``collector.client.request``), like a real server would.

- Arrivals are Poisson (``--rate`` per second); at most ``MAX_CONCURRENT`` run at once, the rest wait in a queue
  (``started()`` marks the end of the queue time, which gets no energy).
- Prompts are 100-2000 tokens and outputs 20-800, log-uniform (many short, some long); two models, three tenants.
- Prefill runs at ``PREFILL_TOKENS_PER_S``; decoding takes ``DECODE_S_PER_TOKEN`` per token, slower the fuller the
  batch, as continuous batching does.
- The GPU's utilisation follows the batch (``utilization``), so the simulated GPU's power does too.

Each finished request is also appended to ``--requests-log`` (JSON lines), which the demo's view shows while the
aggregator has not priced it yet. Run by ``wattmeter demo`` as ``python -m collector.demo.inference --gpu 0 ...``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import collector.client
from collector.demo.gpu_load import GpuLoadBoard
from collector.demo.worker import placement_arguments, stop_event

WORKLOAD = "demo-inference"
MODELS = (("llama-3.1-8b-instruct", 0.7), ("qwen2.5-7b-instruct", 0.3))
TENANTS = ("acme", "globex", "initech")
PROMPT_TOKENS = (100, 2000)
OUTPUT_TOKENS = (20, 800)
MAX_CONCURRENT = 32
DEFAULT_RATE_PER_S = 4.0  # with ~4 s mean service time: ~16 running at once
PREFILL_TOKENS_PER_S = 8000.0
DECODE_S_PER_TOKEN = 0.015
MEMORY_BYTES = 60 * 1024**3
TICK_S = 0.1
WARM_UP_TIMEOUT_S = 15.0
DRAIN_S = 1.5  # at stop, running requests get this long to finish; the rest are cut short (and still reported)


@dataclass(frozen=True)
class RequestPlan:
    request_id: str
    model: str
    tenant: str
    input_tokens: int
    output_tokens: int


def log_uniform(rng: random.Random, low: int, high: int) -> int:
    return round(math.exp(rng.uniform(math.log(low), math.log(high))))


def draw_request(rng: random.Random, number: int) -> RequestPlan:
    model = rng.choices([name for name, _ in MODELS], weights=[weight for _, weight in MODELS])[0]
    return RequestPlan(
        f"demo-{number:06d}-{rng.getrandbits(32):08x}",
        model,
        rng.choice(TENANTS),
        log_uniform(rng, *PROMPT_TOKENS),
        log_uniform(rng, *OUTPUT_TOKENS),
    )


def utilization(running: int) -> float:
    """SM utilisation (0-1) with ``running`` requests in the batch: a lone request leaves most of the GPU waiting on
    memory; a full batch keeps it busy."""
    if running <= 0:
        return 0.0
    return min(1.0, 0.3 + 0.7 * running / MAX_CONCURRENT)


class Server:
    def __init__(self, rng: random.Random, rate_per_s: float, requests_log: IO[str]) -> None:
        self.rng = rng
        self.rate_per_s = rate_per_s
        self.requests_log = requests_log
        self.running = 0
        self.slots = asyncio.Semaphore(MAX_CONCURRENT)
        self.tasks: set[asyncio.Task[None]] = set()

    async def serve(self, plan: RequestPlan) -> None:
        generated = 0
        with collector.client.request(plan.request_id, model=plan.model, tenant=plan.tenant) as span:
            span.tokens(input=plan.input_tokens, output=0)
            try:
                async with self.slots:
                    span.started()
                    self.running += 1
                    try:
                        await asyncio.sleep(plan.input_tokens / PREFILL_TOKENS_PER_S)
                        span.prefill_done()
                        while generated < plan.output_tokens:
                            step = min(16, plan.output_tokens - generated)  # tokens per scheduler step
                            await asyncio.sleep(step * DECODE_S_PER_TOKEN * (1 + self.running / MAX_CONCURRENT))
                            generated += step
                            span.tokens(output=generated)
                    finally:
                        self.running -= 1
            finally:
                span.end()
                record = {
                    "request_id": plan.request_id,
                    "model": plan.model,
                    "tenant": plan.tenant,
                    "input_tokens": plan.input_tokens,
                    "output_tokens": generated,
                    "start_ns": span.start_ns,
                    "end_ns": span.end_ns,
                    "complete": generated == plan.output_tokens,
                }
                self.requests_log.write(json.dumps(record) + "\n")
                self.requests_log.flush()

    async def arrivals(self, stop: threading.Event) -> None:
        number = 0
        while not stop.is_set():
            await asyncio.sleep(self.rng.expovariate(self.rate_per_s))
            if stop.is_set():
                break
            number += 1
            task = asyncio.create_task(self.serve(draw_request(self.rng, number)))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)


async def warm_up(agent_url: str, declare: Callable[[], None], stop: threading.Event) -> None:
    """Serve nothing until the agent books this process's GPU energy to ``WORKLOAD`` (its scan resolves a new process
    within about a second; before that, the GPU's energy is booked to whatever the process looked like, and the first
    requests would get none of it), as a real server serves nothing while it loads its model. Gives up after
    ``WARM_UP_TIMEOUT_S``: the requests are then served anyway."""
    family, workload = "wattmeter_workload_energy_joules_total{", f'workload="{WORKLOAD}"'
    deadline = time.monotonic() + WARM_UP_TIMEOUT_S
    while not stop.is_set() and time.monotonic() < deadline:
        declare()
        text = await asyncio.to_thread(_metrics_text, agent_url)
        if any(line.startswith(family) and workload in line and 'device="gpu' in line for line in text.splitlines()):
            return
        await asyncio.sleep(TICK_S)


def _metrics_text(agent_url: str) -> str:
    try:
        with urllib.request.urlopen(agent_url + "/metrics", timeout=2) as response:
            return str(response.read().decode("utf-8", "replace"))
    except (OSError, ValueError):
        return ""


async def run(args: argparse.Namespace, stop: threading.Event) -> None:
    board = GpuLoadBoard(args.load_dir)
    pid = os.getpid()
    rng = random.Random(args.seed)
    with open(args.requests_log, "a", encoding="utf-8") as requests_log:
        server = Server(rng, args.rate, requests_log)
        if args.agent_url:
            await warm_up(args.agent_url, lambda: board.declare(args.gpu, pid, "python", 0.0, MEMORY_BYTES), stop)
        arrivals = asyncio.create_task(server.arrivals(stop))
        try:
            while not stop.is_set():
                board.declare(args.gpu, pid, "python", utilization(server.running), MEMORY_BYTES)
                await asyncio.sleep(TICK_S)
            arrivals.cancel()
            deadline = time.monotonic() + DRAIN_S
            while server.tasks and time.monotonic() < deadline:
                board.declare(args.gpu, pid, "python", utilization(server.running), MEMORY_BYTES)
                await asyncio.sleep(TICK_S)
            for task in list(server.tasks):
                task.cancel()
            await asyncio.gather(*server.tasks, arrivals, return_exceptions=True)
        finally:
            board.withdraw(args.gpu, pid)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m collector.demo.inference")
    placement_arguments(parser)
    parser.add_argument("--rate", type=float, default=DEFAULT_RATE_PER_S, help="requests per second (Poisson)")
    parser.add_argument("--requests-log", type=Path, required=True, help="JSON lines, one per finished request")
    parser.add_argument("--agent-url", default="", help="wait until this agent books our GPU energy to us")
    args = parser.parse_args(argv)
    stop = stop_event()
    collector.client.register(WORKLOAD, phase="inference", labels={"demo": "true"})
    try:
        asyncio.run(run(args, stop))
    finally:
        collector.client.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
