"""The ``wattmeter`` command line: ``agent``, ``aggregator``, ``config check``, ``config show``, ``hash-password``,
``version``."""

from __future__ import annotations

import argparse
import getpass
import hashlib
import importlib
import json
import logging
import sys
from pathlib import Path
from typing import Any

from collector import __version__
from collector.config import AgentConfig, check_file, env_config_path, load_config
from collector.errors import ConfigError

EXIT_USAGE = 2


def _agent_overrides(args: argparse.Namespace) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    if args.listen is not None:
        overrides.setdefault("prometheus", {})["listen"] = args.listen
    if args.simulate_gpus is not None:
        overrides.setdefault("sources", {}).setdefault("simulated", {})["gpus"] = args.simulate_gpus
    if args.rapl_root is not None:
        overrides.setdefault("sources", {}).setdefault("rapl", {})["root"] = args.rapl_root
    if args.no_nvml:
        overrides.setdefault("sources", {}).setdefault("nvml", {})["enabled"] = False
    if args.log_level is not None:
        overrides["log_level"] = args.log_level
    return overrides


def _load(args: argparse.Namespace, overrides: dict[str, Any] | None = None) -> AgentConfig:
    return load_config(args.config or env_config_path(), overrides)


def cmd_agent(args: argparse.Namespace) -> int:
    config = _load(args, _agent_overrides(args))
    logging.basicConfig(
        level=config.log_level.upper(), format="%(asctime)s wattmeter %(levelname)s %(name)s: %(message)s"
    )
    from collector.agent import Agent  # imported late: `config check` must not load the sources

    try:
        agent = Agent(config)
    except OSError as exc:
        listen = config.prometheus.listen
        print(
            f"wattmeter: cannot serve metrics on {listen}: {exc.strerror or exc}. "
            "Set [prometheus] listen (or --listen) to a free address, or check the TLS cert/key paths.",
            file=sys.stderr,
        )
        return 1
    return agent.run()


def _aggregator_overrides(args: argparse.Namespace) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    if args.grpc_listen is not None:
        overrides.setdefault("grpc", {})["listen"] = args.grpc_listen
    if args.http_listen is not None:
        overrides.setdefault("http", {})["listen"] = args.http_listen
    if args.storage_url is not None:
        overrides.setdefault("storage", {})["url"] = args.storage_url
    if args.log_level is not None:
        overrides["log_level"] = args.log_level
    return overrides


def cmd_aggregator(args: argparse.Namespace) -> int:
    from collector.aggregator.config import load_aggregator_config

    config = load_aggregator_config(args.config or env_config_path(), _aggregator_overrides(args))
    logging.basicConfig(
        level=config.log_level.upper(), format="%(asctime)s wattmeter %(levelname)s %(name)s: %(message)s"
    )
    from collector.aggregator.service import Aggregator  # imported late: grpc and the store load only here
    from collector.store.base import StoreError

    try:
        aggregator = Aggregator(config)
        return aggregator.run()
    except StoreError as exc:
        print(f"wattmeter: storage: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(
            f"wattmeter: cannot serve: {exc.strerror or exc}. Set [grpc] listen and [http] listen (or --grpc-listen, "
            "--http-listen) to free addresses, and check the TLS cert/key paths.",
            file=sys.stderr,
        )
        return 1


def cmd_config_check(args: argparse.Namespace) -> int:
    path = Path(args.path)
    if args.aggregator:
        from collector.aggregator.config import AGGREGATOR_EXAMPLE, AggregatorConfig

        errors = check_file(path, AggregatorConfig, AGGREGATOR_EXAMPLE)
    else:
        errors = check_file(path)
    if errors:
        print("\n".join(errors), file=sys.stderr)
        return EXIT_USAGE
    print(f"{path}: ok")
    return 0


def cmd_config_show(args: argparse.Namespace) -> int:
    from collector import tomlwrite

    config = _load(args)
    data = config.model_dump(mode="json")
    print(
        json.dumps(data, indent=2) if args.format == "json" else tomlwrite.dumps(data),
        end="\n" if args.format == "json" else "",
    )
    return 0


def cmd_hash_password(args: argparse.Namespace) -> int:
    password = sys.stdin.readline().rstrip("\n") if not sys.stdin.isatty() else getpass.getpass("password: ")
    if not password:
        print("wattmeter: empty password", file=sys.stderr)
        return EXIT_USAGE
    if args.scheme == "sha256":
        print("sha256:" + hashlib.sha256(password.encode()).hexdigest())
    else:
        import bcrypt

        print(bcrypt.hashpw(password.encode(), bcrypt.gensalt()).decode())
    return 0


def cmd_version(args: argparse.Namespace) -> int:
    print(f"wattmeter {__version__}")
    return 0


# Commands that live in their own modules, each with ``add_parser(sub)`` adding its subcommand (keep their heavy
# imports inside the command functions: every command, ``wattmeter agent`` included, builds the whole parser).
COMMAND_MODULES: tuple[str, ...] = ("collector.demo.cli", "collector.report.command", "collector.cli_requests")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wattmeter", description="Energy telemetry for AI datacenters.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def config_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--config",
            type=Path,
            default=None,
            help="TOML config (default: $WATTMETER_CONFIG, else /etc/wattmeter/agent.toml if present)",
        )

    agent = sub.add_parser("agent", help="measure this host's GPUs and CPUs and serve /metrics")
    config_arg(agent)
    agent.add_argument("--listen", help="host:port for /metrics (overrides [prometheus] listen)")
    agent.add_argument("--simulate-gpus", type=int, metavar="N", help="add N simulated GPUs (demos and tests)")
    agent.add_argument("--rapl-root", help="powercap tree to read (overrides [sources.rapl] root)")
    agent.add_argument("--no-nvml", action="store_true", help="do not load NVML")
    agent.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    agent.set_defaults(func=cmd_agent)

    aggregator = sub.add_parser("aggregator", help="receive agents' streams, store fleet energy, serve the API")
    aggregator.add_argument(
        "--config",
        type=Path,
        default=None,
        help="TOML config (default: $WATTMETER_CONFIG, else /etc/wattmeter/aggregator.toml if present)",
    )
    aggregator.add_argument("--grpc-listen", help="host:port for agents' streams (overrides [grpc] listen)")
    aggregator.add_argument("--http-listen", help="host:port for the API and /metrics (overrides [http] listen)")
    aggregator.add_argument("--storage-url", help="sqlite:////path.db or postgresql://... (overrides [storage] url)")
    aggregator.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    aggregator.set_defaults(func=cmd_aggregator)

    config = sub.add_parser("config", help="check or show configuration")
    config_sub = config.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    check = config_sub.add_parser("check", help="validate a config file; exit 2 on errors")
    check.add_argument("path")
    check.add_argument("--aggregator", action="store_true", help="the file is an aggregator config")
    check.set_defaults(func=cmd_config_check)
    show = config_sub.add_parser("show", help="print the effective config (file, env and defaults merged)")
    config_arg(show)
    show.add_argument("--format", choices=["toml", "json"], default="toml")
    show.set_defaults(func=cmd_config_show)

    hash_password = sub.add_parser(
        "hash-password",
        help="hash a password (from stdin) for [prometheus.basic_auth]; --scheme sha256 also hashes agent tokens "
        "for the aggregator's [grpc.agent_tokens]",
    )
    hash_password.add_argument("--scheme", choices=["bcrypt", "sha256"], default="bcrypt")
    hash_password.set_defaults(func=cmd_hash_password)

    version = sub.add_parser("version", help="print the version")
    version.set_defaults(func=cmd_version)
    for module in COMMAND_MODULES:
        importlib.import_module(module).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
