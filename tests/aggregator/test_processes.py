"""Check worker processes: a worker that dies is replaced and its batches checked again, a batch that worker
after worker dies on fails with a clear error, the aggregator around them stays up, and closing ends them all."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc
import pytest

from collector.aggregator.checker import CheckFailed
from collector.aggregator.checks import Limits, check
from collector.aggregator.processes import ATTEMPTS, ProcessChecker
from collector.aggregator.rules import GarbageBatch
from tests.aggregator.conftest import WAIT_S, AggregatorFactory, http_get, now_ns, send, simple_batch

SECOND = 1_000_000_000
LIMITS = Limits(max_future_s=300.0, max_batch_samples=1_000_000)
T = TypeVar("T")
# the real worker, but one that dies on a batch naming host "crash-me" (as a bug in a library would)
CRASHING = [
    sys.executable,
    "-c",
    "import os, sys\n"
    "from collector.aggregator import check_worker as worker\n"
    "real = worker.answer\n"
    "worker.answer = lambda data, at, limits: os._exit(7) if b'crash-me' in data else real(data, at, limits)\n"
    "sys.exit(worker.main(sys.argv[1:]))\n",
    "300.0",
    "1000000",
]


def run(work: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(asyncio.wait_for(work(), WAIT_S))


def payload(sequence: int = 1, host: str = "host-a") -> bytes:
    return simple_batch(sequence, now_ns() - 10 * SECOND, host=host).SerializeToString()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_workers_check_as_the_aggregator_does_and_close() -> None:
    async def work() -> None:
        pool = ProcessChecker(LIMITS, 2)
        await pool.start()
        pids = [worker.pid for worker in pool.workers]
        received = now_ns()
        data = [payload(n) for n in range(1, 6)]
        results = await asyncio.gather(*(pool.check(one, received) for one in data))
        assert results == [check(one, received, LIMITS) for one in data]
        with pytest.raises(GarbageBatch, match=r"not a wattmeter\.v1\.Batch"):
            await pool.check(b"\xff\xff\xff garbage", received)
        await pool.close()
        assert not any(alive(pid) for pid in pids)
        with pytest.raises(CheckFailed, match="stopping"):
            await pool.check(data[0], received)

    run(work)


def test_a_worker_killed_holding_a_batch_is_replaced_and_the_batch_checked_again() -> None:
    async def work() -> None:
        pool = ProcessChecker(LIMITS, 1)
        await pool.start()
        (worker,) = pool.workers
        os.kill(worker.pid, signal.SIGSTOP)  # it holds the batch without answering
        received, data = now_ns(), payload()
        pending = asyncio.ensure_future(pool.check(data, received))
        while not worker.pending:
            await asyncio.sleep(0.01)
        os.kill(worker.pid, signal.SIGKILL)
        assert await pending == check(data, received, LIMITS)  # from the new worker
        assert pool.restarts == 1
        assert [w.pid for w in pool.workers] != [worker.pid]
        await pool.close()

    run(work)


def test_a_batch_workers_keep_dying_on_fails_clearly_and_the_others_are_checked() -> None:
    async def work() -> None:
        pool = ProcessChecker(LIMITS, 2, command=CRASHING)
        await pool.start()
        received = now_ns()
        poison = payload(host="crash-me")
        good = [payload(n) for n in range(1, 5)]
        results = await asyncio.gather(
            pool.check(poison, received), *(pool.check(one, received) for one in good), return_exceptions=True
        )
        failure = results[0]
        assert isinstance(failure, CheckFailed)
        assert f"exited (exit status 7, exit status 7), {ATTEMPTS} times" in str(failure)
        assert "not checked (nor acknowledged)" in str(failure)
        # a batch queued behind the poison on a dying worker may fail with it; none is wrongly answered
        checked = [r for r in results[1:] if not isinstance(r, BaseException)]
        assert checked
        assert all(r == check(one, received, LIMITS) for r, one in zip(results[1:], good, strict=True) if r in checked)
        while len(pool.workers) < 2:  # replaced
            await asyncio.sleep(0.01)
        assert pool.restarts >= ATTEMPTS
        assert await pool.check(good[0], received) == check(good[0], received, LIMITS)
        await pool.close()

    run(work)


def test_a_worker_that_cannot_start_is_a_clear_error() -> None:
    async def work() -> None:
        pool = ProcessChecker(LIMITS, 1, command=[sys.executable, "-c", "raise SystemExit(3)"])
        with pytest.raises(CheckFailed, match=r"exited \(exit status 3\) at start"):
            await pool.start()

    run(work)


def test_the_aggregator_stays_up_when_its_worker_is_killed(start_aggregator: AggregatorFactory) -> None:
    running = start_aggregator(ingest={"workers": 1})
    pool = running.aggregator.checker
    assert isinstance(pool, ProcessChecker)
    start = now_ns() - 20 * SECOND
    batches = [simple_batch(n, start + (n - 1) * SECOND, energy0=1000.0 + 90.0 * (n - 1)) for n in (1, 2, 3)]
    with grpc.insecure_channel(running.target) as channel:
        assert [a.acked_sequence for a in send(channel, batches[:1]).acks] == [1]
        os.kill(pool.workers[0].pid, signal.SIGKILL)
        result = send(channel, batches[1:])  # checked by the worker started in its place
    assert result.code is None, result.details
    assert [(a.acked_sequence, a.rejected_sequence) for a in result.acks] == [(2, 0), (3, 0)]
    assert len(running.aggregator.store.device_samples("host-a", "gpu0", 0, 2**62)) == 30
    assert http_get(running.http_url + "/healthz")[0] == 200


def test_a_batch_that_cannot_be_checked_is_not_acknowledged(
    start_aggregator: AggregatorFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ProcessChecker, "__init__", _crashing_init)
    running = start_aggregator(ingest={"workers": 1})
    with grpc.insecure_channel(running.target) as channel:
        result = send(channel, [simple_batch(1, now_ns() - 5 * SECOND, host="crash-me")])
    assert result.code == grpc.StatusCode.UNAVAILABLE
    assert "could not check the batch" in result.details
    assert result.acks == []
    assert running.aggregator.store.acked_sequence("instance-1") == 0
    assert dict(running.aggregator.metrics.batches) == {"error": 1}
    with grpc.insecure_channel(running.target) as channel:  # the next batch is checked
        assert send(channel, [simple_batch(1, now_ns() - 5 * SECOND)]).acks[0].acked_sequence == 1


_real_init = ProcessChecker.__init__


def _crashing_init(self: ProcessChecker, limits: Limits, processes: int, command: list[str] | None = None) -> None:
    _real_init(self, limits, processes, CRASHING)
