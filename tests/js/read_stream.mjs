// Usage: node read_stream.mjs <url of /api/chat> <gateway token> <request body JSON>
//
// Sends the body the way useChat does (the AI SDK's DefaultChatTransport), reads the answer with the SDK's own
// stream parser and message builder (readUIMessageStream), then asks to resume the finished chat, which must
// find nothing (204 -> null). Prints {message, chunkTypes, errors, resumed} as JSON on stdout.
import { DefaultChatTransport, readUIMessageStream } from "ai";

const [url, token, bodyJson] = process.argv.slice(2);
const body = JSON.parse(bodyJson);
const { id, messages, ...extra } = body;

const transport = new DefaultChatTransport({ api: url, headers: { Authorization: `Bearer ${token}` } });
const stream = await transport.sendMessages({
  chatId: id,
  messages,
  trigger: "submit-message",
  messageId: undefined,
  abortSignal: undefined,
  body: extra,
});

const [forMessage, forTypes] = stream.tee();
const chunkTypes = [];
const collecting = (async () => {
  for await (const chunk of forTypes) chunkTypes.push(chunk.type);
})();

const errors = [];
let message = null;
for await (const snapshot of readUIMessageStream({
  stream: forMessage,
  onError: (error) => errors.push(String(error?.message ?? error)),
})) {
  message = snapshot;
}
await collecting;

const resumed = await transport.reconnectToStream({ chatId: id });
process.stdout.write(JSON.stringify({ message, chunkTypes, errors, resumed: resumed === null ? null : "stream" }));
