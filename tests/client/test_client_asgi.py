"""collector.client.EnergyMiddleware around hand-written ASGI apps, called with scope/receive/send coroutines (no
network, no web framework), reporting to the real registration server on a Unix socket in tmp_path."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import collector.client as client
from collector.client import EnergyMiddleware, Message, Receive, Scope, Send
from collector.registration import RegistrationServer, SpanEvent


def wait_for_spans(spans: list[SpanEvent], count: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while len(spans) < count:
        assert time.monotonic() < deadline, f"{len(spans)} spans, not {count}"
        time.sleep(0.005)


@pytest.fixture
def fresh_client(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[client._Client]:
    state = client._Client(retry_interval_s=0.05)
    monkeypatch.setattr(client, "_client", state)
    for counter in ("dropped", "spans_sent", "spans_dropped"):
        monkeypatch.setattr(client, counter, 0)
    monkeypatch.setenv(client.ENV_SOCKET, str(tmp_path / "agent.sock"))
    yield state
    state.close()


@pytest.fixture
def spans(fresh_client: client._Client, tmp_path: Path) -> Iterator[list[SpanEvent]]:
    received: list[SpanEvent] = []
    server = RegistrationServer(tmp_path / "agent.sock", on_register=lambda event: None, on_span=received.append)
    server.start()
    yield received
    server.stop()


def http_scope(path: str = "/v1/completions", headers: dict[str, str] | None = None) -> Scope:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "path": path,
        "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()],
    }


class Exchange:
    """One call's receive/send: the request body to hand out, the messages the app sent."""

    def __init__(self, body: bytes = b'{"prompt": "hi"}') -> None:
        self.body = body
        self.sent: list[Message] = []

    async def receive(self) -> Message:
        return {"type": "http.request", "body": self.body, "more_body": False}

    async def send(self, message: Message) -> None:
        self.sent.append(message)


def call(app: Any, scope: Scope, exchange: Exchange) -> None:
    asyncio.run(app(scope, exchange.receive, exchange.send))


async def completion_app(scope: Scope, receive: Receive, send: Send) -> None:
    """A tiny inference endpoint: reads the prompt, reports its tokens through current_request(), streams."""
    request = await receive()
    span = client.current_request()
    assert span is not None
    span.started()
    span.tokens(input=len(request["body"]))
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    span.prefill_done()
    for piece in (b"hel", b"lo"):
        await send({"type": "http.response.body", "body": piece, "more_body": True})
    span.tokens(output=2)
    await send({"type": "http.response.body", "body": b"", "more_body": False})


def test_each_http_request_is_one_span_with_the_apps_tokens(spans: list[SpanEvent]) -> None:
    app = EnergyMiddleware(completion_app, model_header="x-model", tenant_header="x-tenant", labels={"api": "v1"})
    exchange = Exchange()
    before = time.time_ns()
    call(app, http_scope(headers={"X-Request-Id": "abc-1", "x-model": "llama-8b", "x-tenant": "acme"}), exchange)
    after = time.time_ns()
    wait_for_spans(spans, 1)
    span = spans[0]
    assert (span.request_id, span.model, span.tenant, dict(span.labels)) == ("abc-1", "llama-8b", "acme", {"api": "v1"})
    assert (span.input_tokens, span.output_tokens) == (len(exchange.body), 2)
    assert before <= span.start_ns <= span.queue_end_ns <= span.prefill_end_ns <= span.end_ns <= after
    # what the app sent went out as it was, in order
    assert [m["type"] for m in exchange.sent] == ["http.response.start", *["http.response.body"] * 3]
    assert [m.get("body") for m in exchange.sent[1:]] == [b"hel", b"lo", b""]
    assert client.current_request() is None


def test_a_generated_request_id_and_a_model_callable(spans: list[SpanEvent]) -> None:
    seen: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        span = client.current_request()
        assert span is not None
        seen.append(span.request_id)
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    middleware = EnergyMiddleware(app, model=lambda scope: str(scope["path"]).split("/")[2], model_header="x-model")
    for _ in range(2):
        call(middleware, http_scope("/models/mistral-7b/generate", {"x-model": "ignored"}), Exchange())
    wait_for_spans(spans, 2)
    assert [s.request_id for s in spans] == seen
    assert seen[0] != seen[1] and all(len(rid) == 32 for rid in seen)
    assert {s.model for s in spans} == {"mistral-7b"}  # the callable wins over the header


def test_a_raising_model_callable_costs_only_the_model(
    spans: list[SpanEvent], caplog: pytest.LogCaptureFixture
) -> None:
    def broken(scope: Scope) -> str:
        raise KeyError("model")

    middleware = EnergyMiddleware(completion_app, model=broken, model_header="x-model")
    for _ in range(3):
        call(middleware, http_scope(headers={"x-model": "from-header"}), Exchange())
    wait_for_spans(spans, 3)
    assert {s.model for s in spans} == {"from-header"}
    logged = [r for r in caplog.records if r.name == "wattmeter.client" and "callable failed" in r.getMessage()]
    assert len(logged) == 1


def test_a_raising_app_is_reported_and_its_exception_goes_on_unchanged(spans: list[SpanEvent]) -> None:
    boom = RuntimeError("CUDA out of memory")

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        span = client.current_request()
        assert span is not None
        span.tokens(input=9)
        raise boom

    with pytest.raises(RuntimeError) as raised:
        call(EnergyMiddleware(app, model="m"), http_scope(headers={"x-request-id": "oom"}), Exchange())
    assert raised.value is boom
    assert raised.value.__context__ is None  # nothing of ours chained onto it
    wait_for_spans(spans, 1)
    assert (spans[0].request_id, spans[0].model, spans[0].input_tokens) == ("oom", "m", 9)


def test_the_span_ends_with_the_response_not_with_work_after_it(spans: list[SpanEvent]) -> None:
    marks: dict[str, int] = {}

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"done"})
        marks["response_sent"] = time.time_ns()
        await asyncio.sleep(0.01)  # a background task after the response (Starlette runs them here)
        marks["returned"] = time.time_ns()

    call(EnergyMiddleware(app), http_scope(), Exchange())
    wait_for_spans(spans, 1)
    assert spans[0].end_ns <= marks["response_sent"] < marks["returned"]


def test_lifespan_and_websocket_scopes_pass_through_untouched(spans: list[SpanEvent]) -> None:
    calls: list[tuple[Scope, Any, client.RequestSpan | None]] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        calls.append((scope, send, client.current_request()))

    middleware = EnergyMiddleware(app)
    for kind in ("lifespan", "websocket"):
        exchange = Exchange()
        scope: Scope = {"type": kind}
        call(middleware, scope, exchange)
        assert calls[-1][0] is scope
        assert calls[-1][1] == exchange.send  # the app got the server's own send, not a wrapper
        assert calls[-1][2] is None
    call(middleware, http_scope(headers={"x-request-id": "only-http"}), Exchange())
    wait_for_spans(spans, 1)
    assert [s.request_id for s in spans] == ["only-http"]
    assert client.spans_sent == 1


def test_without_an_agent_the_app_serves_as_before(
    fresh_client: client._Client, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="wattmeter.client")
    exchange = Exchange()
    for _ in range(20):
        call(EnergyMiddleware(completion_app, model="m"), http_scope(), exchange)
    assert len(exchange.sent) == 20 * 4
    assert (client.spans_sent, client.spans_dropped) == (0, 20)
    assert len([r for r in caplog.records if "not reachable" in r.getMessage()]) == 1
