"""The demo's agent: ``wattmeter agent`` on this host's real sensors, plus simulated GPUs whose power follows the
synthetic workloads the demo places on them (``GpuLoadBoard``).

Run by ``wattmeter demo`` as ``python -m collector.demo.agent --config FILE --gpus N --load-dir DIR``. The simulated
GPUs are a source of their own here (registered only in this process, so no production agent ever has it); they
say ``Simulated`` in their model and ``source="simulated"`` in ``wattmeter_gpu_info``, like ``--simulate-gpus``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from collector.config import AgentConfig, load_config
from collector.demo.gpu_load import GpuLoadBoard
from collector.errors import ConfigError
from collector.sources.base import Source, register_source
from collector.sources.simulated import SimulatedSource

DEMO_SOURCE = "demo-simulated"


def add_demo_gpus(gpus: int, board: GpuLoadBoard, interval_s: float) -> None:
    """Register the source of ``gpus`` load-driven simulated GPUs (their indices follow the real GPUs')."""

    @register_source(DEMO_SOURCE)
    def _build(config: AgentConfig) -> Source | None:
        return SimulatedSource(gpus, interval_s=interval_s, load=board.processes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m collector.demo.agent")
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--gpus", type=int, required=True)
    parser.add_argument("--load-dir", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, default_path=args.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    logging.basicConfig(
        level=config.log_level.upper(), format="%(asctime)s wattmeter %(levelname)s %(name)s: %(message)s"
    )
    add_demo_gpus(args.gpus, GpuLoadBoard(args.load_dir), config.sources.simulated.interval_s)
    from collector.agent import Agent

    try:
        agent = Agent(config)
    except OSError as exc:
        print(f"wattmeter demo agent: cannot serve metrics on {config.prometheus.listen}: {exc}", file=sys.stderr)
        return 1
    return agent.run()


if __name__ == "__main__":
    raise SystemExit(main())
