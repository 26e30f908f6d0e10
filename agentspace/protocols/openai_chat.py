"""The OpenAI Chat Completions wire format (``/v1/chat/completions``), translated to and from our types.

- ``parse_request`` turns a request body into the parts of a ``ProviderRequest`` (system text, messages,
  tools), or a ``RequestError`` naming the field that is wrong.
- ``ChunkEncoder`` turns provider events into ``chat.completion.chunk`` objects: the role first, text as
  ``content``, reasoning as ``reasoning_content``, each tool call in one piece carrying its ``index`` and
  ``id``, a finish chunk with OpenAI's finish reason, and the usage chunk (``choices: []``) when asked for.
- ``completion`` folds a whole answer into one ``chat.completion``.
- ``error_body`` is OpenAI's error shape.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from ..events import (
    ProviderEvent,
    ProviderFinish,
    ReasoningDelta,
    TextDelta,
    ToolCallEvent,
)
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
    new_id,
)

# HTTP status -> OpenAI's error type.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "invalid_request_error",
    404: "invalid_request_error",
    413: "invalid_request_error",
    424: "server_error",  # the gateway's own provider key is missing or refused: not the caller's request
    429: "requests",  # OpenAI's type for a rate limit on requests (its code: rate_limit_exceeded); "tokens" for tpm
    500: "server_error",
    502: "server_error",
    503: "server_error",
}

# Our finish reasons -> OpenAI's.
FINISH_REASONS = {
    "stop": "stop",
    "length": "length",
    "tool-calls": "tool_calls",
    "content-filter": "content_filter",
}

# reasoning_effort -> a thinking budget, for providers that take one (Anthropic's minimum is 1024).
REASONING_BUDGETS = {"minimal": 1024, "low": 2048, "medium": 8000, "high": 16000}


def error_body(
    status: int, message: str, *, code: str | None = None, error_type: str | None = None, param: str | None = None
) -> dict[str, Any]:
    if error_type is None and code == "insufficient_quota":
        error_type = code  # a spent budget: OpenAI's type and code for an exhausted quota
    return {
        "error": {
            "message": message,
            "type": error_type
            or ERROR_TYPES.get(status, "invalid_request_error" if 400 <= status < 500 else "server_error"),
            "param": param,
            "code": code,
        }
    }


def client_status(status: int | None, code: str) -> int:
    """The status an OpenAI client expects for a provider failure (its upstream status where there was one)."""
    if code == "NO_API_KEY":
        return 424  # the gateway's provider key, not the caller's: a 401 would blame the caller's key
    if status == 529:
        return 503  # Anthropic's "overloaded": OpenAI clients know 503
    if status is not None and 400 <= status < 600:
        return status
    return {"RATE_LIMITED": 429, "MODEL_NOT_FOUND": 404, "INVALID_MESSAGE": 400}.get(code, 502)


def error_code(status: int, upstream: str | None = None) -> str | None:
    """OpenAI's ``code`` of an error: what the upstream's error was where known, else the status's."""
    if upstream is not None:
        return upstream
    return {401: "invalid_api_key", 404: "model_not_found", 424: "no_api_key", 429: "rate_limit_exceeded"}.get(status)


# --- requests ------------------------------------------------------------------------------------


class RequestError(Exception):
    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param
        self.message = message


@dataclass
class ParsedRequest:
    model: str
    system: str
    messages: list[ChatMessage]
    tools: list[Tool] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    max_tokens: int | None = None
    reasoning_budget: int | None = None
    reasoning_summary: bool = False  # a summary of the reasoning asked for (Responses' reasoning.summary)
    params: dict[str, Any] = field(default_factory=dict)  # sampling parameters passed on (ProviderRequest.params)
    # The prompt cache the client asked for ("5m", "1h"; None: not asked), ``asked_cache_ttl``.
    cache_ttl: str | None = None


async def _never_called(arguments: dict[str, Any]) -> Any:
    raise RuntimeError("client tools are run by the client")  # /v1 endpoints never run tools


# Every request field of the Chat Completions API reference is read, passed on, or refused (400 naming it):
# - read and translated for every provider: below in parse_request;
READ_FIELDS = frozenset(
    {
        "model",
        "messages",
        "stream",
        "stream_options",
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "stop",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "response_format",
        "reasoning_effort",
    }
)
# - passed on to the provider as they are (``ProviderRequest.params``); a provider whose API has no such
#   parameter refuses the call with a 400 naming it;
PASSED_ON_FIELDS = frozenset(
    {"seed", "frequency_penalty", "presence_penalty", "logit_bias", "verbosity", "web_search_options"}
)
#   their defaults ask for nothing (the OpenAI playground's code sends them), so they are left out like absent ones;
NEUTRAL_VALUES: dict[str, Any] = {"frequency_penalty": 0, "presence_penalty": 0, "logit_bias": {}}
# - hints that change no answer: passed on to providers whose API takes them (OpenAI's prompt cache routing,
#   service tier, predicted output, end-user id, its own storing of completions), left out elsewhere;
HINT_FIELDS = frozenset(
    {"store", "user", "safety_identifier", "prompt_cache_key", "prompt_cache_retention", "service_tier", "prediction"}
)
# - accepted and kept by the gateway: metadata (the gateway keeps its own records of every call);
ACCEPTED_FIELDS = frozenset({"metadata", *HINT_FIELDS})
# - refused: what one streamed answer of text and tool calls cannot carry.
REFUSED_FIELDS = {
    "n": "n > 1 is not supported by this gateway: send one request per choice.",
    "logprobs": "logprobs are not supported by this gateway.",
    "top_logprobs": "top_logprobs are not supported by this gateway.",
    "audio": "audio output is not supported by this gateway.",
    "modalities": 'modalities other than ["text"] are not supported by this gateway.',
    "functions": "functions (deprecated) is not supported by this gateway: use tools.",
    "function_call": "function_call (deprecated) is not supported by this gateway: use tool_choice.",
}


def _refused(name: str, value: Any) -> bool:
    """Whether a value of a refused field asks for something (the defaults are accepted)."""
    if value is None or value is False:
        return False
    if name == "n":
        return value != 1
    if name == "top_logprobs":
        return value != 0
    if name == "modalities":
        return value != ["text"]
    return True


def parse_request(body: Any) -> ParsedRequest:
    if not isinstance(body, dict):
        raise RequestError("body", "The request body must be a JSON object.")
    _check_fields(body)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise RequestError("model", "you must provide a model parameter")
    raw_messages = body.get("messages")
    if not isinstance(raw_messages, list) or not raw_messages:
        raise RequestError("messages", "messages must be a non-empty array")
    system, messages = _messages(raw_messages)
    tools = _tools(body.get("tools") or ())
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
    if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
        raise RequestError("max_tokens", "max_tokens must be a positive integer")
    reasoning_budget = _reasoning_budget(body.get("reasoning_effort"))
    include_usage = (body.get("stream_options") or {}).get("include_usage")
    if include_usage is not None and not isinstance(include_usage, bool):  # "false" is no false, as for stream
        raise RequestError("stream_options.include_usage", "stream_options.include_usage must be a boolean")
    return ParsedRequest(
        model=model,
        system="\n\n".join(s for s in system if s),
        messages=messages,
        tools=tools,
        stream=bool(body.get("stream")),
        include_usage=bool(include_usage),
        max_tokens=max_tokens,
        reasoning_budget=reasoning_budget,
        params=_params(body, bool(tools)),
        cache_ttl=asked_cache_ttl(body, raw_messages, body.get("tools")),
    )


def asked_cache_ttl(body: dict[str, Any], items: Any, tools: Any) -> str | None:
    """The prompt-cache TTL an OpenAI-shaped request asks for, None when it asks for none: OpenAI caches on its
    own, and a client says it counts on that with ``prompt_cache_key`` or ``prompt_cache_retention`` (Codex sends
    its conversation's id), or marks blocks with ``cache_control`` as LiteLLM and OpenRouter take it (on messages,
    their content parts and tools). "1h" when a mark asks for an hour or the retention for 24 hours."""
    asked: str | None = None

    def mark(value: Any) -> None:
        nonlocal asked
        if isinstance(value, dict) and value.get("cache_control") is not None and asked != "1h":
            control = value["cache_control"]
            asked = "1h" if isinstance(control, dict) and control.get("ttl") == "1h" else "5m"

    for item in items if isinstance(items, list) else ():
        mark(item)
        content = item.get("content") if isinstance(item, dict) else None
        for part in content if isinstance(content, list) else ():
            mark(part)
    for tool in tools if isinstance(tools, list) else ():
        mark(tool)
        mark(tool.get("function") if isinstance(tool, dict) else None)
    if body.get("prompt_cache_retention") == "24h":
        return "1h"
    if asked is None and (body.get("prompt_cache_key") is not None or body.get("prompt_cache_retention") is not None):
        return "5m"
    return asked


def _reasoning_budget(effort: Any) -> int | None:
    if effort is not None and effort not in (*REASONING_BUDGETS, "none", "xhigh"):
        raise RequestError("reasoning_effort", f"unsupported reasoning_effort {effort!r}")
    return REASONING_BUDGETS.get("high" if effort == "xhigh" else effort) if effort else None


def _check_fields(body: dict[str, Any]) -> None:
    """Refuse the fields this gateway does not support, and the refused ones set to more than their default."""
    for name, value in body.items():
        if name in REFUSED_FIELDS:
            if _refused(name, value):
                raise RequestError(name, REFUSED_FIELDS[name])
        elif name not in READ_FIELDS and name not in PASSED_ON_FIELDS and name not in ACCEPTED_FIELDS:
            raise RequestError(name, f"{name} is not a Chat Completions parameter this gateway supports.")


def _messages(raw_messages: list[Any]) -> tuple[list[str], list[ChatMessage]]:
    """The system texts and the conversation of ``messages``."""
    system: list[str] = []
    messages: list[ChatMessage] = []
    names: dict[str, str] = {}  # tool call id -> tool name, for the tool results
    for i, m in enumerate(raw_messages):
        if not isinstance(m, dict):
            raise RequestError(f"messages[{i}]", "each message must be an object")
        role = m.get("role")
        if role in ("system", "developer"):
            system.append(_text(m.get("content"), f"messages[{i}].content"))
        elif role == "user":
            _append(messages, "user", user_parts(m.get("content"), f"messages[{i}].content"))
        elif role == "assistant":
            _append(messages, "assistant", _assistant_parts(m, i, names))
        elif role == "tool":
            call_id = m.get("tool_call_id")
            if not isinstance(call_id, str):
                raise RequestError(f"messages[{i}].tool_call_id", "a tool message needs tool_call_id")
            output = _text(m.get("content"), f"messages[{i}].content")
            _append(messages, "user", [ToolResultPart(call_id, names.get(call_id, ""), output)])
        else:
            raise RequestError(f"messages[{i}].role", f"unsupported role {role!r}")
    return system, messages


def _assistant_parts(m: dict[str, Any], i: int, names: dict[str, str]) -> list[Part]:
    """An assistant message's text and tool calls (whose names go into ``names``)."""
    parts: list[Part] = []
    text = _text(m.get("content"), f"messages[{i}].content") if m.get("content") is not None else ""
    if text:
        parts.append(TextPart(text))
    calls = m.get("tool_calls") or []
    if not isinstance(calls, list):
        raise RequestError(f"messages[{i}].tool_calls", "tool_calls must be an array of tool calls")
    for j, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(call.get("id"), str):
            raise RequestError(f"messages[{i}].tool_calls[{j}]", "a tool call needs an id and a function")
        names[call["id"]] = str(fn.get("name") or "")
        parts.append(ToolCallPart(call["id"], names[call["id"]], _arguments(fn.get("arguments"))))
    return parts


def _tools(raw_tools: Any) -> list[Tool]:
    tools = []
    for i, t in enumerate(raw_tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise RequestError(f"tools[{i}]", "tools must be {type: function, function: {name, parameters}}")
        tools.append(client_tool(fn["name"], fn, f"tools[{i}].function"))
    return tools


def client_tool(name: str, definition: dict[str, Any], param: str = "tools") -> Tool:
    """A function tool the client defined (``description``, ``parameters``) and runs itself: sent to the model,
    never called by the gateway."""
    parameters = definition.get("parameters") or {"type": "object", "properties": {}}
    strict = definition.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise RequestError(f"{param}.strict", "strict must be a boolean")
    return Tool(name, str(definition.get("description") or ""), parameters, _never_called, strict)


def _params(body: dict[str, Any], has_tools: bool) -> dict[str, Any]:
    """The parameters that go to the provider: sampling, tool choice, response format and the passed-on ones."""
    stop = body.get("stop")
    params = sampling_params(
        body.get("temperature"), body.get("top_p"), [stop] if isinstance(stop, str) else stop, "stop"
    )
    if body.get("tool_choice") not in (None, "none") and not has_tools:  # as OpenAI answers it
        raise RequestError(
            "tool_choice", "Invalid value for 'tool_choice': 'tool_choice' is only allowed when 'tools' are specified."
        )
    params.update(tool_params(body.get("tool_choice"), body.get("parallel_tool_calls"), has_tools))
    if body.get("response_format") is not None:
        response_format = check_response_format(body["response_format"], "response_format")
        if response_format is not None:
            params["response_format"] = response_format
    params.update(
        {
            name: body[name]
            for name in PASSED_ON_FIELDS | HINT_FIELDS
            if body.get(name) is not None and not _neutral(name, body[name])
        }
    )
    if body.get("reasoning_effort") is not None:  # also a thinking budget (ParsedRequest.reasoning_budget)
        params["reasoning_effort"] = body["reasoning_effort"]
    return params


def _neutral(name: str, value: Any) -> bool:
    """Whether ``value`` is the field's default, which asks for nothing (``0``, not ``False``, for a penalty)."""
    return name in NEUTRAL_VALUES and not isinstance(value, bool) and value == NEUTRAL_VALUES[name]


def tool_params(tool_choice: Any, parallel: Any, has_tools: bool) -> dict[str, Any]:
    """``tool_choice`` (auto, none, required, or a named function) and ``parallel_tool_calls``, checked."""
    params: dict[str, Any] = {}
    if tool_choice is not None:
        function = tool_choice.get("function") if isinstance(tool_choice, dict) else None
        named = (
            isinstance(function, dict)
            and tool_choice.get("type") == "function"
            and isinstance(function.get("name"), str)
        )
        if tool_choice not in ("auto", "none", "required") and not named:
            raise RequestError(
                "tool_choice", "tool_choice must be auto, none, required or {type: function, function: {name}}"
            )
        if has_tools:
            params["tool_choice"] = tool_choice
    if parallel is not None:
        if not isinstance(parallel, bool):
            raise RequestError("parallel_tool_calls", "parallel_tool_calls must be a boolean")
        if has_tools:  # OpenAI refuses parallel_tool_calls without tools
            params["parallel_tool_calls"] = parallel
    return params


def check_response_format(raw: Any, param: str) -> dict[str, Any] | None:
    """A ``response_format`` checked (None for plain text): ``json_object``, or ``json_schema`` with its
    ``name``, ``schema`` and ``strict``."""
    if not isinstance(raw, dict):
        raise RequestError(param, "response_format must be an object")
    kind = raw.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        spec = raw.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise RequestError(f"{param}.json_schema", "a json_schema response_format needs json_schema.name")
        if spec.get("schema") is not None and not isinstance(spec["schema"], dict):
            raise RequestError(f"{param}.json_schema.schema", "the schema must be an object")
        return {"type": "json_schema", "json_schema": spec}
    raise RequestError(f"{param}.type", f"unsupported response_format type {kind!r}")


def sampling_params(temperature: Any, top_p: Any, stop: Any, stop_name: str) -> dict[str, Any]:
    """The sampling parameters a client set, checked (ProviderRequest.params); others are not passed on."""
    params: dict[str, Any] = {}
    for name, value in (("temperature", temperature), ("top_p", top_p)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RequestError(name, f"{name} must be a number")
        params[name] = value
    if stop is not None:
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise RequestError(stop_name, f"{stop_name} must be a string or a list of strings")
        if stop:
            params["stop"] = stop
    return params


def _append(messages: list[ChatMessage], role: str, parts: list[Part]) -> None:
    if messages and messages[-1].role == role:
        messages[-1].parts.extend(parts)
    else:
        messages.append(ChatMessage(role, parts))  # type: ignore[arg-type]


def _text(content: Any, param: str) -> str:
    """A message's content as text: a string, or text parts. Other parts (images, audio) are refused
    rather than silently dropped."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        texts = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text":
                texts.append(str(part.get("text") or ""))
            elif isinstance(part, dict) and part.get("type") == "refusal":  # an earlier answer the model refused
                texts.append(str(part.get("refusal") or ""))
            else:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise RequestError(
                    param, f"content parts of type {kind!r} are not supported by this gateway yet; send text"
                )
        return "".join(texts)
    raise RequestError(param, "content must be a string or an array of content parts")


def user_parts(content: Any, param: str) -> list[Part]:
    """A user message's content as parts: text, images (``image_url``: a URL or a data URL) and documents
    (``file`` with ``file_data``); audio and uploaded file ids are refused by name."""
    if not isinstance(content, list):
        return [TextPart(_text(content, param))]
    parts: list[Part] = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            parts.append(TextPart(str(part.get("text") or "")))
        elif kind == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            parts.append(file_part(url, None, f"{param}[{j}].image_url.url", "image/png"))
        elif kind == "file":
            file = part.get("file") if isinstance(part.get("file"), dict) else {}
            if not file.get("file_data"):
                raise RequestError(
                    f"{param}[{j}].file", "send files as file_data (a data URL): this gateway has no file storage"
                )
            parts.append(file_part(file["file_data"], file.get("filename"), f"{param}[{j}].file.file_data"))
        else:
            raise RequestError(
                f"{param}[{j}].type", f"content parts of type {kind!r} are not supported by this gateway"
            )
    return parts


def file_part(url: Any, filename: Any, param: str, url_media_type: str = "application/pdf") -> FilePart:
    """A file from a ``data:`` URL (its media type and base64 data) or an http(s) URL."""
    if not isinstance(url, str) or not url:
        raise RequestError(param, "a URL or a data URL is required")
    name = filename if isinstance(filename, str) else None
    if url.startswith("data:"):
        head, sep, data = url[5:].partition(",")
        media_type, _, encoding = head.partition(";")
        if not sep or encoding != "base64" or not media_type:
            raise RequestError(param, "a data URL must be data:<media type>;base64,<data>")
        return FilePart(media_type, data=data, filename=name)
    if url.startswith(("https://", "http://")):
        return FilePart(url_media_type, url=url, filename=name)
    raise RequestError(param, "a file must be an http(s) URL or a data URL")


def _arguments(raw: Any) -> Any:
    if isinstance(raw, dict):
        return raw
    if not raw:
        return {}
    try:
        return json.loads(raw)
    except (TypeError, ValueError):
        return {"_raw": raw}


# --- responses -----------------------------------------------------------------------------------


def usage_body(usage: TokenUsage) -> dict[str, Any]:
    prompt = usage.input_tokens + usage.cache_read_tokens + usage.cache_write_tokens
    return {
        "prompt_tokens": prompt,
        "completion_tokens": usage.output_tokens,
        "total_tokens": prompt + usage.output_tokens,
        "prompt_tokens_details": {
            "cached_tokens": usage.cache_read_tokens,
            "cache_write_tokens": usage.cache_write_tokens,
        },
        "completion_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
    }


def finish_reason(ours: str) -> str:
    return FINISH_REASONS.get(ours, "stop")


class ChunkEncoder:
    """Provider events -> ``chat.completion.chunk`` objects of one streamed answer."""

    def __init__(self, model: str, include_usage: bool) -> None:
        self.head = {
            "id": new_id("chatcmpl-"),
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": model,
        }
        self.include_usage = include_usage
        self._tool_index = 0

    def _chunk(self, delta: dict[str, Any], reason: str | None = None) -> dict[str, Any]:
        return {**self.head, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}]}

    def start(self) -> dict[str, Any]:
        return self._chunk({"role": "assistant", "content": ""})

    def encode(self, event: ProviderEvent, usage: TokenUsage | None = None) -> list[dict[str, Any]]:
        if isinstance(event, TextDelta):
            return [self._chunk({"content": event.text})]
        if isinstance(event, ReasoningDelta):
            return [self._chunk({"reasoning_content": event.text})]
        if isinstance(event, ToolCallEvent):
            arguments = json.dumps(event.input, ensure_ascii=False)
            call = {"index": self._tool_index, "id": event.tool_call_id, "type": "function",
                    "function": {"name": event.name, "arguments": arguments}}  # fmt: skip
            self._tool_index += 1
            return [self._chunk({"tool_calls": [call]})]
        if isinstance(event, ProviderFinish):
            out = [self._chunk({}, finish_reason(event.finish_reason))]
            if self.include_usage and usage is not None:
                out.append({**self.head, "choices": [], "usage": usage_body(usage)})
            return out
        return []  # sources: Chat Completions has no streamed place for them; ResponseStarted shows nothing


def completion(model: str, finish: ProviderFinish, usage: TokenUsage) -> dict[str, Any]:
    """One whole ``chat.completion`` from the finished answer."""
    text = "".join(p.text for p in finish.message.parts if isinstance(p, TextPart))
    reasoning = "".join(p.text for p in finish.message.parts if isinstance(p, ReasoningPart))
    message: dict[str, Any] = {"role": "assistant", "content": text or None}
    if reasoning:
        message["reasoning_content"] = reasoning
    calls = [p for p in finish.message.parts if isinstance(p, ToolCallPart)]
    if calls:
        message["tool_calls"] = [
            {
                "id": c.tool_call_id,
                "type": "function",
                "function": {"name": c.name, "arguments": json.dumps(c.input, ensure_ascii=False)},
            }
            for c in calls
        ]
    return {
        "id": new_id("chatcmpl-"),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason(finish.finish_reason)}
        ],
        "usage": usage_body(usage),
    }
