"""``wattmeter demo``: the subcommand (its parser here; the demo itself loads only when it runs)."""

from __future__ import annotations

import argparse
from pathlib import Path


def positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give a number of seconds above 0")
    return value


def cmd_demo(args: argparse.Namespace) -> int:
    from collector.demo.orchestrate import DemoOptions, run_demo

    return run_demo(
        DemoOptions(
            duration_s=args.duration,
            data_dir=args.data_dir,
            agent_listen=args.agent_listen,
            grpc_listen=args.grpc_listen,
            http_listen=args.http_listen,
            gpus=args.gpus,
        )
    )


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    demo = sub.add_parser(
        "demo",
        help="the whole pipeline on this machine: aggregator, agent (+ simulated GPUs), a synthetic inference "
        "server and training job, and a live view of energy per GPU, phase and request",
    )
    demo.add_argument(
        "--duration", type=positive_seconds, metavar="SECONDS", help="stop after this long (default: Ctrl-C)"
    )
    demo.add_argument(
        "--data-dir",
        type=Path,
        metavar="DIR",
        help="keep the database, configs and logs here (default: a temp dir, removed)",
    )
    demo.add_argument("--agent-listen", default="127.0.0.1:9750", metavar="HOST:PORT", help="agent /metrics (9750)")
    demo.add_argument(
        "--grpc-listen", default="127.0.0.1:9751", metavar="HOST:PORT", help="aggregator gRPC and OTLP (9751)"
    )
    demo.add_argument(
        "--http-listen", default="127.0.0.1:9752", metavar="HOST:PORT", help="aggregator API and /metrics (9752)"
    )
    demo.add_argument("--gpus", type=int, default=2, metavar="N", help="simulated GPUs for the synthetic workloads (2)")
    demo.set_defaults(func=cmd_demo)
