// Reads the Vercel AI SDK UI message stream (protocol v1) as the SDK's default transport does: server-sent
// events whose `data:` is one JSON chunk, ending with `data: [DONE]`; and folds the chunks into a message.

// Yields the chunks of a `POST /api/chat` (or `GET /api/chat/{id}/stream`) response body.
export async function* readChunks(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let end;
    while ((end = buffer.search(/\r?\n\r?\n/)) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end).replace(/^\r?\n\r?\n/, "");
      const data = event
        .split(/\r?\n/)
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).replace(/^ /, ""))
        .join("\n");
      if (!data) continue;
      if (data === "[DONE]") return;
      yield JSON.parse(data);
    }
  }
}

// An assistant message being built: parts in the order they arrived, as the SDK's UIMessage has them.
export function newAssistantMessage(id) {
  return { id, role: "assistant", parts: [], metadata: {}, state: "streaming" };
}

// Applies one chunk to the message; returns true when the chunk changed what is shown.
export function applyChunk(message, chunk) {
  const parts = message.parts;
  const open = (type, id) => parts.find((p) => p.type === type && p.id === id);
  switch (chunk.type) {
    case "start":
      if (chunk.messageId) message.id = chunk.messageId;
      return false;
    case "text-start":
    case "reasoning-start":
      parts.push({ type: chunk.type.split("-")[0], id: chunk.id, text: "", state: "streaming" });
      return true;
    case "text-delta":
    case "reasoning-delta": {
      const part = open(chunk.type.split("-")[0], chunk.id);
      if (part) part.text += chunk.delta;
      return true;
    }
    case "text-end":
    case "reasoning-end": {
      const part = open(chunk.type.split("-")[0], chunk.id);
      if (part) part.state = "done";
      return true;
    }
    case "source-url":
      parts.push({ type: "source-url", sourceId: chunk.sourceId, url: chunk.url, title: chunk.title });
      return true;
    case "tool-input-available":
      parts.push({ type: "tool", toolCallId: chunk.toolCallId, toolName: chunk.toolName, input: chunk.input, state: "input-available" });
      return true;
    case "tool-output-available":
    case "tool-output-error": {
      const part = parts.find((p) => p.type === "tool" && p.toolCallId === chunk.toolCallId);
      if (part) {
        part.state = chunk.type === "tool-output-error" ? "output-error" : "output-available";
        part.output = chunk.type === "tool-output-error" ? chunk.errorText : chunk.output;
      }
      return true;
    }
    case "abort":
      message.metadata.stopped = true;
      return true;
    case "finish":
      message.state = "done";
      message.metadata.finishReason = chunk.finishReason;
      if (chunk.messageMetadata) Object.assign(message.metadata, chunk.messageMetadata);
      return true;
    case "error":
      message.state = "done";
      message.metadata.error = chunk.errorText;
      return true;
    default:
      return false; // start-step, finish-step, and chunk types this app does not show
  }
}

// A stored message (GET /api/sessions/{id}) in the shape the live stream builds.
export function fromStored(stored) {
  const parts = [];
  for (const p of stored.parts || []) {
    if (p.type === "text" || p.type === "reasoning") parts.push({ type: p.type, text: p.text || "", state: "done" });
    else if (p.type === "source") parts.push({ type: "source-url", url: p.url, title: p.title });
    else if (p.type === "file") parts.push({ type: "file", mediaType: p.mediaType, url: p.url, filename: p.filename, size: p.size });
    else if (p.type === "tool-call")
      parts.push({ type: "tool", toolCallId: p.toolCallId, toolName: p.name, input: p.input, state: "input-available" });
    else if (p.type === "tool-result") {
      const call = parts.find((q) => q.type === "tool" && q.toolCallId === p.toolCallId);
      if (call) {
        call.state = p.isError ? "output-error" : "output-available";
        call.output = p.output;
      }
    }
  }
  if (!parts.length && stored.content) parts.push({ type: "text", text: stored.content, state: "done" });
  return {
    id: stored.id,
    role: stored.role,
    parts,
    state: "done",
    metadata: {
      usage: stored.usage,
      ttftMs: stored.ttftMs,
      latencyMs: stored.latencyMs,
      model: stored.model,
      stopped: Boolean(stored.aborted),
      finishReason: stored.finishReason,
      error: stored.error ? stored.error.message || stored.error.code : undefined,
    },
  };
}
