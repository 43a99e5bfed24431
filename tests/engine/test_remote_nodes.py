from __future__ import annotations

import json
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from flowscope.engine import Engine, NodeRegistry, OpenAICompatibleProvider, Result, Secret, WorkflowBuilder
from tests.engine.conftest import Captured
from tests.helpers import serve_asgi


async def test_http_node_propagates_traceparent(engine: Engine, captured: Captured) -> None:
    seen: list[dict[str, str]] = []

    async def echo(request: Request) -> Response:
        seen.append(dict(request.headers))
        if request.query_params.get("fail"):
            return JSONResponse({"error": "nope"}, status_code=503)
        return JSONResponse({"ok": True, "q": request.query_params.get("q")})

    app = Starlette(routes=[Route("/echo", echo)])
    async with serve_asgi(app) as base:
        wf = WorkflowBuilder("h").http("fetch", base + "/echo?q={{ input.q }}").build()
        result = await engine.run(wf, {"q": "berlin"})
        bad = await engine.run(WorkflowBuilder("h2").http("fetch", base + "/echo?fail=1").build())
    assert result.result is Result.SUCCESS
    assert result.outputs["fetch"]["body"] == {"ok": True, "q": "berlin"}
    span = next(s for s in captured.spans() if s.name == "http fetch")
    trace_id = format(span.context.trace_id, "032x")
    span_id = format(span.context.span_id, "016x")
    version, got_trace, got_span, flags = seen[0]["traceparent"].split("-")
    assert (version, got_trace, got_span) == ("00", trace_id, span_id)
    assert int(flags, 16) & 0x01, "sampled flag must be set"
    attrs = dict(span.attributes or {})
    assert attrs["http.response.status_code"] == 200
    assert attrs["http.request.method"] == "GET"
    assert bad.result is Result.FAILURE
    assert bad.error is not None and "HTTP 503" in bad.error


async def test_openai_compatible_provider_streams_and_reports_usage(captured: Captured) -> None:
    requests: list[dict[str, object]] = []
    auth: list[str] = []

    async def completions(request: Request) -> Response:
        body = await request.json()
        requests.append(body)
        auth.append(request.headers.get("authorization", ""))

        async def stream() -> AsyncIterator[bytes]:
            for word in ("Hello", " there"):
                chunk = {"choices": [{"delta": {"content": word}}]}
                yield f"data: {json.dumps(chunk)}\n\n".encode()
            usage = {"choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": 2}}
            yield f"data: {json.dumps(usage)}\n\n".encode()
            yield b"data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    app = Starlette(routes=[Route("/v1/chat/completions", completions, methods=["POST"])])
    async with serve_asgi(app) as base:
        provider = OpenAICompatibleProvider(base + "/v1", api_key=Secret("sk-test"), name="openai")
        engine = Engine(captured.telemetry, NodeRegistry(providers={"openai": provider}))
        wf = WorkflowBuilder("chat").llm("ask", "gpt-x", "Say hi to {{ input.name }}", provider="openai").build()
        result = await engine.run(wf, {"name": "Ana"})
        await engine.aclose()
    assert result.result is Result.SUCCESS, result.error
    assert result.outputs["ask"]["text"] == "Hello there"
    assert requests[0]["messages"] == [{"role": "user", "content": "Say hi to Ana"}]
    assert requests[0]["stream"] is True
    assert auth == ["Bearer sk-test"]
    span = next(s for s in captured.spans() if s.name == "chat gpt-x")
    attrs = dict(span.attributes or {})
    assert attrs["gen_ai.usage.input_tokens"] == 11
    assert attrs["gen_ai.usage.output_tokens"] == 2
    assert attrs["gen_ai.provider.name"] == "openai"
