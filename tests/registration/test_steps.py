"""The registration server's steps messages over a real Unix socket: the count, the pid from SO_PEERCRED, the
registration the steps were sent under, each refusal, the rate limit."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest

from collector.registration import MAX_STEPS, RegistrationEvent, RegistrationServer, StepsEvent
from tests.fakes.registration_world import Recorder, connect, line
from tests.fakes.waiting import wait_for


class StepsRecorder(Recorder):
    def __init__(self) -> None:
        super().__init__()
        self.steps: list[StepsEvent] = []

    def on_steps(self, event: StepsEvent) -> None:
        self.steps.append(event)


@pytest.fixture
def steps(make_server: Callable[..., RegistrationServer]) -> tuple[RegistrationServer, StepsRecorder]:
    recorder = StepsRecorder()
    server = make_server(
        on_register=recorder.on_register,
        on_disconnect=recorder.on_disconnect,
        on_span=recorder.on_span,
        on_steps=recorder.on_steps,
    )
    return server, recorder


def steps_line(count: object, **extra: object) -> bytes:
    return line({"v": 1, "type": "steps", "count": count, **extra})


def register_line(workload: str = "llama-ft", phase: str = "training", job: str = "") -> bytes:
    return line({"v": 1, "type": "register", "workload": workload, "phase": phase, "job": job})


def test_steps_need_no_registration_and_take_the_pid_from_the_socket(
    steps: tuple[RegistrationServer, StepsRecorder],
) -> None:
    server, recorder = steps
    with connect(server.socket_path) as sock:
        sock.sendall(steps_line(3, pid=1, workload="not-the-clients-to-say") + steps_line(MAX_STEPS))
        wait_for(lambda: len(recorder.steps) == 2)
    me = (os.getpid(), os.getuid(), os.getgid())
    assert recorder.steps == [StepsEvent(*me, count=3), StepsEvent(*me, count=MAX_STEPS)]
    assert recorder.events == [] and recorder.disconnects == []  # steps register nothing
    assert (server.accepted, server.steps_accepted, server.steps_refused, server.errors) == (2, 2, 0, 0)


def test_steps_carry_the_registration_they_were_sent_under(steps: tuple[RegistrationServer, StepsRecorder]) -> None:
    server, recorder = steps
    with connect(server.socket_path) as sock:
        sock.sendall(
            register_line(job="77")
            + steps_line(10)
            + line({"v": 1, "type": "phase", "phase": "inference"})
            + steps_line(2)
        )
        wait_for(lambda: len(recorder.steps) == 2)
    training, inference = recorder.steps
    assert training.registration == RegistrationEvent(
        os.getpid(), os.getuid(), os.getgid(), "llama-ft", "training", "77", {}, "register"
    )
    assert (training.count, inference.count) == (10, 2)
    assert inference.registration is not None and inference.registration.phase == "inference"
    assert [e.kind for e in recorder.events] == ["register", "phase"]  # the steps changed no registration


REFUSED_COUNTS = [0, -1, MAX_STEPS + 1, 1.5, 1e3, "3", True, None, [1], {"n": 1}]


@pytest.mark.parametrize("count", REFUSED_COUNTS, ids=[repr(c) for c in REFUSED_COUNTS])
def test_a_bad_count_is_refused_counted_and_loses_nothing_accepted(
    steps: tuple[RegistrationServer, StepsRecorder], count: object
) -> None:
    server, recorder = steps
    with connect(server.socket_path) as sock:
        sock.sendall(register_line() + steps_line(5) + steps_line(count) + steps_line(7))
        wait_for(lambda: len(recorder.steps) == 2)
    assert [event.count for event in recorder.steps] == [5, 7]  # the connection went on
    assert (server.error_counts["count"], server.errors, server.steps_refused) == (1, 1, 1)
    assert (server.steps_accepted, server.accepted) == (2, 3)
    assert [e.workload for e in recorder.events] == ["llama-ft"]  # the registration stands


def test_a_steps_message_without_a_count_is_refused(steps: tuple[RegistrationServer, StepsRecorder]) -> None:
    server, recorder = steps
    with connect(server.socket_path) as sock:
        sock.sendall(line({"v": 1, "type": "steps"}) + b'{"v": 1, "type": "steps", "count": 4\n' + steps_line(1))
        wait_for(lambda: recorder.steps)
    assert [event.count for event in recorder.steps] == [1]
    assert (server.error_counts["count"], server.error_counts["garbage"], server.steps_refused) == (1, 1, 1)


def test_steps_count_against_the_rate_limit(make_server: Callable[..., RegistrationServer]) -> None:
    recorder = StepsRecorder()
    server = make_server(max_messages_per_s=5.0, on_steps=recorder.on_steps)
    flood = 200
    with connect(server.socket_path) as sock:
        sock.sendall(steps_line(1) * flood)
        wait_for(lambda: server.steps_accepted + server.error_counts["rate_limited"] == flood)
    assert server.steps_accepted < flood // 2
    wait_for(lambda: sum(event.count for event in recorder.steps) == server.steps_accepted)  # counted, then handed on
    assert server.error_counts["rate_limited"] > flood // 2


def test_a_failing_steps_callback_is_counted_and_the_server_keeps_serving(
    make_server: Callable[..., RegistrationServer], recorder: Recorder
) -> None:
    def broken(event: StepsEvent) -> None:
        raise RuntimeError("bug")

    server = make_server(on_steps=broken)
    with connect(server.socket_path) as sock:
        sock.sendall(steps_line(1) + register_line())
        wait_for(lambda: recorder.events)
    assert (server.callback_errors, server.steps_accepted) == (1, 1)


def test_without_a_steps_callback_steps_are_only_counted(make_server: Callable[..., RegistrationServer]) -> None:
    server = make_server()
    with connect(server.socket_path) as sock:
        sock.sendall(steps_line(9))
        wait_for(lambda: server.steps_accepted == 1)
    assert (server.errors, server.callback_errors) == (0, 0)
