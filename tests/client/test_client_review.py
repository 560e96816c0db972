"""Review findings in collector.client: each test shows a case where the client broke one of its rules."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import pytest

import collector.client as client
from collector.client import EnergyMiddleware, Message, Receive, Scope, Send
from collector.registration import RegistrationServer
from tests.fakes.registration_world import Recorder
from tests.fakes.waiting import wait_for

# --- register(): labels the agent refuses cost the whole registration -------------------------------------------


@pytest.mark.parametrize(
    "labels",
    [
        pytest.param({"team-name": "infra", "ok": "1"}, id="not-a-prometheus-name"),
        pytest.param({f"k{i}": "v" for i in range(17)}, id="17-labels"),
        pytest.param({"long": "v" * 300, "ok": "1"}, id="value-over-256"),
    ],
)
def test_register_labels_outside_the_agents_bounds_do_not_cost_the_registration(
    fresh_client: client._Client, server: RegistrationServer, recorder: Recorder, labels: dict[str, str]
) -> None:
    client.register("serve-a", "inference", labels=labels)
    wait_for(lambda: recorder.events or server.errors, timeout_s=5)
    assert server.errors == 0, server.error_counts
    assert [(e.workload, e.phase) for e in recorder.events] == [("serve-a", "inference")]
    sent = dict(recorder.events[0].labels)
    assert len(sent) <= client.MAX_LABELS
    assert all(client._LABEL_NAME.fullmatch(k) and len(v) <= client.MAX_LABEL_VALUE_CHARS for k, v in sent.items())


# --- surrogates (os.environ / argv / filenames with undecodable bytes) never leave the process ---------------------


def test_surrogates_are_never_sent_to_the_agent(
    fresh_client: client._Client, server: RegistrationServer, recorder: Recorder
) -> None:
    bad = "job-\udcff"  # os.fsdecode(b"job-\xff"): what a non-UTF-8 environment variable reads as
    client.register("w", "training", job=bad, labels={"run": bad})
    with client.request("req-\ud800", model=bad, tenant=bad, labels={"route": bad}):
        pass
    wait_for(lambda: recorder.events and recorder.spans)
    event, span = recorder.events[0], recorder.spans[0]
    texts = [event.job, *event.labels.values(), span.request_id, span.model, span.tenant, *span.labels.values()]
    for text in texts:
        text.encode("utf-8")  # the agent's protobuf and Prometheus output must be able to encode what it was sent
    assert span.request_id.startswith("req-") and len(span.request_id) == len("req-\ud800")


# --- a field whose conversion fails with something other than ValueError costs the whole span --------------------


class TensorLike:
    """int() of a multi-element torch tensor raises RuntimeError; comparing it gives an ambiguous truth value."""

    def __int__(self) -> int:
        raise RuntimeError("a Tensor with 2 elements cannot be converted to Scalar")

    def __index__(self) -> int:
        raise RuntimeError("a Tensor with 2 elements cannot be converted to Scalar")

    def __eq__(self, other: object) -> bool:
        raise RuntimeError("Boolean value of Tensor with more than one value is ambiguous")

    __hash__ = None  # type: ignore[assignment]


def test_one_unusable_field_never_costs_the_whole_span(
    fresh_client: client._Client, server: RegistrationServer, recorder: Recorder
) -> None:
    with client.request("req-t", model="m") as r:
        r.tokens(input=5, output=TensorLike())  # type: ignore[arg-type]
        r.prefill_done(time_ns=TensorLike())  # type: ignore[arg-type]
    assert r.sent is True
    wait_for(lambda: recorder.spans)
    span = recorder.spans[0]
    assert (span.request_id, span.model, span.input_tokens, span.output_tokens, span.prefill_end_ns) == (
        "req-t",
        "m",
        5,
        0,
        0,
    )
    assert client.spans_dropped == 0


# --- EnergyMiddleware: one request's labels leak into every later request ------------------------------------------


def test_the_middlewares_labels_are_not_shared_between_requests(
    fresh_client: client._Client, server: RegistrationServer, recorder: Recorder
) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        span = client.current_request()
        assert span is not None
        if scope["path"] == "/premium":
            span.labels["tier"] = "gold"  # type: ignore[index]  # labels is a plain dict at run time
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    middleware = EnergyMiddleware(app)  # no labels given

    async def noop_receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def noop_send(message: Message) -> None:
        pass

    for path in ("/premium", "/free"):
        scope: dict[str, Any] = {"type": "http", "path": path, "headers": [(b"x-request-id", path.encode())]}
        asyncio.run(middleware(scope, noop_receive, noop_send))
    wait_for(lambda: len(recorder.spans) == 2)
    by_id = {s.request_id: dict(s.labels) for s in recorder.spans}
    assert by_id == {"/premium": {"tier": "gold"}, "/free": {}}
    assert middleware.labels == {}


# --- warn-once keys grow without bound -----------------------------------------------------------------------------


def test_distinct_bad_values_neither_grow_memory_nor_log_without_bound(
    fresh_client: client._Client, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="wattmeter.client")
    for i in range(5_000):  # e.g. a workload built from request data: "tenant 17", "tenant 18", ...
        client.report_span(f"r{i}", time.time_ns() - 10, time.time_ns(), workload=f"tenant {i} " + "x" * 1000)
    warnings = [r for r in caplog.records if r.name == "wattmeter.client"]
    assert len(warnings) < 200
    assert len(fresh_client._warned_once) < 200
    assert sum(len(key) for key in fresh_client._warned_once) < 100_000
