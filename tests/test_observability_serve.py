"""Metrics and traces of a real ``agentspace serve`` (issue 21): the optional built-ins selected with
AGENTSPACE_LOAD_PLUGINS, spans exported over OTLP/HTTP to ``[telemetry] otlp_endpoint`` (a collector on
127.0.0.1 that decodes the protobuf requests) and flushed at shutdown, and ``/metrics`` open with
``[metrics] public``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from scripts.harness import GatewayProcess


class Collector:
    """An OTLP/HTTP trace receiver: every span it was sent, with its attributes as a dict."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def traces(self, request: web.Request) -> web.Response:
        export = ExportTraceServiceRequest.FromString(await request.read())
        for resource_spans in export.resource_spans:
            resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    attributes = {a.key: _value(a.value) for a in span.attributes}
                    self.spans.append(
                        {
                            "name": span.name,
                            "span_id": span.span_id,
                            "parent": span.parent_span_id,
                            "attributes": attributes,
                            "service": resource.get("service.name"),
                        }
                    )
        return web.Response(status=200, content_type="application/x-protobuf")

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/traces", self.traces)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = self.runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}/v1/traces"


def _value(value: Any) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_value(v) for v in value.array_value.values]
    return getattr(value, kind) if kind else None


async def test_served_gateway_exports_spans_and_public_metrics(tmp_path: Path, fake_anthropic: Any) -> None:
    collector = Collector()
    await collector.start()
    server = GatewayProcess(
        tmp_path / "data",
        fake_anthropic.url,
        telemetry={"otlp_endpoint": collector.url},
        metrics={"public": True},
    )
    server.load_plugins = "metrics,telemetry"
    await server.start()
    try:
        headers = {"Authorization": f"Bearer {server.token}"}
        async with aiohttp.ClientSession() as http:
            async with http.ws_connect(server.ws_url, headers=headers) as ws:
                await ws.send_json({"type": "chat.send", "id": "1", "content": "Hello"})
                frames = []
                while not frames or frames[-1]["type"] not in ("chat.stream.end", "error"):
                    frames.append(await ws.receive_json(timeout=30))
            assert frames[-1]["type"] == "chat.stream.end"
            async with http.get(f"{server.url}/metrics") as resp:  # public: no token
                assert resp.status == 200
                text = await resp.text()
        assert 'agentspace_requests_total{client="admin",endpoint="ws",model="anthropic/claude-sonnet-4-5"} 1.0' in text
        assert "agentspace_time_to_first_token_seconds_count" in text
    finally:
        assert await server.terminate() == 0  # the span processor is flushed at shutdown
        assert collector.runner is not None
        await collector.runner.cleanup()
    assert server.log_problems() == []
    session_id = frames[0]["sessionId"]
    (turn,) = [s for s in collector.spans if s["name"] == "invoke_agent agentspace"]
    (call,) = [s for s in collector.spans if s["name"] == "chat anthropic/claude-sonnet-4-5"]
    assert call["parent"] == turn["span_id"] and call["service"] == "agentspace"
    a = call["attributes"]
    assert a["gen_ai.operation.name"] == "chat" and a["gen_ai.provider.name"] == "anthropic"
    assert a["gen_ai.conversation.id"] == session_id and a["gen_ai.response.finish_reasons"] == ["stop"]
    assert a["gen_ai.usage.input_tokens"] > 0 and a["gen_ai.usage.output_tokens"] > 0
    assert "gen_ai.input.messages" not in a  # capture_content is off by default
