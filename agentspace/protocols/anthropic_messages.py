"""The Anthropic Messages API wire format (``/v1/messages``), translated to and from our types.

- ``UsageScanner`` reads the usage out of a relayed event stream (``message_start``/``message_delta``,
  cumulative: the last value of each field wins) without touching the bytes.
- ``to_provider_request`` turns a Messages request into a ``ProviderRequest`` for a model that is not
  Anthropic's; ``MessageEncoder`` turns the provider's events back into Messages API events, with the
  content-block indices and order the ``anthropic`` SDK's accumulator accepts.
- ``error_body`` is Anthropic's error shape.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from .. import attachments
from ..events import (
    ProviderEvent,
    ProviderFinish,
    ReasoningDelta,
    TextDelta,
    ToolCallEvent,
)
from ..tokens import count_tokens
from ..types import (
    ChatMessage,
    FilePart,
    Part,
    ReasoningPart,
    TextPart,
    TokenUsage,
    Tool,
    ToolCallPart,
    ToolResultPart,
    compact_json,
    json_bytes,
    new_id,
    reported_count,
)
from .openai_chat import RequestError as ParamError
from .openai_chat import sampling_params

DEFAULT_VERSION = "2023-06-01"

# HTTP status -> Anthropic's error type (their documented table).
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    502: "api_error",
    503: "overloaded_error",
    504: "api_error",
    529: "overloaded_error",
}

# Our error codes -> the status an Anthropic client expects.
STATUS_OF_CODE = {
    "INVALID_MESSAGE": 400,
    "MODEL_NOT_FOUND": 404,
    "UNAUTHORIZED": 401,
    "FORBIDDEN": 403,
    "MODEL_NOT_ALLOWED": 403,
    "PAYLOAD_TOO_LARGE": 413,
    "NO_API_KEY": 424,  # not the client's key: a 401 would send Claude Code to /login
    "RATE_LIMITED": 429,
    "BUDGET_EXCEEDED": 429,
    "LLM_ERROR": 502,
    "SERVICE_UNAVAILABLE": 503,
}

# Our finish reasons -> stop_reason.
STOP_REASONS = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool-calls": "tool_use",
    "content-filter": "refusal",
}


def error_body(status: int, message: str, error_type: str | None = None) -> dict[str, Any]:
    return {"type": "error", "error": {"type": error_type or ERROR_TYPES.get(status, "api_error"), "message": message}}


def error_code_for_status(status: int) -> str:
    """Our error code for an upstream HTTP error status (for the usage record), the one the translated calls
    record for it: a request the provider refused (400, 413) is LLM_ERROR, not the gateway's INVALID_MESSAGE."""
    if status == 429:
        return "RATE_LIMITED"
    if status in (401, 403):
        return "NO_API_KEY"
    if status == 404:
        return "MODEL_NOT_FOUND"
    return "LLM_ERROR"


def error_code_for_type(error_type: str) -> str:
    return "RATE_LIMITED" if error_type == "rate_limit_error" else "LLM_ERROR"


# --- usage ---------------------------------------------------------------------------------------


def update_usage(current: TokenUsage | None, usage: dict[str, Any]) -> TokenUsage:
    """Apply one reported usage object: each field it carries overwrites (streamed usage is cumulative). A
    figure that is no token count (``reported_count``) is left out, as if not reported."""
    out = current if current is not None else TokenUsage()
    if (n := reported_count(usage.get("input_tokens"))) is not None:
        out.input_tokens = n
    if (n := reported_count(usage.get("output_tokens"))) is not None:
        out.output_tokens = n
    if (n := reported_count(usage.get("cache_read_input_tokens"))) is not None:
        out.cache_read_tokens = n
    if (n := reported_count(usage.get("cache_creation_input_tokens"))) is not None:
        out.cache_write_tokens = n
    creation = usage.get("cache_creation")
    if isinstance(creation, dict) and (n := reported_count(creation.get("ephemeral_1h_input_tokens"))) is not None:
        out.cache_write_1h_tokens = n  # priced as 1-hour writes
    details = usage.get("output_tokens_details")
    if isinstance(details, dict) and (n := reported_count(details.get("thinking_tokens"))) is not None:
        out.reasoning_tokens = n
    if isinstance(usage.get("inference_geo"), str):  # where it ran: "us" costs more (ModelInfo.geo_multipliers)
        out.inference_geo = usage["inference_geo"]
    tools = usage.get("server_tool_use")
    if isinstance(tools, dict):  # {"web_search_requests": 3, "web_fetch_requests": 1}: billed per use
        counts = {k.removesuffix("_requests"): n for k, v in tools.items() if (n := reported_count(v))}
        out.server_tool_use = counts or None
    return out


# The result blocks of the server tools the upstream runs and bills per use, by tool.
SERVER_TOOL_RESULTS = {
    "web_search_tool_result": "web_search",
    "web_fetch_tool_result": "web_fetch",
    "code_execution_tool_result": "code_execution",
    "bash_code_execution_tool_result": "code_execution",
    "text_editor_code_execution_tool_result": "code_execution",
}


def server_tool_ran(block: Any) -> str | None:
    """The server tool a content block shows ran (its result, not an error: a failed use is not billed)."""
    tool = SERVER_TOOL_RESULTS.get(str(block.get("type"))) if isinstance(block, dict) else None
    content = block.get("content") if tool is not None else None
    if isinstance(content, list) or (isinstance(content, dict) and not str(content.get("type", "")).endswith("_error")):
        return tool
    return None


def with_seen_server_tools(usage: TokenUsage, seen: dict[str, int]) -> bool:
    """Before the final report: the server tools seen to run, where more than reported (the upstream bills
    each use as it runs; its count comes with the last ``message_delta``). Whether ``usage`` changed."""
    reported = usage.server_tool_use or {}
    more = {tool: n for tool, n in seen.items() if n > reported.get(tool, 0)}
    if more:
        usage.server_tool_use = {**reported, **more}
    return bool(more)


class UsageScanner:
    """Reads usage, stop reason and errors out of a Messages event stream as it is relayed.

    Only the few events that carry them are parsed; content deltas are kept as received and parsed only
    if the output has to be estimated (the stream ended before its final ``message_delta``).
    """

    __slots__ = (
        "usage",
        "started",
        "final_delta",
        "complete",
        "stop_reason",
        "error_type",
        "_deltas",
        "_pieces",
        "_counted",
        "_running",
        "server_tools_seen",
    )

    def __init__(self) -> None:
        self.usage: TokenUsage | None = None
        self.started = False  # message_start seen: the upstream answered
        self.final_delta = False  # a message_delta with the stop reason: the output count is final
        self.complete = False  # message_stop seen
        self.stop_reason: str | None = None
        self.error_type: str | None = None
        self._deltas: list[str] = []
        self._pieces: list[str] = []  # the text of each delta parsed so far
        self._counted = 0  # the pieces counted into ``_running``
        self._running = 0
        self.server_tools_seen: dict[str, int] = {}  # result blocks of server tools that ran, by tool

    def feed(self, events: Iterable[tuple[str | None, str]]) -> None:
        for name, data in events:
            if name == "content_block_delta":
                self._deltas.append(data)
            elif name == "message_start":
                self.started = True
                usage = json.loads(data)["message"].get("usage")
                if usage:
                    self.usage = update_usage(self.usage, usage)
            elif name == "message_delta":
                event = json.loads(data)
                if event.get("usage"):
                    self.usage = update_usage(self.usage, event["usage"])
                stop_reason = (event.get("delta") or {}).get("stop_reason")
                if stop_reason is not None:
                    self.stop_reason = stop_reason
                    self.final_delta = True
            elif name == "message_stop":
                self.complete = True
            elif name == "content_block_start" and "_tool_result" in data:
                tool = server_tool_ran(json.loads(data).get("content_block"))
                if tool is not None:
                    self.server_tools_seen[tool] = self.server_tools_seen.get(tool, 0) + 1
            elif name == "error":
                error = json.loads(data).get("error") or {}
                self.error_type = str(error.get("type") or "api_error")

    def received_output_tokens(self) -> int:
        """A local count of the output received so far (text, thinking and tool input pieces)."""
        return count_tokens("".join(self._texts()))

    def output_tokens_so_far(self) -> int:
        """``received_output_tokens`` kept up as the stream goes on, for the ledger's notes: only the pieces
        received since the last call are read and counted, so a long stream costs the same per call (the sum
        of counts made piecemeal may run a token or so above one count of the whole)."""
        pieces = self._texts()
        if self._counted < len(pieces):
            self._running += count_tokens("".join(pieces[self._counted :]))
            self._counted = len(pieces)
        return self._running

    def _texts(self) -> list[str]:
        # Each delta parsed once, however often the output is counted.
        for data in self._deltas[len(self._pieces) :]:
            try:
                delta = json.loads(data).get("delta") or {}
            except ValueError:
                delta = {}
            self._pieces.append(delta.get("text") or delta.get("thinking") or delta.get("partial_json") or "")
        return self._pieces


def message_usage(message: Any) -> TokenUsage | None:
    """The usage of a non-streamed Message body (None when it has none)."""
    if isinstance(message, dict) and isinstance(message.get("usage"), dict):
        return update_usage(None, message["usage"])
    return None


def local_input_tokens(body: dict[str, Any]) -> int:
    """A local count of what a Messages request sends as input: system, messages and tools, and images and PDFs
    by what they cost (``attachments.tokens``: images by their size, as Anthropic counts them, PDFs by pages)."""
    parts: list[str] = []
    files = 0
    system = body.get("system")
    if isinstance(system, str):
        parts.append(system)
    elif isinstance(system, list):
        parts.extend(_block_text(b) for b in system)
    for message in body.get("messages") or ():
        if not isinstance(message, dict):
            continue
        content = message.get("content")
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            parts.extend(_block_text(b) for b in content)
            files += sum(_file_tokens(b) for b in content)
    tools = body.get("tools")
    if tools:
        parts.append(compact_json(tools))
    return count_tokens("\n".join(p for p in parts if p)) + files


def _file_tokens(block: Any) -> int:
    """The tokens of the images and PDFs in one content block (a tool result's among them)."""
    if not isinstance(block, dict):
        return 0
    if block.get("type") == "tool_result" and isinstance(block.get("content"), list):
        return sum(_file_tokens(b) for b in block["content"])
    if block.get("type") not in ("image", "document"):
        return 0
    try:
        part = _file(block, str(block["type"]), "")
    except RequestError:  # a source counted by the upstream only (a file id)
        return 0
    return attachments.tokens(part) if isinstance(part, FilePart) else 0  # (a text document: counted as text)


def _block_text(block: Any) -> str:
    """The countable text of one content block (images and documents: their JSON, a rough stand-in)."""
    if not isinstance(block, dict):
        return str(block)
    kind = block.get("type")
    if kind == "text":
        return str(block.get("text") or "")
    if kind == "thinking":
        return str(block.get("thinking") or "")
    if kind == "tool_use":
        return f"{block.get('name', '')} {compact_json(block.get('input') or {})}"
    if kind == "tool_result":
        content = block.get("content")
        if isinstance(content, list):
            return "\n".join(_block_text(b) for b in content)
        return str(content or "")
    if kind in ("image", "document"):
        source = block.get("source") or {}
        if source.get("type") == "text":
            return str(source.get("data") or "")
        return ""  # base64 data would be counted as text, far off what the model bills
    return compact_json(block)


# --- translation, for models that are not Anthropic's -----------------------------------------------


# What runs only on Anthropic's servers: refused for other models rather than dropped. (metadata,
# service_tier and context_management, which Claude Code sends, change nothing another model answers.)
REFUSED_FIELDS = ("mcp_servers", "container")
# output_config.effort -> a thinking budget (openai_chat.REASONING_BUDGETS for the same names).
EFFORT_BUDGETS = {"low": 2048, "medium": 8000, "high": 16000, "xhigh": 24000, "max": 32000}
# output_config.effort without thinking -> the reasoning_effort litellm takes for every provider (the most it
# names is "high").
REASONING_EFFORTS = {"low": "low", "medium": "medium", "high": "high", "xhigh": "high", "max": "high"}


class RequestError(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


async def _never_called(arguments: dict[str, Any]) -> Any:
    raise RuntimeError("client tools are run by the client")  # /v1 endpoints never run tools


def parse_request(body: dict[str, Any]) -> tuple[str, list[ChatMessage], list[Tool], int, int | None, dict[str, Any]]:
    """(system, messages, tools, max_tokens, thinking budget, sampling parameters) of a Messages request, for a
    model that is not Anthropic's. Content other providers cannot take here (images, documents) is refused,
    not dropped."""
    max_tokens = body.get("max_tokens")
    if not isinstance(max_tokens, int) or max_tokens < 1:
        raise RequestError("max_tokens: Field required (a positive integer)")
    raw_messages = body.get("messages")
    if not isinstance(raw_messages, list) or not raw_messages:
        raise RequestError("messages: Field required (a non-empty list)")
    system = _system(body.get("system") or "")
    messages, extra_system = _messages(raw_messages)
    if extra_system:
        system = "\n\n".join(s for s in (system, *extra_system) if s)
    if not messages:
        raise RequestError("messages: at least one user message is required")
    tools = _tools(body.get("tools") or ())
    for name in REFUSED_FIELDS:
        if body.get(name):
            raise RequestError(f"{name}: not supported with this model (only Anthropic models run it)")
    thinking = body.get("thinking") or {}
    budget = None
    output_config = body.get("output_config")
    effort = output_config.get("effort") if isinstance(output_config, dict) else None
    if effort is not None and effort not in EFFORT_BUDGETS:
        raise RequestError(f"output_config.effort: must be one of {', '.join(EFFORT_BUDGETS)}")
    params = _params(body, bool(tools))
    if isinstance(thinking, dict) and thinking.get("type") in ("enabled", "adaptive"):
        # Adaptive thinking's effort (Claude Code sends it) as the budget it stands for: a provider whose
        # API takes an effort instead gets the nearest one.
        budget = int(thinking.get("budget_tokens") or EFFORT_BUDGETS.get(str(effort), 8000))
    elif effort is not None:
        # Without thinking, the effort is the model's reasoning effort: a model without one refuses it, named
        # as sent (the provider's check, ``v1_anthropic.MESSAGES_NAMES``), rather than it being dropped.
        params["reasoning_effort"] = REASONING_EFFORTS[effort]
    return system, messages, tools, max_tokens, budget, params


def _system(system: Any) -> str:
    """The ``system`` field: a string, or the text of its text blocks."""
    if isinstance(system, list):
        return "\n\n".join(str(b.get("text") or "") for b in system if isinstance(b, dict) and b.get("type") == "text")
    if not isinstance(system, str):
        raise RequestError("system: must be a string or a list of text blocks")
    return system


def _messages(raw_messages: list[Any]) -> tuple[list[ChatMessage], list[str]]:
    """The conversation, and the texts of the system messages in it."""
    names: dict[str, str] = {}
    messages: list[ChatMessage] = []
    extra_system: list[str] = []
    for i, m in enumerate(raw_messages):
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant", "system"):
            raise RequestError(f"messages.{i}.role: must be 'user', 'assistant' or 'system'")
        content = m.get("content")
        blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(blocks, list):
            raise RequestError(f"messages.{i}.content: must be a string or a list of content blocks")
        if m["role"] == "system":
            # A system message in the conversation (Claude Code's mid-conversation system messages): its text
            # joins the system prompt, the one place every provider takes instructions.
            extra_system.extend(
                str(b.get("text") or "") for b in blocks if isinstance(b, dict) and b.get("type") == "text"
            )
            continue
        parts = _message_parts(blocks, names, f"messages.{i}.content")
        if messages and messages[-1].role == m["role"]:  # around a system message, turns of one role meet
            messages[-1].parts.extend(parts)
        else:
            messages.append(ChatMessage(m["role"], parts))
    return messages, extra_system


def _message_parts(blocks: list[Any], names: dict[str, str], where: str) -> list[Part]:
    parts: list[Part] = []
    for j, b in enumerate(blocks):
        part = _part(b, names, f"{where}.{j}")
        if part is not None:
            parts.append(part)
        if isinstance(part, ToolResultPart) and isinstance(b.get("content"), list):
            # Images and documents in a tool result (a screenshot): after it, where every API takes them.
            parts.extend(
                _file(c, str(c.get("type")), f"{where}.{j}.content.{k}")
                for k, c in enumerate(b["content"])
                if isinstance(c, dict) and c.get("type") in ("image", "document")
            )
    return parts


def _tools(raw_tools: Any) -> list[Tool]:
    tools = []
    for i, t in enumerate(raw_tools):
        if not isinstance(t, dict) or not isinstance(t.get("name"), str) or "input_schema" not in t:
            raise RequestError(
                f"tools.{i}: only client tools ({{name, description, input_schema}}) work with this model"
            )
        strict = t.get("strict")
        if strict is not None and not isinstance(strict, bool):
            raise RequestError(f"tools.{i}.strict: Input should be a valid boolean")
        if strict:
            strict = strict_for_openai(t["input_schema"])
        tools.append(Tool(t["name"], str(t.get("description") or ""), t["input_schema"], _never_called, strict))
    return tools


def strict_for_openai(schema: Any) -> bool:
    """Whether OpenAI's strict mode takes a schema Claude takes strictly: it wants every property of every
    object required (Claude lets one be optional); a schema that is not goes without ``strict``, for the model
    to follow unenforced rather than an upstream 400."""
    if isinstance(schema, list):
        return all(strict_for_openai(s) for s in schema)
    if not isinstance(schema, dict):
        return True
    properties: dict[str, Any] = schema["properties"] if isinstance(schema.get("properties"), dict) else {}
    if schema.get("type") == "object" and set(properties) - set(schema.get("required") or ()):
        return False
    defs: dict[str, Any] = schema["$defs"] if isinstance(schema.get("$defs"), dict) else {}
    nested = [*properties.values(), *defs.values(), *(schema[k] for k in ("items", "anyOf", "allOf") if k in schema)]
    return strict_for_openai(nested)


def _params(body: dict[str, Any], has_tools: bool) -> dict[str, Any]:
    """Sampling parameters, tool choice and structured output, in the OpenAI shape providers take."""
    try:
        params = sampling_params(
            body.get("temperature"), body.get("top_p"), body.get("stop_sequences"), "stop_sequences"
        )
    except ParamError as e:
        raise RequestError(f"{e.param}: {e.message}") from None
    if body.get("top_k") is not None:  # passed on to providers that take it, a 400 naming it elsewhere
        params["top_k"] = body["top_k"]
    params.update(_tool_choice(body.get("tool_choice"), has_tools))
    output_format = (
        (body.get("output_config") or {}).get("format") if isinstance(body.get("output_config"), dict) else None
    )
    # (``output_format`` at the top: the structured-outputs beta's place for it, which older SDKs still send)
    output_format = output_format or body.get("output_format")
    if isinstance(output_format, dict) and output_format.get("type") == "json_schema":
        schema = output_format.get("schema") or {}
        schema = {"name": "output", "schema": schema, "strict": strict_for_openai(schema)}
        params["response_format"] = {"type": "json_schema", "json_schema": schema}
    return params


def _tool_choice(choice: Any, has_tools: bool) -> dict[str, Any]:
    """Anthropic's ``tool_choice`` (with ``disable_parallel_tool_use``) in the OpenAI shape providers take."""
    if not isinstance(choice, dict) or not has_tools:
        return {}
    kind = choice.get("type")
    params: dict[str, Any] = {}
    if kind in ("auto", "none"):
        params["tool_choice"] = kind
    elif kind == "any":
        params["tool_choice"] = "required"
    elif kind == "tool" and isinstance(choice.get("name"), str):
        params["tool_choice"] = {"type": "function", "function": {"name": choice["name"]}}
    else:
        raise RequestError(f"tool_choice.type: unsupported tool_choice {kind!r}")
    if choice.get("disable_parallel_tool_use") and kind != "none":
        params["parallel_tool_calls"] = False
    return params


def _part(block: Any, names: dict[str, str], where: str) -> Part | None:
    if not isinstance(block, dict):
        raise RequestError(f"{where}: must be a content block object")
    kind = block.get("type")
    if kind == "text":
        return TextPart(str(block.get("text") or ""))
    if kind == "tool_use":
        names[str(block.get("id"))] = str(block.get("name") or "")
        return ToolCallPart(str(block.get("id")), str(block.get("name") or ""), block.get("input") or {})
    if kind == "tool_result":
        content = block.get("content")
        if isinstance(content, list):  # its text blocks, one per line (glued, two results would read as one)
            content = "\n".join(
                str(b.get("text") or "") for b in content if isinstance(b, dict) and b.get("type") == "text"
            )
        call_id = str(block.get("tool_use_id"))
        is_error = block.get("is_error")
        if is_error is not None and not isinstance(is_error, bool):  # "false" is no false: it would mark a failure
            raise RequestError(f"{where}.is_error: must be a boolean")
        return ToolResultPart(call_id, names.get(call_id, ""), content or "", bool(is_error))
    if kind in ("thinking", "redacted_thinking"):
        return None  # another provider's signed thinking means nothing to this one
    if kind in ("image", "document"):
        return _file(block, kind, where)
    raise RequestError(f"{where}.type: {kind!r} blocks are only supported with Anthropic models here")


def _file(block: dict[str, Any], kind: str, where: str) -> Part:
    """An image or document block: base64 or URL sources (a plain-text document is its text)."""
    raw = block.get("source")
    source: dict[str, Any] = raw if isinstance(raw, dict) else {}
    title = block.get("title") if isinstance(block.get("title"), str) else None
    default_type = "image/png" if kind == "image" else "application/pdf"
    if source.get("type") == "base64" and isinstance(source.get("data"), str):
        return FilePart(str(source.get("media_type") or default_type), data=source["data"], filename=title)
    if source.get("type") == "url" and isinstance(source.get("url"), str):
        return FilePart(default_type, url=source["url"], filename=title)
    if kind == "document" and source.get("type") == "text":  # its title, when it has one, above its text
        text = str(source.get("data") or "")
        return TextPart(f"{title}\n\n{text}" if title else text)
    raise RequestError(f"{where}.source: base64 and url sources work with this model (not {source.get('type')!r})")


def _sse(name: str, data: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + json_bytes(data) + b"\n\n"


def usage_body(usage: TokenUsage) -> dict[str, int]:
    return {
        "input_tokens": usage.input_tokens,
        "output_tokens": usage.output_tokens,
        "cache_creation_input_tokens": usage.cache_write_tokens,
        "cache_read_input_tokens": usage.cache_read_tokens,
    }


class MessageEncoder:
    """Provider events -> Messages API events: one block open at a time, indices counting up from 0, each
    block started, given its deltas and stopped before the next one starts (what the SDK accumulates)."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.id = new_id("msg_")
        self._open: str | None = None  # the type of the open block
        self._index = -1

    def start(self, input_tokens: int) -> bytes:
        message: dict[str, Any] = {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": input_tokens, "output_tokens": 0},
        }
        return _sse("message_start", {"type": "message_start", "message": message})

    def _close(self, out: list[bytes]) -> None:
        if self._open is not None:
            out.append(_sse("content_block_stop", {"type": "content_block_stop", "index": self._index}))
            self._open = None

    def _begin(self, block: dict[str, Any], out: list[bytes]) -> None:
        self._close(out)
        self._index += 1
        self._open = block["type"]
        out.append(
            _sse("content_block_start", {"type": "content_block_start", "index": self._index, "content_block": block})
        )

    def _delta(self, delta: dict[str, Any], out: list[bytes]) -> None:
        out.append(_sse("content_block_delta", {"type": "content_block_delta", "index": self._index, "delta": delta}))

    def encode(self, event: ProviderEvent, usage: TokenUsage | None = None) -> bytes:
        out: list[bytes] = []
        kind = type(event)
        if kind is TextDelta:
            if self._open != "text":
                self._begin({"type": "text", "text": ""}, out)
            self._delta({"type": "text_delta", "text": event.text}, out)  # type: ignore[union-attr]
        elif kind is ReasoningDelta:
            if self._open != "thinking":
                self._begin({"type": "thinking", "thinking": "", "signature": ""}, out)
            self._delta({"type": "thinking_delta", "thinking": event.text}, out)  # type: ignore[union-attr]
        elif kind is ToolCallEvent:
            self._begin({"type": "tool_use", "id": event.tool_call_id, "name": event.name, "input": {}}, out)  # type: ignore[union-attr]
            self._delta({"type": "input_json_delta", "partial_json": compact_json(event.input)}, out)  # type: ignore[union-attr]
            self._close(out)
        elif kind is ProviderFinish:
            self._close(out)
            delta = {"stop_reason": STOP_REASONS.get(event.finish_reason, "end_turn"), "stop_sequence": None}  # type: ignore[union-attr]
            out.append(
                _sse(
                    "message_delta",
                    {"type": "message_delta", "delta": delta, "usage": usage_body(usage or TokenUsage())},
                )
            )
            out.append(_sse("message_stop", {"type": "message_stop"}))
        return b"".join(out)

    def error(self, status: int, message: str) -> bytes:
        return _sse("error", error_body(status, message))


def whole_message(model: str, finish: ProviderFinish, usage: TokenUsage) -> dict[str, Any]:
    """One whole Message from the finished answer (``stream: false``)."""
    content: list[dict[str, Any]] = []
    for part in finish.message.parts:
        if isinstance(part, TextPart) and part.text:
            content.append({"type": "text", "text": part.text})
        elif isinstance(part, ReasoningPart) and part.text:
            content.append({"type": "thinking", "thinking": part.text, "signature": part.signature or ""})
        elif isinstance(part, ToolCallPart):
            content.append({"type": "tool_use", "id": part.tool_call_id, "name": part.name, "input": part.input})
    return {
        "id": new_id("msg_"),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": STOP_REASONS.get(finish.finish_reason, "end_turn"),
        "stop_sequence": None,
        "usage": usage_body(usage),
    }


def client_status(status: int | None, code: str) -> int:
    """The status an Anthropic client expects for a provider failure (its upstream status where there was one)."""
    if code == "NO_API_KEY":
        return 424  # the gateway's provider key, missing or refused upstream: never the caller's 401
    if status is not None and 400 <= status < 600:
        return status
    return STATUS_OF_CODE.get(code, 502)
