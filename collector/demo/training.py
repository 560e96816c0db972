"""The demo's training job: one process on a simulated GPU, registered as workload ``demo-llama-8b-finetune`` in
phase ``training``, holding the GPU busy in steps (a forward/backward sawtooth) with a short low-power checkpoint
every ``CHECKPOINT_EVERY_S``.

Run by ``wattmeter demo`` as ``python -m collector.demo.training --gpu 1 --load-dir DIR``.
"""

from __future__ import annotations

import argparse
import os
import time

import collector.client
from collector.demo.gpu_load import GpuLoadBoard
from collector.demo.worker import placement_arguments, stop_event

WORKLOAD = "demo-llama-8b-finetune"
JOB = "demo-train-1"
STEP_S = 0.8  # one optimizer step
CHECKPOINT_EVERY_S = 30.0
CHECKPOINT_S = 2.0  # writing a checkpoint: the GPU waits on storage
MEMORY_BYTES = 72 * 1024**3
TICK_S = 0.1


def utilization_at(t_s: float) -> float:
    """SM utilisation (0-1) ``t_s`` seconds into training: ~0.85-0.97 over each step, 0.1 while checkpointing."""
    if t_s % CHECKPOINT_EVERY_S > CHECKPOINT_EVERY_S - CHECKPOINT_S:
        return 0.1
    return 0.85 + 0.12 * ((t_s % STEP_S) / STEP_S)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m collector.demo.training")
    placement_arguments(parser)
    args = parser.parse_args(argv)
    stop = stop_event()
    board = GpuLoadBoard(args.load_dir)
    pid = os.getpid()
    collector.client.register(WORKLOAD, phase="training", job=JOB, labels={"demo": "true"})
    started = time.monotonic()
    try:
        while True:
            board.declare(args.gpu, pid, "python", utilization_at(time.monotonic() - started), MEMORY_BYTES)
            if stop.wait(TICK_S):
                break
    finally:
        board.withdraw(args.gpu, pid)
        collector.client.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
