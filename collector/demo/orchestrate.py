"""Runs the demo: checks the ports, writes the configs, starts the aggregator, the agent and the two synthetic
workloads as child processes, shows the view until ``--duration`` or a signal, then stops them in order.

Stop order: the workloads first (their last spans reach the agent), then a short wait for the aggregator to price
the last requests, then the agent (its stream sends what it holds), then the aggregator. A child that exits on its
own is reported with the end of its log, and the demo stops the rest and exits 1.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

from collector.config import load_config, parse_listen
from collector.demo import layout as files
from collector.demo.children import Child, ChildDied, child_environment, http_ok, wait_until
from collector.demo.layout import Layout
from collector.demo.telemetry import Snapshot, Telemetry
from collector.demo.view import LiveScreen, frame, plain_line
from collector.errors import ConfigError

START_TIMEOUT_S = 60.0  # a cold start on a loaded 2-core VM imports grpc, numpy and the store in a few seconds
POLL_S = 0.2
LIVE_EVERY_S = 1.0
PLAIN_EVERY_S = 2.0
SETTLE_S = 4.0  # after the workloads stop: time for the last requests to be priced (samples past their end)
WORKLOAD_STOP_S = 5.0
SERVICE_STOP_S = 10.0
DEFAULT_GPUS = 2


@dataclass(frozen=True)
class DemoOptions:
    duration_s: float | None = None
    data_dir: Path | None = None
    agent_listen: str = "127.0.0.1:9750"
    grpc_listen: str = "127.0.0.1:9751"
    http_listen: str = "127.0.0.1:9752"
    gpus: int = DEFAULT_GPUS


class DemoError(Exception):
    """A problem to tell the user in one line, before anything started."""


def check_port_free(listen: str, what: str, flag: str) -> None:
    host, port = parse_listen(listen)
    if port == 0:
        raise DemoError(f"wattmeter demo: {flag} {listen}: give a port (not 0), for example 127.0.0.1:{9750}")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers do: TIME_WAIT is not taken
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise DemoError(
                f"wattmeter demo: {listen} ({what}) is not free: {exc.strerror or exc}; "
                f"stop what uses it or pass {flag} HOST:PORT"
            ) from None


def check_options(options: DemoOptions) -> None:
    listens = (
        (options.agent_listen, "agent /metrics", "--agent-listen"),
        (options.grpc_listen, "aggregator gRPC and OTLP", "--grpc-listen"),
        (options.http_listen, "aggregator HTTP API and /metrics", "--http-listen"),
    )
    ports = set()
    for listen, _, flag in listens:
        try:
            _, port = parse_listen(listen)
        except ValueError as exc:
            raise DemoError(f"wattmeter demo: {flag}: {exc}") from None
        if port in ports:
            raise DemoError(f"wattmeter demo: {flag} {listen}: port {port} is given twice; each server needs its own")
        ports.add(port)
    if not 1 <= options.gpus <= 8:
        raise DemoError(f"wattmeter demo: --gpus {options.gpus}: give 1 to 8 simulated GPUs")
    if options.duration_s is not None and options.duration_s <= 0:
        raise DemoError(f"wattmeter demo: --duration {options.duration_s:g}: give a number of seconds above 0")
    for listen, what, flag in listens:
        check_port_free(listen, what, flag)


class Demo:
    def __init__(self, options: DemoOptions, out: TextIO, live: bool, stopping: threading.Event | None = None) -> None:
        self.options = options
        self.out = out
        self.live = live
        self.stopping = stopping if stopping is not None else threading.Event()
        self.children: list[Child] = []
        self._temporary: list[Path] = []
        self.layout = self._layout()
        self.agent_url = files.url(options.agent_listen)
        self.api_url = files.url(options.http_listen)
        self.telemetry = Telemetry(self.agent_url, self.api_url, self.layout.requests_log, time.time_ns())
        self.started = time.monotonic()

    def _layout(self) -> Layout:
        if self.options.data_dir is not None:
            root = self.options.data_dir.resolve()
        else:
            root = Path(tempfile.mkdtemp(prefix="wattmeter-demo-"))
            self._temporary.append(root)
        sock = root / "agent.sock"
        if len(str(sock)) > files.MAX_SOCKET_PATH:
            short = Path(tempfile.mkdtemp(prefix="wattmeter-demo-"))
            self._temporary.append(short)
            sock = short / "agent.sock"
        return Layout(root, sock)

    def say(self, line: str = "") -> None:
        self.out.write(line + "\n")
        self.out.flush()

    # --- start -----------------------------------------------------------------------------------------------

    def _start(self, name: str, module: str, args: list[str], env: dict[str, str] | None = None) -> Child:
        child = Child(name, module, args, self.layout.logs / f"{name}.log", child_environment(env or {}))
        self.children.append(child)
        return child

    def start_all(self) -> bool:
        """Start the children in order, each once the one it needs answers; False when told to stop meanwhile."""
        layout, options = self.layout, self.options
        if self.stopping.is_set():  # a signal during the set-up: nothing to start
            return False
        aggregator = self._start("aggregator", "collector", ["aggregator", "--config", str(layout.aggregator_config)])
        if not wait_until(
            aggregator, lambda: http_ok(self.api_url + "/healthz"), START_TIMEOUT_S, self.stopping.is_set
        ):
            return False
        agent = self._start(
            "agent",
            "collector.demo.agent",
            ["--config", str(layout.agent_config), "--gpus", str(options.gpus), "--load-dir", str(layout.load_dir)],
        )
        if not wait_until(
            agent,
            lambda: layout.socket.exists() and http_ok(self.agent_url + "/healthz"),
            START_TIMEOUT_S,
            self.stopping.is_set,
        ):
            return False
        if self.stopping.is_set():
            return False
        env = {"WATTMETER_SOCKET": str(layout.socket)}
        placement = ["--load-dir", str(layout.load_dir)]
        self._start(
            "inference",
            "collector.demo.inference",
            ["--gpu", "0", *placement, "--requests-log", str(layout.requests_log), "--agent-url", self.agent_url],
            env,
        )
        if options.gpus >= 2:
            self._start("training", "collector.demo.training", ["--gpu", "1", *placement], env)
        return True

    def intro(self) -> None:
        options = self.options
        training = "a training job on simulated GPU 1" if options.gpus >= 2 else "no training job (--gpus 1)"
        kept = "kept" if options.data_dir is not None else "removed at exit"
        self.say(
            f"wattmeter demo: an aggregator, an agent with {options.gpus} simulated GPUs (synthetic power, labelled "
            f'source="simulated"; real sensors measured beside them), a synthetic inference server on simulated '
            f"GPU 0 and {training}"
        )
        self.say(f"  agent /metrics       {self.agent_url}/metrics")
        self.say(f"  aggregator /metrics  {self.api_url}/metrics")
        self.say(f"  requests API         {self.api_url}/api/v1/requests?limit=10  (and /api/v1/summary?by=model)")
        self.say(f"  gRPC and OTLP        {files.target(options.grpc_listen)}")
        self.say(f"  data and logs        {self.layout.root} ({kept})")

    # --- run -------------------------------------------------------------------------------------------------

    def check_children(self) -> None:
        for child in self.children:
            code = child.exit_code()
            if code is not None:
                raise ChildDied(child, code)

    def show(self, screen: LiveScreen | None, snap: Snapshot) -> None:
        elapsed = time.monotonic() - self.started
        if screen is not None:
            screen.draw(frame(snap, elapsed, self.options.duration_s))
        else:
            self.say(plain_line(snap, elapsed, self.options.duration_s))

    def watch(self) -> None:
        """Show the view until the duration ends or a signal comes; ChildDied when a child exits."""
        screen = LiveScreen(self.out) if self.live else None
        every = LIVE_EVERY_S if self.live else PLAIN_EVERY_S
        deadline = None if self.options.duration_s is None else self.started + self.options.duration_s
        next_view = time.monotonic() + (0.0 if self.live else every)
        try:
            while not self.stopping.is_set():
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    break
                self.check_children()
                if now >= next_view:
                    self.show(screen, self.telemetry.snapshot())
                    next_view = now + every
                wait = POLL_S if deadline is None else max(0.0, min(POLL_S, deadline - now))
                self.stopping.wait(wait)
        finally:
            if screen is not None:
                screen.close()

    # --- stop ------------------------------------------------------------------------------------------------

    def settle(self) -> Snapshot:
        """Wait (at most SETTLE_S) for the aggregator to price the requests shown as pending; the last snapshot."""
        deadline = time.monotonic() + SETTLE_S
        snap = self.telemetry.snapshot()
        while (
            snap.request_api
            and any(r.status == "pending" for r in snap.requests)
            and time.monotonic() < deadline
            and not self.stopping.is_set()
        ):
            time.sleep(0.5)
            snap = self.telemetry.snapshot()
        return snap

    def stop_all(self, settle: bool) -> Snapshot | None:
        by_name = {child.name: child for child in self.children}
        for name in ("inference", "training"):
            if name in by_name:
                by_name[name].stop(WORKLOAD_STOP_S)
        snap = None
        services_up = all(
            by_name.get(n) is not None and by_name[n].exit_code() is None for n in ("agent", "aggregator")
        )
        if settle and services_up:
            self.stopping.clear()  # a second Ctrl-C during the wait cuts it short
            snap = self.settle()
        for name in ("agent", "aggregator"):
            if name in by_name:
                by_name[name].stop(SERVICE_STOP_S)
        return snap

    def summary(self, snap: Snapshot) -> None:
        self.say(plain_line(snap, time.monotonic() - self.started, self.options.duration_s, final=True))
        for model in snap.models:
            per_token = "-" if model.joules_per_output_token is None else f"{model.joules_per_output_token:.3f}"
            self.say(f"  {model.model}: {model.count} requests, {model.energy_j:.1f} J, {per_token} J/output token")

    def cleanup(self) -> None:
        for folder in self._temporary:
            shutil.rmtree(folder, ignore_errors=True)

    def report_death(self, died: ChildDied) -> None:
        print(
            f"wattmeter demo: the {died.child.name} exited with code {died.code}; the end of its log "
            f"({died.child.log_path}):",
            file=sys.stderr,
        )
        print(died.child.log_tail(), file=sys.stderr)

    def run(self) -> int:
        code = 0
        clean = False
        try:
            try:
                self.layout.create()
                files.write_configs(
                    self.layout, self.options.agent_listen, self.options.grpc_listen, self.options.http_listen
                )
            except OSError as exc:
                where = f"--data-dir {self.layout.root}" if self.options.data_dir is not None else self.layout.root
                raise DemoError(f"wattmeter demo: {where}: {exc.strerror or exc}") from None
            check_configs(self.layout)
            self.intro()
            if self.start_all():
                self.started = time.monotonic()  # --duration counts from when everything runs
                self.watch()
                self.check_children()
                clean = True
        except ChildDied as died:
            self.report_death(died)
            code = 1
        except TimeoutError as exc:
            print(f"wattmeter demo: {exc}; see the logs in {self.layout.logs}", file=sys.stderr)
            code = 1
        finally:
            snap = self.stop_all(settle=clean)
            if snap is not None:
                self.summary(snap)
            stray = [c for c in self.children if c.exit_code() != 0] if clean else []
            for child in stray:  # an error: on stderr, as the other failures
                print(
                    f"wattmeter demo: the {child.name} stopped with code {child.exit_code()}: see {child.log_path}",
                    file=sys.stderr,
                )
            if stray:
                code = 1
            self.cleanup()
        return code


def check_configs(layout: Layout) -> None:
    from collector.aggregator.config import load_aggregator_config

    try:
        load_aggregator_config(layout.aggregator_config, default_path=layout.aggregator_config, environ={})
        load_config(layout.agent_config, default_path=layout.agent_config, environ={})
    except ConfigError as exc:
        raise DemoError(f"wattmeter demo: {' '.join(str(exc).splitlines())}") from None


def run_demo(options: DemoOptions, out: TextIO | None = None, live: bool | None = None) -> int:
    """The whole demo; returns the exit code. ``live``: the in-place view (default: when ``out`` is a terminal)."""
    out = out if out is not None else sys.stdout
    try:
        check_options(options)
    except DemoError as exc:
        print(exc, file=sys.stderr)
        return 1
    # the handlers first: a signal from now on stops the demo cleanly (its temp dir is made in Demo's set-up)
    stopping = threading.Event()
    previous: dict[signal.Signals, Callable[[int, FrameType | None], Any] | int | None] = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        previous[signum] = signal.signal(signum, lambda signum, frame: stopping.set())
    try:
        demo = Demo(options, out, out.isatty() if live is None else live, stopping)
        return demo.run()
    except DemoError as exc:
        print(exc, file=sys.stderr)
        return 1
    finally:
        for signum, handler in previous.items():
            with contextlib.suppress(TypeError, ValueError):
                signal.signal(signum, handler)
