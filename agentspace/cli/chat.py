"""``agentspace chat``: a terminal client of a running gateway.

The answer (text and sources) goes to stdout; reasoning, tool activity, the token/cost line and errors
go to stderr, so ``echo question | agentspace chat > answer.md`` keeps only the answer.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
from typing import TYPE_CHECKING, Any

import click

from .common import CliState, config_options, money, new_id, pass_state

if TYPE_CHECKING:
    import asyncio

    from .client import GatewayConnection

HELP_LINE = "Enter sends · /new starts a new session · Ctrl-C stops an answer · Ctrl-D exits"


def _brief(value: Any, width: int = 120) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


class _Printer:
    """Renders one answer's frames; keeps track of the line so stderr notes start on a fresh one."""

    def __init__(self) -> None:
        self.at_line_start = True
        self.kind: str | None = None  # "text" | "reasoning"
        self.sources: list[dict[str, Any]] = []

    def write(self, text: str, *, err: bool = False, **style: Any) -> None:
        if text:
            click.echo(click.style(text, **style) if style else text, nl=False, err=err)
            self.at_line_start = text.endswith("\n")

    def note(self, text: str, **style: Any) -> None:
        if not self.at_line_start:
            self.write("\n", err=True)
        self.write(text + "\n", err=True, **style)
        self.kind = None

    def frame(self, frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        if kind == "chat.stream.delta":
            if self.kind == "reasoning":
                self.write("\n\n", err=True)
            self.kind = "text"
            self.write(frame.get("delta", ""))
        elif kind == "chat.stream.reasoning":
            self.kind = "reasoning"
            self.write(frame.get("delta", ""), err=True, dim=True)
        elif kind == "chat.stream.source":
            self.sources.append(frame.get("source") or {})
        elif kind == "chat.stream.tool_call":
            self.note(f"→ {frame.get('name')}({_brief(frame.get('input'))})", fg="cyan")
        elif kind == "chat.stream.tool_result":
            failed = frame.get("isError")
            self.note(f"← {frame.get('name')}{' failed' if failed else ''}: {_brief(frame.get('output'))}",
                      fg="red" if failed else "cyan")
        elif kind == "chat.stream.end":
            self.end(frame)
        elif kind == "error":
            self.note(f"Error [{frame.get('code')}]: {frame.get('message')}", fg="red")

    def end(self, frame: dict[str, Any]) -> None:
        if not self.at_line_start:
            self.write("\n")
        if self.sources:
            self.write("\nSources:\n")
            for i, source in enumerate(self.sources, 1):
                title = source.get("title")
                self.write(f"  {i}. {title} <{source.get('url')}>\n" if title else f"  {i}. {source.get('url')}\n")
        u = frame.get("usage") or {}
        reason = frame.get("finishReason")
        suffix = f" · {reason}" if reason and reason != "stop" else ""
        self.note(f"[{u.get('inputTokens', 0)} in / {u.get('outputTokens', 0)} out tokens, "
                  f"{money(float(u.get('totalCost') or 0.0))}{suffix}]", dim=True)


class ChatSession:
    def __init__(self, gateway: "GatewayConnection", session_id: str | None, model: str | None) -> None:
        self.gateway = gateway
        self.session_id = session_id
        self.model = model
        self.active: str | None = None  # requestId of the answer being streamed
        self.interrupts = 0
        self.printer = _Printer()
        self._pending: set[asyncio.Task[None]] = set()  # abort sends, referenced until done

    def on_interrupt(self, loop: "asyncio.AbstractEventLoop", stop: "asyncio.Event") -> None:
        """Ctrl-C: stop the running answer (the gateway keeps what was generated); at the prompt, exit."""
        if self.active is None or self.interrupts >= 1:
            stop.set()
            return
        self.interrupts += 1
        self.printer.note("^C stopping the answer (Ctrl-C again to quit)", dim=True)
        task = loop.create_task(self.gateway.send({"type": "chat.abort", "id": new_id(), "requestId": self.active}))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def send(self, content: str) -> bool:
        """Send one message and print the answer as it streams; False when it ended in an error."""
        frame: dict[str, Any] = {"type": "chat.send", "id": new_id(), "content": content}
        if self.session_id:
            frame["sessionId"] = self.session_id
        if self.model:
            frame["model"] = self.model
        printer = self.printer = _Printer()
        self.active, self.interrupts = frame["id"], 0
        ok = True
        try:
            await self.gateway.send(frame)
            async for reply in self.gateway.replies(frame["id"]):
                kind = reply.get("type")
                if kind == "session.created":
                    self.session_id = reply.get("sessionId")
                    printer.note(f"[session {self.session_id} · {reply.get('model')}]", dim=True)
                elif kind == "chat.stream.start":
                    self.session_id = reply.get("sessionId") or self.session_id
                else:
                    ok = ok and kind != "error"
                    printer.frame(reply)
        finally:
            self.active = None
        return ok


def _start_line_reader(loop: "asyncio.AbstractEventLoop", lines: "asyncio.Queue[str | None]",
                       want: threading.Event, interactive: bool) -> None:
    """Read stdin on a daemon thread (a blocked read must not keep the process alive at exit).

    On a terminal it waits for ``want`` so the "> " prompt appears only when the previous answer is done.
    """
    stdin = sys.stdin

    def run() -> None:
        try:
            while True:
                if interactive:
                    want.wait()
                    want.clear()
                    line = input("> ") + "\n"
                else:
                    line = stdin.readline()
                if not line:
                    break
                loop.call_soon_threadsafe(lines.put_nowait, line)
        except (EOFError, OSError, ValueError):
            pass
        loop.call_soon_threadsafe(lines.put_nowait, None)

    threading.Thread(target=run, name="agentspace-chat-stdin", daemon=True).start()


async def run_chat(url: str, token: str, session_id: str | None, model: str | None, interactive: bool) -> int:
    """The chat loop; returns the exit code (1 when a piped message failed)."""
    import asyncio

    from .client import GatewayConnection

    loop = asyncio.get_running_loop()
    async with GatewayConnection(url, token) as gateway:
        chat = ChatSession(gateway, session_id, model)
        stop = asyncio.Event()
        previous_handler = signal.getsignal(signal.SIGINT)
        try:
            loop.add_signal_handler(signal.SIGINT, chat.on_interrupt, loop, stop)
        except (NotImplementedError, RuntimeError, ValueError):
            previous_handler = None  # not the main thread, or Windows: Ctrl-C just exits
        try:
            if interactive:
                click.secho(f"Connected to {url}. {HELP_LINE}", err=True, dim=True)
            failures = await _converse(chat, stop, interactive)
            if interactive:
                click.echo(err=True)  # leave the shell prompt on a line of its own
        finally:
            if previous_handler is not None:
                loop.remove_signal_handler(signal.SIGINT)
                signal.signal(signal.SIGINT, previous_handler)
    return 1 if failures and not interactive else 0


async def _converse(chat: ChatSession, stop: "asyncio.Event", interactive: bool) -> int:
    import asyncio

    from .client import ConnectionLost

    lines: asyncio.Queue[str | None] = asyncio.Queue()
    want = threading.Event()
    _start_line_reader(asyncio.get_running_loop(), lines, want, interactive)
    failures = 0
    while True:
        want.set()
        line = await _until_stopped(lines.get(), stop)
        if line is None:  # EOF, Ctrl-D or Ctrl-C at the prompt
            return failures
        content = line.strip()
        if content in ("/exit", "/quit"):
            return failures
        if content == "/new":
            chat.session_id = None
            click.secho("[the next message starts a new session]", err=True, dim=True)
            continue
        if not content:
            continue
        sending = asyncio.ensure_future(chat.send(content))
        try:
            ok = await _until_stopped(sending, stop)
        except ConnectionLost as e:
            click.secho(f"Error: {e.message}", err=True, fg="red")
            ok = False
            if not interactive:
                return failures + 1
        if ok is None:  # a second Ctrl-C: quit without waiting for the gateway
            return failures
        failures += 0 if ok else 1


async def _until_stopped(awaitable: Any, stop: "asyncio.Event") -> Any:
    """The awaitable's result, or None (and it is cancelled) once ``stop`` is set."""
    import asyncio

    task = asyncio.ensure_future(awaitable)
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
    if not task.done():
        task.cancel()
        return None
    return task.result()


@click.command()
@config_options
@click.option("--session", "session_id", metavar="ID", help="Continue this session (default: start a new one).")
@click.option("--model", "-m", help="Model id, e.g. anthropic/claude-sonnet-4-5 (default: the gateway's).")
@click.option("--url", envvar="AGENTSPACE_URL", help="Gateway WebSocket URL (default: from [server] of the config).")
@click.option("--token", envvar="AGENTSPACE_TOKEN", help="Gateway token (default: the data directory's).")
@pass_state
def chat(state: CliState, session_id: str | None, model: str | None, url: str | None, token: str | None) -> None:
    """Chat with a running gateway: reads lines from the terminal or from stdin."""
    import asyncio

    from .client import default_url, resolve_token

    url = url or default_url(state)
    interactive = sys.stdin.isatty()
    code = asyncio.run(run_chat(url, resolve_token(state, token), session_id, model, interactive))
    if code:
        raise SystemExit(code)
