"""Review: spans and process bindings in the agent's stream, and how the request engine finds a span's workload."""

from __future__ import annotations

import grpc
import pytest

from collector.aggregator.request_engine import RequestEngine
from collector.aggregator.request_resolve import HostBindings, HostWorkloads
from collector.proto import wattmeter_pb2 as pb
from collector.store.base import ProcessBindingRow, SpanRow, Store
from tests.aggregator.conftest import RunningAggregator, now_ns, send, simple_batch
from tests.aggregator.test_request_engine import Clock, constant_host, engine_for, result
from tests.fakes.request_world import T0, WORKLOAD, S

SECOND = 1_000_000_000
FAR = 2**62
BATCH_JOB = ("batch-job", "training", "j1")


def early_span_of_a_batch_job(store: Store) -> tuple[RequestEngine, Clock]:
    """host-a: vllm 75 %, batch-job 25 % of 100 W; pid 4242 bound to batch-job from T0 and its span "early" at
    2..4 s, computed by an engine at T0 + 30 s (a grace of 10 s): batch-job's energy alone. The engine and its clock."""
    constant_host(store, workloads={WORKLOAD: 0.75, BATCH_JOB: 0.25})
    store.write_process_bindings([ProcessBindingRow("host-a", 4242, *BATCH_JOB, T0)])
    store.write_spans([SpanRow("early", "s", "host-a", T0 + 2 * S, T0 + 4 * S, pid=4242)])
    clock = Clock(T0 + 30 * S)
    engine = engine_for(store, clock, finalize_grace_s=10)
    engine.run_pass()
    assert result(store, "early").active_j == pytest.approx(50.0, rel=1e-9)  # batch-job alone, 2 s x 25 W
    return engine, clock


# -- ingest


def test_bad_spans_and_bindings_cost_nothing_else(aggregator: RunningAggregator, channel: grpc.Channel) -> None:
    start = now_ns() - 5 * SECOND
    one = simple_batch(1, start)
    one.spans.append(pb.RequestSpan(request_id="good", start_ns=start, end_ns=start + SECOND, pid=7))
    one.spans.append(pb.RequestSpan(request_id="", start_ns=start, end_ns=start + SECOND))  # no request id
    one.spans.append(pb.RequestSpan(request_id="future", start_ns=start, end_ns=now_ns() + 3600 * SECOND))
    one.spans.append(pb.RequestSpan(request_id="nul", start_ns=start, end_ns=start + 1, model="a\0b"))
    one.spans.append(pb.RequestSpan(request_id="other-host", start_ns=start, end_ns=start + 1, hostname="host-b"))
    identity = pb.WorkloadIdentity(workload="train", phase="training")
    one.processes.append(pb.ProcessBinding(pid=7, workload=identity))
    one.processes.append(pb.ProcessBinding(pid=8, workload=pb.WorkloadIdentity()))  # no name: dropped
    ack = send(channel, [one]).acks[0]
    assert (ack.acked_sequence, ack.rejected_sequence) == (1, 0)
    store = aggregator.aggregator.store
    assert len(store.device_samples("host-a", "gpu0", 0, FAR)) == 10
    assert [s.request_id for s in store.request_spans(["good", "", "future", "nul", "other-host"])] == ["good"]
    assert dict(aggregator.aggregator.metrics.spans) == {"accepted": 1, "rejected": 4}
    assert [(b.pid, b.workload) for b in store.process_bindings("host-a")] == [(7, "train")]
    assert store.process_bindings("host-b") == []


def test_a_span_sent_again_in_a_later_batch_is_stored_once(
    aggregator: RunningAggregator, channel: grpc.Channel
) -> None:
    start = now_ns() - 5 * SECOND
    first = simple_batch(1, start)
    second = simple_batch(2, start + SECOND, energy0=1090.0)
    for one in (first, second):  # with and without a span id
        one.spans.append(pb.RequestSpan(request_id="r", span_id="s1", start_ns=start, end_ns=start + 5, pid=3))
        one.spans.append(pb.RequestSpan(request_id="r", start_ns=start, end_ns=start + 7, workload="train"))
    assert [a.rejected_sequence for a in send(channel, [first, second, first]).acks] == [0, 0, 0]
    store = aggregator.aggregator.store
    assert len(store.request_spans(["r"])) == 2
    request = store.request("r")
    assert request is not None and request.spans == 2


# -- resolution (unit)


def resolver(rows: list[tuple[int, str, int]], names: tuple[str, ...] = ()) -> HostWorkloads:
    bindings = HostBindings.of(ProcessBindingRow("h", pid, name, "inference", "", seen) for pid, name, seen in rows)
    return HostWorkloads(bindings, frozenset(names))


def test_pid_binding_in_time() -> None:
    # pid 5: "a" from 100, reused by "b" from 200
    host = resolver([(5, "b", 200), (5, "a", 100)])
    assert host.resolve("", 5, "", 50) == "a"  # before any binding: the first seen after
    assert host.resolve("", 5, "", 100) == "a"
    assert host.resolve("", 5, "", 199) == "a"
    assert host.resolve("", 5, "", 200) == "b"
    assert host.resolve("", 5, "", 10**12) == "b"
    assert host.resolve("explicit", 5, "b", 150) == "explicit"  # the explicit name first
    assert host.resolve("", 6, "b", 150) is None  # unbound pid, service name not a workload here
    # two workloads seen at the same time for one pid: one of them, the same every time
    twice = resolver([(5, "b", 100), (5, "a", 100)])
    assert twice.resolve("", 5, "", 100) == twice.resolve("", 5, "", 100) in {"a", "b"}


def test_service_name_matching() -> None:
    host = resolver([], ("vllm", "Train", "train"))
    assert host.resolve("", 0, "vllm", 1) == "vllm"
    assert host.resolve("", 0, "VLLM", 1) == "vllm"
    assert host.resolve("", 0, "train", 1) == "train"  # exact first
    assert host.resolve("", 0, "TRAIN", 1) is None  # two names equal to it ignoring case: none
    assert host.resolve("", 0, "other", 1) is None


# -- resolution in the engine (both stores)


def test_span_by_pid_waits_for_its_binding_within_the_grace(store: Store) -> None:
    constant_host(store, workloads={WORKLOAD: 0.75, BATCH_JOB: 0.25})
    store.write_spans([SpanRow("r", "s", "host-a", T0 + 2 * S, T0 + 4 * S, pid=4242)])
    clock = Clock(T0 + 10 * S)
    engine = engine_for(store, clock, finalize_grace_s=30)
    engine.run_pass()
    assert result(store, "r").status == "pending"  # its binding may come with the agent's next batch
    store.write_process_bindings([ProcessBindingRow("host-a", 4242, *BATCH_JOB, T0 + 11 * S)])
    clock.now_ns = T0 + 12 * S
    engine.run_pass()
    r = result(store, "r")
    assert (r.status, r.active_j) == ("final", pytest.approx(50.0, rel=1e-9))


def test_pid_reused_after_the_engine_read_the_bindings(store: Store) -> None:
    engine, _ = early_span_of_a_batch_job(store)
    # the pid is reused by vllm from 10 s; a span of it comes after
    store.write_process_bindings([ProcessBindingRow("host-a", 4242, *WORKLOAD, T0 + 10 * S)])
    store.write_spans([SpanRow("late", "s", "host-a", T0 + 12 * S, T0 + 14 * S, pid=4242)])
    engine.run_pass()
    assert result(store, "late").active_j == pytest.approx(150.0, rel=1e-9)  # vllm alone, 2 s x 75 W


def test_a_long_running_process_keeps_its_binding_through_pruning(store: Store) -> None:
    """The agent sends a pid's binding once (changes only): pruning raw data must not forget a live process."""
    store.write_process_bindings([ProcessBindingRow("host-a", 4242, *BATCH_JOB, T0)])
    store.prune(T0 + 3 * 3600 * S, raw_retention_s=3600, rollup_retention_s=86_400)
    assert [b.workload for b in store.process_bindings("host-a")] == ["batch-job"]


def test_pid_bound_back_to_a_workload_it_had_before(store: Store) -> None:
    """pid 4242: batch-job from 0 s, vllm from 10 s, batch-job again from 15 s (the agent sends changes only)."""
    constant_host(store, workloads={WORKLOAD: 0.75, BATCH_JOB: 0.25})
    store.write_process_bindings([ProcessBindingRow("host-a", 4242, *BATCH_JOB, T0)])
    store.write_process_bindings([ProcessBindingRow("host-a", 4242, *WORKLOAD, T0 + 10 * S)])
    store.write_process_bindings([ProcessBindingRow("host-a", 4242, *BATCH_JOB, T0 + 15 * S)])
    store.write_spans([SpanRow("first", "s", "host-a", T0 + 2 * S, T0 + 4 * S, pid=4242)])
    engine_for(store, Clock(T0 + 30 * S), finalize_grace_s=10).run_pass()
    assert result(store, "first").active_j == pytest.approx(50.0, rel=1e-9)  # batch-job: 2 s x 25 W


def test_agent_restart_resending_a_binding_keeps_its_first_sighting(store: Store) -> None:
    """pid 4242: batch-job from 0 s, reused by vllm from 10 s; the agent restarts at 25 s and sends its live
    bindings again (vllm's, seen at 25 s). A vllm request at 12..14 s is still vllm's."""
    constant_host(store, workloads={WORKLOAD: 0.75, BATCH_JOB: 0.25}, seconds=30)
    store.write_process_bindings([ProcessBindingRow("host-a", 4242, *BATCH_JOB, T0)])
    store.write_process_bindings([ProcessBindingRow("host-a", 4242, *WORKLOAD, T0 + 10 * S)])
    store.write_process_bindings([ProcessBindingRow("host-a", 4242, *WORKLOAD, T0 + 25 * S)])  # after the restart
    store.write_spans([SpanRow("r", "s", "host-a", T0 + 12 * S, T0 + 14 * S, pid=4242)])
    engine_for(store, Clock(T0 + 60 * S), finalize_grace_s=10).run_pass()
    assert result(store, "r").active_j == pytest.approx(150.0, rel=1e-9)  # vllm: 2 s x 75 W
