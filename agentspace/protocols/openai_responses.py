"""The OpenAI Responses API wire format (``/v1/responses``), translated to and from our types.

- ``parse_request`` turns a request body into an ``openai_chat.ParsedRequest`` (the same parts a
  ``ProviderRequest`` is made of), or a ``RequestError`` naming the field that is wrong or not served.
- ``EventEncoder`` turns provider events into the Responses stream events, in the order the official SDKs'
  accumulators and Codex read them: ``response.created``, ``response.in_progress``, per output item
  ``output_item.added`` ... ``output_item.done`` (text as ``content_part`` + ``output_text`` deltas, reasoning as
  a summary part + ``reasoning_summary_text`` deltas, function calls with their ``function_call_arguments``),
  then ``response.completed`` (``response.incomplete`` when the token limit cut the answer) with ``usage``.
- ``response_object`` folds a whole answer into one ``response`` object.

Every call is stateless: nothing is stored, so ``previous_response_id`` and the other server-side state
(``conversation``, ``item_reference``, ``background``) are refused with a 400 naming the field. Reasoning the
model signed (Anthropic's thinking) goes out as ``encrypted_content`` when the client asks for it with
``include: ["reasoning.encrypted_content"]``, and comes back with the reasoning item on the next turn.
"""

from __future__ import annotations

import json
import time
from typing import Any

from ..events import ProviderEvent, ProviderFinish, ReasoningDelta, TextDelta, ToolCallEvent
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
from .openai_chat import (
    REASONING_BUDGETS,
    ParsedRequest,
    RequestError,
    asked_cache_ttl,
    client_tool,
    error_code,
    file_part,
    sampling_params,
    tool_params,
)

ENCRYPTED_REASONING = "reasoning.encrypted_content"
# How a redacted thinking block's data travels as encrypted_content (a signature is base64: it has no colon).
REDACTED = "redacted_thinking:"
LOGPROBS = "message.output_text.logprobs"  # refused like top_logprobs; the other includes concern hosted tools

# Fields that ask for state kept between calls: the gateway keeps none.
STATEFUL_FIELDS = {
    "previous_response_id": "previous_response_id is not supported: this gateway stores no responses. "
    "Send the whole conversation in `input` (with store: false, as Codex does).",
    "conversation": "conversation is not supported: this gateway stores no conversations; send the whole `input`.",
    "prompt": "prompt (stored prompt templates) is not supported by this gateway; send `instructions` and `input`.",
}
# What a client that keeps ``store`` on sends for an earlier answer's items (the AI SDK's ``openai(model)`` does
# unless told otherwise): it must send the items themselves.
ITEM_REFERENCE = (
    "item_reference is not supported: this gateway stores no responses, so item {id!r} cannot be looked up. "
    "Send the items themselves with store: false (the AI SDK: providerOptions: {{ openai: {{ store: false }} }})."
)

# Fields that are accepted and need nothing from the model: the gateway stores nothing (store), every call
# is metered by the gateway itself (metadata, client_metadata), the hints prompt_cache_key(_retention), service_tier,
# user and safety_identifier go to providers whose API takes them, and ``include`` asks only for what is
# listed above.
HINT_FIELDS = ("prompt_cache_key", "prompt_cache_retention", "service_tier", "user", "safety_identifier")
ACCEPTED_FIELDS = frozenset(
    {
        "model",
        "input",
        "instructions",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "max_output_tokens",
        "reasoning",
        "text",
        "include",
        "prompt_cache_key",
        "prompt_cache_retention",
        "store",
        "stream",
        "stream_options",
        "metadata",
        "user",
        "safety_identifier",
        "service_tier",
        "temperature",
        "top_p",
        "truncation",
        "background",
        "max_tool_calls",
        "top_logprobs",
        "client_metadata",
        *STATEFUL_FIELDS,
    }
)


# --- requests ------------------------------------------------------------------------------------


def parse_request(body: Any) -> tuple[ParsedRequest, bool]:
    """The request, and whether the client asked for reasoning's ``encrypted_content``."""
    if not isinstance(body, dict):
        raise RequestError("body", "The request body must be a JSON object.")
    _check_fields(body)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise RequestError("model", "you must provide a model parameter")
    include = body.get("include") or []
    if not isinstance(include, list) or not all(isinstance(item, str) for item in include):
        raise RequestError("include", "include must be an array of strings")
    if LOGPROBS in include:
        raise RequestError("include", f"{LOGPROBS} is not supported on /v1/responses by this gateway.")

    system: list[str] = []
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise RequestError("instructions", "instructions must be a string")
        system.append(instructions)
    messages = _input_messages(body.get("input"), system)
    if not messages:
        raise RequestError("input", "input must hold at least one user message or function call output")

    tools = _tools(body.get("tools"))
    params = _params(body, bool(tools))
    max_tokens = body.get("max_output_tokens")
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1):
        raise RequestError("max_output_tokens", "max_output_tokens must be a positive integer")
    parsed = ParsedRequest(
        model=model,
        system="\n\n".join(s for s in system if s),
        messages=messages,
        tools=tools,
        stream=bool(body.get("stream")),
        include_usage=True,
        max_tokens=max_tokens,
        reasoning_budget=_reasoning_budget(body.get("reasoning") or {}),
        reasoning_summary=(body.get("reasoning") or {}).get("summary") in ("auto", "concise", "detailed"),
        params=params,
        cache_ttl=asked_cache_ttl(body, body.get("input"), body.get("tools")),
    )
    return parsed, ENCRYPTED_REASONING in include


def _check_fields(body: dict[str, Any]) -> None:
    """Refuse the fields this gateway does not support, and the stateful ones (it stores no responses)."""
    for name in body:
        if name not in ACCEPTED_FIELDS:
            raise RequestError(name, f"{name} is not supported by this gateway.")
    for name, message in STATEFUL_FIELDS.items():
        if body.get(name):
            raise RequestError(name, message)
    if body.get("background"):
        raise RequestError("background", "background responses are not supported: this gateway stores no responses.")
    if body.get("top_logprobs"):
        raise RequestError("top_logprobs", "top_logprobs is not supported on /v1/responses by this gateway.")
    if body.get("truncation") not in (None, "disabled"):
        raise RequestError("truncation", "only truncation: disabled is supported; the gateway never drops input.")


def _params(body: dict[str, Any], has_tools: bool) -> dict[str, Any]:
    """The parameters that go to the provider: sampling, hints, tool choice and the text format."""
    params = sampling_params(body.get("temperature"), body.get("top_p"), None, "stop")
    params.update({name: body[name] for name in HINT_FIELDS if body.get(name) is not None})
    tool_choice = body.get("tool_choice")
    if not body.get("tools"):  # OpenAI refuses a choice that names a tool when there is none ("auto" it takes)
        if tool_choice == "required":
            raise RequestError("tool_choice", "Tool choice 'required' must be specified with 'tools' parameter.")
        if isinstance(tool_choice, dict) and isinstance(tool_choice.get("name"), str):
            raise RequestError("tool_choice", f"Tool choice '{tool_choice['name']}' not found in 'tools' parameter.")
    params.update(
        tool_params(
            _tool_choice(tool_choice) if tool_choice is not None else None, body.get("parallel_tool_calls"), has_tools
        )
    )
    reasoning = body.get("reasoning")
    if isinstance(reasoning, dict) and reasoning.get("effort") is not None:  # also a thinking budget
        params["reasoning_effort"] = reasoning["effort"]
    text = body.get("text")
    if text is not None:
        if not isinstance(text, dict):
            raise RequestError("text", "text must be an object")
        response_format = _text_format(text.get("format"))
        if response_format is not None:
            params["response_format"] = response_format
        if text.get("verbosity") is not None:  # passed on like Chat Completions' verbosity (or refused)
            params["verbosity"] = text["verbosity"]
    return params


def _reasoning_budget(reasoning: Any) -> int | None:
    if not isinstance(reasoning, dict):
        raise RequestError("reasoning", "reasoning must be an object")
    effort = reasoning.get("effort")
    if effort is not None and effort not in (*REASONING_BUDGETS, "none", "xhigh"):
        raise RequestError("reasoning.effort", f"unsupported reasoning effort {effort!r}")
    return REASONING_BUDGETS.get("high" if effort == "xhigh" else effort) if isinstance(effort, str) else None


def _input_messages(raw: Any, system: list[str]) -> list[ChatMessage]:
    if isinstance(raw, str):
        return [ChatMessage.user(raw)]
    if not isinstance(raw, list):
        raise RequestError("input", "input must be a string or an array of input items")
    messages: list[ChatMessage] = []
    names: dict[str, str] = {}  # call id -> function name, for the outputs
    for i, item in enumerate(raw):
        param = f"input[{i}]"
        if not isinstance(item, dict):
            raise RequestError(param, "each input item must be an object")
        kind = item.get("type") or ("message" if "role" in item else None)
        if kind == "message":
            _input_message(item, param, messages, system)
        elif kind == "function_call":
            call_id, name = item.get("call_id"), item.get("name")
            if not isinstance(call_id, str) or not isinstance(name, str):
                raise RequestError(param, "a function_call item needs call_id and name")
            names[call_id] = name
            _append(messages, "assistant", [ToolCallPart(call_id, name, _arguments(item.get("arguments")))])
        elif kind == "function_call_output":
            call_id = item.get("call_id")
            if not isinstance(call_id, str):
                raise RequestError(f"{param}.call_id", "a function_call_output item needs call_id")
            _append_output(messages, ToolResultPart(call_id, names.get(call_id, ""), ""), item.get("output"), param)
        elif kind == "reasoning":
            _input_reasoning(item, messages)
        elif kind == "item_reference":
            raise RequestError(f"{param}.type", ITEM_REFERENCE.format(id=item.get("id")))
        else:
            raise RequestError(
                f"{param}.type",
                f"input items of type {kind!r} are not supported by this gateway "
                "(it takes message, function_call, function_call_output and reasoning items)",
            )
    return messages


def _input_message(item: dict[str, Any], param: str, messages: list[ChatMessage], system: list[str]) -> None:
    role = item.get("role")
    if role in ("system", "developer"):
        system.append(_text(item.get("content"), f"{param}.content"))
    elif role == "user":
        _append(messages, "user", _user_parts(item.get("content"), f"{param}.content"))
    elif role == "assistant":
        text = _text(item.get("content"), f"{param}.content")
        if text:
            _append(messages, role, [TextPart(text)])
    else:
        raise RequestError(f"{param}.role", f"unsupported role {role!r}")


def _input_reasoning(item: dict[str, Any], messages: list[ChatMessage]) -> None:
    # Only signed reasoning goes back to the model (Anthropic checks it); a summary alone is the
    # model's own note to the client, which no provider takes back.
    signature = item.get("encrypted_content")
    if isinstance(signature, str) and signature:
        summary = "".join(str(s.get("text") or "") for s in item.get("summary") or () if isinstance(s, dict))
        content = "".join(str(c.get("text") or "") for c in item.get("content") or () if isinstance(c, dict))
        if signature.startswith(REDACTED):
            part = ReasoningPart("", redacted_data=signature.removeprefix(REDACTED))
        else:
            part = ReasoningPart(content or summary, signature=signature)
        last = messages[-1] if messages else None
        if last is not None and last.role == "assistant":
            # A turn's reasoning goes before its text and calls (Anthropic checks the order), wherever
            # the client put the item (Codex: where its output_item.done came, at the answer's end).
            at = sum(1 for p in last.parts if isinstance(p, ReasoningPart))
            last.parts.insert(at, part)
        else:
            _append(messages, "assistant", [part])


def _append(messages: list[ChatMessage], role: str, parts: list[Part]) -> None:
    if messages and messages[-1].role == role:
        messages[-1].parts.extend(parts)
    else:
        messages.append(ChatMessage(role, parts))  # type: ignore[arg-type]


def _append_output(messages: list[ChatMessage], result: ToolResultPart, output: Any, param: str) -> None:
    """A function's output: its text is the call's result, and the images and files it returned (Codex's
    view_image returns the image it read) follow the results in the same user turn, as a user's content (Chat
    Completions' tool results are text only; Anthropic takes the results first)."""
    files: list[Part] = []
    if isinstance(output, list):
        parts = _user_parts(output, f"{param}.output")
        result.output = "".join(p.text for p in parts if isinstance(p, TextPart))
        files = [p for p in parts if isinstance(p, FilePart)]
    else:
        result.output = output if isinstance(output, str) else _text(output, f"{param}.output")
    last = messages[-1] if messages else None
    if last is None or last.role != "user":
        messages.append(ChatMessage("user", [result, *files]))
        return
    at = next((i for i, p in enumerate(last.parts) if not isinstance(p, ToolResultPart)), len(last.parts))
    last.parts.insert(at, result)
    last.parts.extend(files)


def _user_parts(content: Any, param: str) -> list[Part]:
    """A user message's content: text, images (``input_image``) and documents (``input_file``), each as a URL
    or a data URL; uploaded file ids are refused (the gateway has no file storage)."""
    if not isinstance(content, list):
        return [TextPart(_text(content, param))]
    parts: list[Part] = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        where = f"{param}[{j}]"
        if kind == "input_image" and part.get("image_url"):
            parts.append(file_part(part["image_url"], None, f"{where}.image_url", "image/png"))
        elif kind == "input_file" and (part.get("file_data") or part.get("file_url")):
            data = part.get("file_data")
            if isinstance(data, str) and not data.startswith("data:"):
                data = f"data:application/pdf;base64,{data}"  # the bare base64 form
            parts.append(file_part(data or part.get("file_url"), part.get("filename"), f"{where}.file_data"))
        elif kind in ("input_image", "input_file"):
            raise RequestError(f"{where}.file_id", "send files as URLs or data URLs: this gateway has no file storage")
        else:
            parts.append(TextPart(_text([part], param)))
    return parts


TEXT_PARTS = ("input_text", "output_text", "text", "refusal", "summary_text", "reasoning_text")


def _text(content: Any, param: str) -> str:
    """Content as text: a string, or text parts; other parts (images, files, audio) are refused by name."""
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise RequestError(param, "content must be a string or an array of content parts")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in TEXT_PARTS:
            raise RequestError(
                f"{param}[{j}].type", f"content parts of type {kind!r} are not supported by this gateway yet; send text"
            )
        texts.append(str(part.get("refusal") if kind == "refusal" else part.get("text") or ""))
    return "".join(texts)


def _arguments(raw: Any) -> Any:
    if isinstance(raw, dict):
        return raw
    if not raw:
        return {}
    try:
        return json.loads(raw)
    except (TypeError, ValueError):
        return {"_raw": raw}


def _tools(raw: Any) -> list[Tool]:
    """The function tools. The others are not offered to the model: hosted tools (web_search, file_search,
    code_interpreter, ...) run on OpenAI's servers, and custom (free-form) and namespace tools have no
    counterpart in other providers' APIs. Codex sends some of each next to its function tools and works
    with the function tools alone."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise RequestError("tools", "tools must be an array")
    tools = []
    for i, t in enumerate(raw):
        if not isinstance(t, dict):
            raise RequestError(f"tools[{i}]", "each tool must be an object")
        if t.get("type") != "function":
            continue
        if not isinstance(t.get("name"), str):
            raise RequestError(f"tools[{i}].name", "a function tool needs a name")
        tools.append(client_tool(t["name"], t, f"tools[{i}]"))
    return tools


def _tool_choice(raw: Any) -> Any:
    """The Responses ``tool_choice`` in the Chat Completions shape that providers take."""
    if raw in ("auto", "none", "required"):
        return raw
    if isinstance(raw, dict) and raw.get("type") == "function" and isinstance(raw.get("name"), str):
        return {"type": "function", "function": {"name": raw["name"]}}
    raise RequestError("tool_choice", "tool_choice must be auto, none, required or {type: function, name}")


def _text_format(raw: Any) -> dict[str, Any] | None:
    """``text.format`` as a Chat Completions ``response_format`` (None for plain text)."""
    if raw is None or raw == {"type": "text"}:
        return None
    if not isinstance(raw, dict):
        raise RequestError("text.format", "text.format must be an object")
    if raw.get("type") == "json_object":
        return {"type": "json_object"}
    if raw.get("type") == "json_schema":
        if not isinstance(raw.get("name"), str):  # required, as OpenAI's API has it
            raise RequestError("text.format.name", "a json_schema format needs a name (a string)")
        if not isinstance(raw.get("schema"), dict):
            raise RequestError("text.format.schema", "a json_schema format needs a schema object")
        schema = {"name": raw["name"], "schema": raw["schema"]}
        if raw.get("strict") is not None:
            if not isinstance(raw["strict"], bool):  # "false" is no false (it asked for strict mode)
                raise RequestError("text.format.strict", "strict must be a boolean")
            schema["strict"] = raw["strict"]
        if raw.get("description"):
            schema["description"] = str(raw["description"])
        return {"type": "json_schema", "json_schema": schema}
    raise RequestError("text.format.type", f"unsupported text format {raw.get('type')!r}")


# --- responses -----------------------------------------------------------------------------------


def usage_body(usage: TokenUsage) -> dict[str, Any]:
    """Responses usage: ``input_tokens`` includes the cached ones, ``output_tokens`` the reasoning ones."""
    prompt = usage.input_tokens + usage.cache_read_tokens + usage.cache_write_tokens
    return {
        "input_tokens": prompt,
        "input_tokens_details": {
            "cached_tokens": usage.cache_read_tokens,
            "cache_write_tokens": usage.cache_write_tokens,
        },
        "output_tokens": usage.output_tokens,
        "output_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
        "total_tokens": prompt + usage.output_tokens,
    }


def _echo(body: dict[str, Any]) -> dict[str, Any]:
    """The request settings a response object repeats."""
    return {
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"),
        "parallel_tool_calls": body.get("parallel_tool_calls", True),
        "previous_response_id": None,
        "reasoning": body.get("reasoning") or {"effort": None, "summary": None},
        "store": False,
        "temperature": body.get("temperature"),
        "text": body.get("text") or {"format": {"type": "text"}},
        "tool_choice": body.get("tool_choice", "auto"),
        "tools": body.get("tools") or [],
        "top_p": body.get("top_p"),
        "truncation": "disabled",
        "metadata": body.get("metadata") or {},
        "user": body.get("user"),
    }


def _status(finish: ProviderFinish) -> tuple[str, dict[str, Any] | None]:
    if finish.finish_reason == "length":
        return "incomplete", {"reason": "max_output_tokens"}
    if finish.finish_reason == "content-filter":
        return "incomplete", {"reason": "content_filter"}
    return "completed", None


def _message_item(item_id: str, text: str, status: str = "completed") -> dict[str, Any]:
    return {
        "id": item_id,
        "type": "message",
        "status": status,
        "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}],
    }


def _reasoning_item(item_id: str, text: str, signature: str | None) -> dict[str, Any]:
    item: dict[str, Any] = {"id": item_id, "type": "reasoning", "summary": []}
    if text:
        item["summary"] = [{"type": "summary_text", "text": text}]
    if signature:
        item["encrypted_content"] = signature
    return item


def _signed(part: ReasoningPart) -> str | None:
    """A reasoning part's ``encrypted_content``: its signature, or a redacted block's data."""
    return REDACTED + part.redacted_data if part.redacted_data else part.signature


def _call_item(item_id: str, call_id: str, name: str, arguments: str, status: str = "completed") -> dict[str, Any]:
    return {
        "id": item_id,
        "type": "function_call",
        "status": status,
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
    }


def _output_items(message: ChatMessage, encrypted: bool) -> list[dict[str, Any]]:
    items = []
    for part in message.parts:
        if isinstance(part, ReasoningPart):
            signature = _signed(part) if encrypted else None
            if part.text or signature:
                items.append(_reasoning_item(new_id("rs_"), part.text, signature))
        elif isinstance(part, TextPart):
            if items and items[-1]["type"] == "message":
                items[-1]["content"][0]["text"] += part.text
            else:
                items.append(_message_item(new_id("msg_"), part.text))
        elif isinstance(part, ToolCallPart):
            arguments = json.dumps(part.input, ensure_ascii=False)
            items.append(_call_item(new_id("fc_"), part.tool_call_id, part.name, arguments))
    return items


def response_object(
    body: dict[str, Any], model: str, finish: ProviderFinish, usage: TokenUsage, encrypted: bool
) -> dict[str, Any]:
    """One whole ``response`` from the finished answer."""
    status, incomplete = _status(finish)
    output = _output_items(finish.message, encrypted)
    if status == "incomplete" and output and output[-1]["type"] == "message":
        output[-1]["status"] = "incomplete"  # the message the limit cut, as OpenAI marks it
    return {
        "id": new_id("resp_"),
        "object": "response",
        "created_at": int(time.time()),
        "status": status,
        "error": None,
        "incomplete_details": incomplete,
        "model": model,
        "output": output,
        "usage": usage_body(usage),
        **_echo(body),
    }


# The statuses of a request the provider refused, which a retry of it gets again: the request itself (400, 413,
# 422), the gateway's provider key refused or not allowed the model (401, 403: Anthropic's mid-stream
# authentication_error, permission_error), the model gone (404).
REFUSED_STATUSES = (400, 401, 403, 404, 413, 422)


def failed_code(status: int, upstream_code: str | None = None) -> str:
    """The ``code`` of the ``response.failed`` that ends a stream the provider broke off, for the status an
    OpenAI client expects (``client_status``): a request refused is OpenAI's ``invalid_prompt``, which clients
    do not retry (Codex retries every code but it, ``context_length_exceeded``, ``cyber_policy`` and the quota's
    and plan's, and shows ``invalid_prompt``'s message: ``invalid_api_key`` it retries); what a retry may pass
    keeps its code (``rate_limit_exceeded``) or is ``server_error``."""
    if upstream_code is None and status in REFUSED_STATUSES:
        return "invalid_prompt"
    return error_code(status, upstream_code) or "server_error"


class EventEncoder:
    """Provider events -> the Responses stream events of one answer (each a dict with its ``type``).

    One output item is open at a time: text deltas go to a message item, reasoning deltas to a reasoning
    item, and a tool call (complete when the provider hands it over) is one function_call item.
    """

    def __init__(self, body: dict[str, Any], model: str, encrypted: bool) -> None:
        self.response: dict[str, Any] = {
            "id": new_id("resp_"),
            "object": "response",
            "created_at": int(time.time()),
            "status": "in_progress",
            "error": None,
            "incomplete_details": None,
            "model": model,
            "output": [],
            "usage": None,
            **_echo(body),
        }
        self.encrypted = encrypted
        self.output: list[dict[str, Any]] = []  # the items done so far
        self._seq = 0
        self._open: dict[str, Any] | None = None  # the item being streamed
        self._text: list[str] = []
        self._deferred: list[int] = []  # reasoning items whose output_item.done waits for the signatures

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = {"type": kind, "sequence_number": self._seq, **fields}
        self._seq += 1
        return event

    def start(self) -> list[dict[str, Any]]:
        return [
            self._event("response.created", response={**self.response}),
            self._event("response.in_progress", response={**self.response}),
        ]

    def encode(self, event: ProviderEvent, usage: TokenUsage | None = None) -> list[dict[str, Any]]:
        kind = type(event)
        if kind is TextDelta:
            return self._delta("message", event.text)  # type: ignore[union-attr]
        if kind is ReasoningDelta:
            return self._delta("reasoning", event.text)  # type: ignore[union-attr]
        if kind is ToolCallEvent:
            return self._close() + self._tool_call(event)  # type: ignore[arg-type]
        if kind is ProviderFinish:
            # (as OpenAI marks it: the item an output limit cut is incomplete, like the response)
            cut = _status(event)[0] == "incomplete"  # type: ignore[arg-type]
            return self._close(cut) + self._finish(event, usage)  # type: ignore[arg-type]
        return []  # sources: no streamed place for them without a web_search tool; ResponseStarted shows nothing

    def _delta(self, kind: str, text: str) -> list[dict[str, Any]]:
        out = []
        if self._open is None or self._open["type"] != kind:
            out = self._close() + self._open_item(kind)
        self._text.append(text)
        index = len(self.output)
        item_id = self._open["id"]  # type: ignore[index]
        if kind == "message":
            out.append(
                self._event(
                    "response.output_text.delta",
                    item_id=item_id,
                    output_index=index,
                    content_index=0,
                    delta=text,
                    logprobs=[],
                )
            )
        else:
            out.append(
                self._event(
                    "response.reasoning_summary_text.delta",
                    item_id=item_id,
                    output_index=index,
                    summary_index=0,
                    delta=text,
                )
            )
        return out

    def _open_item(self, kind: str) -> list[dict[str, Any]]:
        index = len(self.output)
        if kind == "message":
            item = {**_message_item(new_id("msg_"), "", "in_progress"), "content": []}
            self._open = item
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            return [
                self._event("response.output_item.added", output_index=index, item=item),
                self._event(
                    "response.content_part.added", item_id=item["id"], output_index=index, content_index=0, part=part
                ),
            ]
        item = _reasoning_item(new_id("rs_"), "", None)
        self._open = item
        return [
            self._event("response.output_item.added", output_index=index, item=item),
            self._event(
                "response.reasoning_summary_part.added",
                item_id=item["id"],
                output_index=index,
                summary_index=0,
                part={"type": "summary_text", "text": ""},
            ),
        ]

    def _close(self, cut: bool = False) -> list[dict[str, Any]]:
        item = self._open
        if item is None:
            return []
        self._open = None
        text = "".join(self._text)
        self._text = []
        index = len(self.output)
        if item["type"] == "message":
            done = _message_item(item["id"], text, "incomplete" if cut else "completed")
            part = done["content"][0]
            out = [
                self._event(
                    "response.output_text.done",
                    item_id=item["id"],
                    output_index=index,
                    content_index=0,
                    text=text,
                    logprobs=[],
                ),
                self._event(
                    "response.content_part.done", item_id=item["id"], output_index=index, content_index=0, part=part
                ),
            ]
        else:
            done = _reasoning_item(item["id"], text, None)
            part = {"type": "summary_text", "text": text}
            out = [
                self._event(
                    "response.reasoning_summary_text.done",
                    item_id=item["id"],
                    output_index=index,
                    summary_index=0,
                    text=text,
                ),
                self._event(
                    "response.reasoning_summary_part.done",
                    item_id=item["id"],
                    output_index=index,
                    summary_index=0,
                    part=part,
                ),
            ]
        self.output.append(done)
        if item["type"] == "reasoning" and self.encrypted:
            # Its signature comes with the whole message: the item is done (with encrypted_content) at the end,
            # since clients such as Codex keep the items of output_item.done for the next turn.
            self._deferred.append(index)
        else:
            out.append(self._event("response.output_item.done", output_index=index, item=done))
        return out

    def _tool_call(self, event: ToolCallEvent) -> list[dict[str, Any]]:
        index = len(self.output)
        item_id = new_id("fc_")
        arguments = json.dumps(event.input, ensure_ascii=False)
        done = _call_item(item_id, event.tool_call_id, event.name, arguments)
        self.output.append(done)
        return [
            self._event(
                "response.output_item.added",
                output_index=index,
                item=_call_item(item_id, event.tool_call_id, event.name, "", "in_progress"),
            ),
            self._event("response.function_call_arguments.delta", item_id=item_id, output_index=index, delta=arguments),
            self._event(
                "response.function_call_arguments.done",
                item_id=item_id,
                output_index=index,
                name=event.name,
                arguments=arguments,
            ),
            self._event("response.output_item.done", output_index=index, item=done),
        ]

    def _finish(self, finish: ProviderFinish, usage: TokenUsage | None) -> list[dict[str, Any]]:
        status, incomplete = _status(finish)
        done = []
        if self.encrypted:  # the signatures come with the whole message: the final output carries them
            # Each reasoning item is done here in the message's order (Codex sends them back in the order they
            # were done). A block that streamed no text (redacted thinking; Claude Opus 4.7 and later send none by
            # default) gets its item now, so that it goes back with the turn; so does each block after the first of
            # those that streamed into one item, since each block goes back with its own text and signature.
            streamed = iter(self._deferred)
            rest = ""  # the text of the last streamed item not yet matched to a block
            for part in finish.message.parts:
                if not isinstance(part, ReasoningPart):
                    continue
                signature = _signed(part)
                index = None
                if part.text and not rest.startswith(part.text):
                    index = next(streamed, None)
                    item = self.output[index] if index is not None else None
                    text = "".join(s["text"] for s in item["summary"]) if item is not None else ""
                    rest = text.removeprefix(part.text) if text.startswith(part.text) else ""
                    if item is not None and rest:
                        item["summary"] = [{"type": "summary_text", "text": part.text}]
                    if item is not None and signature:
                        item["encrypted_content"] = signature
                elif part.text:
                    rest = rest.removeprefix(part.text)
                if index is None and (signature or part.text):
                    index = len(self.output)
                    self.output.append(_reasoning_item(new_id("rs_"), part.text, signature))
                    done.append(self._event("response.output_item.added", output_index=index, item=self.output[index]))
                if index is not None:
                    done.append(self._event("response.output_item.done", output_index=index, item=self.output[index]))
            self._deferred = list(streamed)
        done += [
            self._event("response.output_item.done", output_index=index, item=self.output[index])
            for index in self._deferred
        ]
        response = {
            **self.response,
            "status": status,
            "incomplete_details": incomplete,
            "output": self.output,
            "usage": usage_body(usage) if usage is not None else None,
        }
        return done + [
            self._event("response.completed" if status == "completed" else "response.incomplete", response=response)
        ]

    def failed(self, code: str, message: str) -> dict[str, Any]:
        """The last event of a stream the provider broke off."""
        response = {
            **self.response,
            "status": "failed",
            "output": self.output,
            "error": {"code": code, "message": message},
        }
        return self._event("response.failed", response=response)
