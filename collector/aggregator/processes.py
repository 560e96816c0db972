"""Checking batches in worker processes (``[ingest] workers``), so parsing and checking run beside the event loop
instead of holding its GIL.

Each worker (``check_worker``) answers requests in order over its pipes (``frames``); a batch goes to the worker
with the fewest waiting. A worker that dies (killed, out of memory, a crash in a library) is replaced at once, and
the batches it held are sent to another; a batch that was with a worker that died ``ATTEMPTS`` times is not
checked: it fails with ``CheckFailed`` (the agent is told UNAVAILABLE and sends it again later), so one batch that
kills workers cannot keep killing them. The aggregator itself never checks a batch in that case.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import pickle
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import cast

from collector.aggregator import frames, rules
from collector.aggregator.checker import Checker, CheckFailed
from collector.aggregator.checks import Checked, Limits, from_wire

log = logging.getLogger(__name__)

ATTEMPTS = 2  # workers that may die holding one batch before it fails
START_TIMEOUT_S = 60.0  # a worker not ready by then does not start (python, numpy and protobuf imported)
CLOSE_TIMEOUT_S = 0.5  # closed workers not gone by then are killed
YOUNG_S = 5.0  # a worker that dies this soon after its start is restarted only after a pause
PAUSES_S = (0.2, 1.0, 5.0, 30.0)  # the pause before each restart after a young death, then the last again


@dataclass
class _Request:
    number: int
    frame: bytes
    future: asyncio.Future[Checked]
    attempts: int = 0
    causes: list[str] = field(default_factory=list)


class _Worker(asyncio.SubprocessProtocol):
    def __init__(self, pool: ProcessChecker) -> None:
        self.pool = pool
        self.transport: asyncio.SubprocessTransport | None = None
        self.stdin: asyncio.WriteTransport | None = None
        self.reader = frames.AnswerReader()
        self.pending: dict[int, _Request] = {}
        self.ready: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.gone: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.pid = 0
        self.started = time.monotonic()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.SubprocessTransport, transport)
        self.pid = self.transport.get_pid()
        self.stdin = cast(asyncio.WriteTransport, self.transport.get_pipe_transport(0))

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        for number, payload in self.reader.feed(data):
            if number == 0:
                if not self.ready.done():
                    self.ready.set_result(self.pid)
                continue
            request = self.pending.pop(number, None)
            if request is not None:
                _answer(request, payload)

    def connection_lost(self, exc: Exception | None) -> None:
        """The process has exited and its pipes are closed: every answer it wrote has been read."""
        if not self.ready.done():
            self.ready.set_exception(CheckFailed(f"the check worker process exited ({self.returncode()}) at start"))
            self.ready.exception()  # retrieved: whoever still waits for it hears it, nobody else needs to
        if not self.gone.done():
            self.gone.set_result(None)
        self.pool._lost(self)

    def returncode(self) -> str:
        code = None if self.transport is None else self.transport.get_returncode()
        return "still running" if code is None else f"signal {-code}" if code < 0 else f"exit status {code}"

    def send(self, request: _Request) -> None:
        assert self.stdin is not None
        self.pending[request.number] = request
        self.stdin.write(request.frame)


def _answer(request: _Request, payload: bytes) -> None:
    if request.future.done():
        return
    kind, value = payload[:1], payload[1:]
    if kind == frames.CHECKED:
        request.future.set_result(from_wire(value))
    elif kind == frames.REFUSED:
        name, message = pickle.loads(value)
        refused = {cls.__name__: cls for cls in (rules.GarbageBatch, rules.NewerProtocol)}.get(name)
        request.future.set_exception(refused(message) if refused else CheckFailed(message))
    else:
        request.future.set_exception(CheckFailed(f"checking it failed in a worker process: {pickle.loads(value)}"))


class ProcessChecker(Checker):
    """``processes`` worker processes; ``start`` them on the event loop that will call ``check``."""

    def __init__(self, limits: Limits, processes: int, command: list[str] | None = None) -> None:
        self.processes = processes
        self.command = command or [
            sys.executable,
            "-m",
            "collector.aggregator.check_worker",
            repr(limits.max_future_s),
            str(limits.max_batch_samples),
        ]
        self.workers: list[_Worker] = []
        self.restarts = 0  # workers started to replace one that died
        self._numbers = itertools.count(1)
        self._waiting: deque[_Request] = deque()  # no worker ready: sent when one is
        self._closing = False
        self._respawns: set[asyncio.Task[None]] = set()
        self._young_deaths = 0

    async def start(self) -> None:
        """Start the workers and wait until each is ready; raises ``CheckFailed`` when one cannot start."""
        try:
            await asyncio.gather(*(self._spawn() for _ in range(self.processes)))
        except BaseException:
            await self.close()
            raise

    async def _spawn(self) -> _Worker:
        loop = asyncio.get_running_loop()
        try:
            _, worker = await loop.subprocess_exec(
                lambda: _Worker(self), *self.command, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
            )
        except OSError as exc:
            raise CheckFailed(f"cannot start a check worker process ({self.command[0]}): {exc}") from exc
        try:
            await asyncio.wait_for(asyncio.shield(worker.ready), START_TIMEOUT_S)
        except asyncio.TimeoutError:
            if worker.transport is not None:
                worker.transport.kill()
            raise CheckFailed(f"the check worker process was not ready within {START_TIMEOUT_S:g} s") from None
        except asyncio.CancelledError:  # closing meanwhile
            if worker.transport is not None:
                worker.transport.kill()
                worker.transport.close()
            raise
        if self._closing:
            self._close_one(worker)
            return worker
        self.workers.append(worker)
        while self._waiting:
            self._dispatch(self._waiting.popleft())
        return worker

    async def check(self, data: bytes, received_ns: int) -> Checked:
        if self._closing:
            raise CheckFailed("the aggregator is stopping")
        number = next(self._numbers)
        future: asyncio.Future[Checked] = asyncio.get_running_loop().create_future()
        self._dispatch(_Request(number, frames.request(number, received_ns, data), future))
        return await future

    def _dispatch(self, request: _Request) -> None:
        if not self.workers:
            self._waiting.append(request)
            return
        min(self.workers, key=lambda worker: len(worker.pending)).send(request)

    def _lost(self, worker: _Worker) -> None:
        if worker in self.workers:
            self.workers.remove(worker)
        if self._closing:
            for request in worker.pending.values():
                _fail(request, CheckFailed("the aggregator is stopping"))
            return
        if not worker.ready.done() or worker.ready.exception() is not None:
            return  # never started: _spawn reports it
        cause = worker.returncode()
        log.error("check worker process %d exited (%s) holding %d batches; starting another", worker.pid, cause,
                  len(worker.pending))  # fmt: skip
        for request in sorted(worker.pending.values(), key=lambda r: r.number):
            request.attempts += 1
            request.causes.append(cause)
            if request.attempts >= ATTEMPTS:
                _fail(
                    request,
                    CheckFailed(
                        f"the worker processes checking it exited ({', '.join(request.causes)}), {ATTEMPTS} times: "
                        "it was not checked (nor acknowledged)"
                    ),
                )
            else:
                self._dispatch(request)
        worker.pending.clear()
        young = time.monotonic() - worker.started < YOUNG_S
        self._young_deaths = self._young_deaths + 1 if young else 0
        pause = PAUSES_S[min(self._young_deaths, len(PAUSES_S)) - 1] if self._young_deaths else 0.0
        task = asyncio.get_running_loop().create_task(self._respawn(pause))
        self._respawns.add(task)
        task.add_done_callback(self._respawns.discard)

    async def _respawn(self, pause_s: float) -> None:
        await asyncio.sleep(pause_s)
        while not self._closing:
            try:
                await self._spawn()
                self.restarts += 1
                return
            except CheckFailed as exc:
                log.error("%s; trying again in %g s", exc, PAUSES_S[-1])
                await asyncio.sleep(PAUSES_S[-1])

    def _close_one(self, worker: _Worker) -> None:
        if worker.stdin is not None and not worker.stdin.is_closing():
            worker.stdin.close()  # end of input: the worker exits

    async def close(self) -> None:
        self._closing = True
        for task in list(self._respawns):
            task.cancel()
        workers = list(self.workers)
        for worker in workers:
            self._close_one(worker)
        if workers:
            _, late = await asyncio.wait([w.gone for w in workers], timeout=CLOSE_TIMEOUT_S)
            for worker in workers:
                if not worker.gone.done() and worker.transport is not None:
                    worker.transport.kill()
            if late:
                await asyncio.wait([w.gone for w in workers], timeout=CLOSE_TIMEOUT_S)
        for worker in workers:
            if worker.transport is not None:
                worker.transport.close()
        while self._waiting:
            _fail(self._waiting.popleft(), CheckFailed("the aggregator is stopping"))


def _fail(request: _Request, error: CheckFailed) -> None:
    if not request.future.done():
        request.future.set_exception(error)
