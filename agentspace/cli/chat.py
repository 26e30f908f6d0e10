"""``agentspace chat``: a terminal client of a running gateway.

The answer (text and sources) goes to stdout; reasoning, tool activity, the token/cost line and errors
go to stderr, so ``echo question | agentspace chat > answer.md`` keeps only the answer. On a terminal the
prompt has line editing and a history kept in the data directory (``readline``, as ``llm chat`` has).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import click

from .common import CliState, config_options, money, new_id, pass_state, printable, wait_note

if TYPE_CHECKING:
    import asyncio

    from .client import GatewayConnection

RECONNECT_SECONDS = 60.0  # a message typed while the gateway restarts waits this long for it
HELP_LINE = "Enter sends · /new starts a new session · Ctrl-C stops an answer · Ctrl-D exits"
FALLBACK_NOTE = '* price unknown: costed at the fallback price; set [pricing."MODEL"] in the config for exact costs.'
HISTORY_FILE = "chat_history"  # in the data directory
HISTORY_LENGTH = 1000  # lines kept in the file


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
        # A model's text, a web page's title, a tool's output: escapes would drive the terminal, as in a stored
        # session's (``sessions show``): shown as escapes, line breaks kept.
        text = printable(text, lines=True)
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
            self.note(
                f"← {frame.get('name')}{' failed' if failed else ''}: {_brief(frame.get('output'))}",
                fg="red" if failed else "cyan",
            )
        elif kind == "chat.stream.end":
            self.end(frame)
        elif kind == "error":
            self.note(
                f"Error [{frame.get('code')}]: {frame.get('message')}{wait_note(frame.get('retryAfter'))}", fg="red"
            )

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
        # A model with no known price is costed at the configured fallback price: an estimate, said so.
        guess = "*" if u.get("priceKnown") is False else ""
        self.note(
            f"[{u.get('inputTokens', 0)} in / {u.get('outputTokens', 0)} out tokens, "
            f"{money(float(u.get('totalCost') or 0.0))}{guess}{suffix}]",
            dim=True,
        )
        if guess:
            self.note(FALLBACK_NOTE, dim=True)


class ChatSession:
    def __init__(self, gateway: GatewayConnection, session_id: str | None, model: str | None) -> None:
        self.gateway = gateway
        self.session_id = session_id
        self.model = model
        self.active: str | None = None  # requestId of the answer being streamed
        self.interrupts = 0
        self.printer = _Printer()
        self._pending: set[asyncio.Task[None]] = set()  # abort sends, referenced until done

    def on_interrupt(self, loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
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
            await self.gateway.send(
                frame,
                patience=RECONNECT_SECONDS,
                on_wait=lambda: printer.note("[the gateway is not answering; reconnecting…]", dim=True),
            )
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


class LineEditor:
    """The terminal prompt: line editing and history through ``readline`` where Python has it.

    Importing ``readline`` is what gives ``input()`` editing (arrows, Ctrl-A/E, Ctrl-R search) and Up/Down
    recall. Each line entered is appended to ``history_path`` at once (0600: it holds what the user typed),
    so a killed client loses nothing and two chats in two terminals both keep theirs. Without
    ``readline`` (Windows) the prompt is plain ``input()``. A history file that cannot be read or written
    is reported once and the chat goes on.
    """

    def __init__(self, history_path: Path) -> None:
        self.path = history_path
        self.readline: ModuleType | None
        try:
            import readline

            self.readline = readline
        except ImportError:
            self.readline = None
        self._terminal: list[Any] | None = None
        self._warned = False
        if self.readline is None:
            return
        try:
            import termios

            # readline switches the terminal mode while it reads; a chat that exits from Ctrl-C at the
            # prompt leaves the read unfinished on its thread, so the mode is put back on close().
            self._terminal = termios.tcgetattr(sys.stdin.fileno())
        except (ImportError, OSError, ValueError):
            self._terminal = None
        self.readline.set_history_length(HISTORY_LENGTH)
        try:
            self.readline.read_history_file(str(self.path))
            if self.readline.get_current_history_length() > HISTORY_LENGTH:
                self.readline.write_history_file(str(self.path))  # writes the last HISTORY_LENGTH lines
        except FileNotFoundError:
            pass
        except OSError as e:
            self._warn(e)

    def read(self, prompt: str) -> str:
        """One line from the terminal (EOFError on Ctrl-D); a new history line is saved before returning."""
        rl = self.readline
        before = rl.get_current_history_length() if rl else 0
        line = input(prompt)
        # readline adds a line to the history itself, except an empty one or a repeat of the last.
        if rl is not None and rl.get_current_history_length() > before:
            try:
                self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
                rl.append_history_file(1, str(self.path))
            except OSError as e:
                self._warn(e)
        return line

    def close(self) -> None:
        if self._terminal is not None:
            import termios

            try:
                termios.tcsetattr(sys.stdin.fileno(), termios.TCSADRAIN, self._terminal)
            except (OSError, ValueError):
                pass

    def _warn(self, error: OSError) -> None:
        if not self._warned:
            self._warned = True
            click.secho(f"[chat history not kept: {self.path}: {error.strerror or error}]", err=True, dim=True)


def _start_line_reader(
    loop: asyncio.AbstractEventLoop, lines: asyncio.Queue[str | None], want: threading.Event, editor: LineEditor | None
) -> None:
    """Read stdin on a daemon thread (a blocked read must not keep the process alive at exit).

    On a terminal (``editor`` given) it waits for ``want`` so the "> " prompt appears only when the
    previous answer is done.
    """
    stdin = sys.stdin

    def run() -> None:
        try:
            while True:
                if editor is not None:
                    want.wait()
                    want.clear()
                    line = editor.read("> ") + "\n"
                else:
                    line = stdin.readline()
                if not line:
                    break
                loop.call_soon_threadsafe(lines.put_nowait, line)
        except (EOFError, OSError, ValueError):
            pass
        loop.call_soon_threadsafe(lines.put_nowait, None)

    threading.Thread(target=run, name="agentspace-chat-stdin", daemon=True).start()


async def run_chat(url: str, token: str, session_id: str | None, model: str | None, editor: LineEditor | None) -> int:
    """The chat loop; returns the exit code (1 when a piped message failed). ``editor``: on a terminal."""
    import asyncio

    from .client import GatewayConnection

    interactive = editor is not None
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
                click.secho(f"Connected to {gateway.url}. {HELP_LINE}", err=True, dim=True)
            failures = await _converse(chat, stop, editor)
            if interactive:
                click.echo(err=True)  # leave the shell prompt on a line of its own
        finally:
            if previous_handler is not None:
                loop.remove_signal_handler(signal.SIGINT)
                signal.signal(signal.SIGINT, previous_handler)
    return 1 if failures and not interactive else 0


async def _converse(chat: ChatSession, stop: asyncio.Event, editor: LineEditor | None) -> int:
    import asyncio

    interactive = editor is not None
    lines: asyncio.Queue[str | None] = asyncio.Queue()
    want = threading.Event()
    _start_line_reader(asyncio.get_running_loop(), lines, want, editor)
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
        except click.ClickException as e:  # the connection was lost, or could not be made again
            click.secho(f"Error: {e.message}", err=True, fg="red")
            ok = False
            if not interactive:
                return failures + 1
        if ok is None:  # a second Ctrl-C: quit without waiting for the gateway
            return failures
        failures += 0 if ok else 1


async def _until_stopped(awaitable: Any, stop: asyncio.Event) -> Any:
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
@click.option("--model", "-m", help="Model id, e.g. anthropic/claude-sonnet-4-6 (default: the gateway's).")
@click.option(
    "--url",
    envvar="AGENTSPACE_URL",
    help="Gateway URL, ws:// or http:// (default: where `serve` last listened on this data directory, else [server]).",
)
@click.option(
    "--token",
    envvar="AGENTSPACE_TOKEN",
    help="Gateway token or client key (default: AGENTSPACE_GATEWAY_TOKEN, else the data directory's).",
)
@pass_state
def chat(state: CliState, session_id: str | None, model: str | None, url: str | None, token: str | None) -> None:
    """Chat with a running gateway: reads lines from the terminal or from stdin."""
    import asyncio

    from .client import default_url, resolve_token

    url = url or default_url(state)
    token = resolve_token(state, token)
    editor = LineEditor(state.data_dir / HISTORY_FILE) if sys.stdin.isatty() else None
    try:
        code = asyncio.run(run_chat(url, token, session_id, model, editor))
    finally:
        if editor is not None:
            editor.close()
    if code:
        raise SystemExit(code)
