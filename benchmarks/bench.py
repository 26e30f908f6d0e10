"""What the gateway adds: streamed chats through it versus calling a zero-delay fake upstream directly.

    python benchmarks/bench.py [--requests N] [--soak N] [--quick] [--json] [--profile FILE] [--without-sdk]

Runs the fake Anthropic upstream (Messages SSE, 50 text deltas, no delay) and ``agentspace serve`` as
separate processes, with persistence and usage recording on (the defaults). For each transport (the
WebSocket ``chat.send`` and ``POST /api/chat``) and concurrency 1, 10 and 50 it sends ``--requests``
streamed chats, each in a new session, and reports: time to first token (TTFT) added over calling the
upstream directly with the same HTTP client at the same concurrency (p50/p95/p99, each minus the direct
percentile), whole-stream time p50, requests per second, the server's CPU-ms per chat (utime+stime from
``/proc/<pid>/stat``, worker threads included, after the server is idle again; split between the event
loop's thread and the others from ``/proc/<pid>/task``), its peak RSS (VmHWM) and
the number of failed chats. Then: server start time (spawn to ``/healthz`` answering), RSS after
``--soak`` chats, and a cold ``agentspace usage --by-model`` over 100k seeded usage records.

``--profile FILE`` runs the server under pyinstrument (``FILE.html``) or, for a ``.prof`` FILE, cProfile
(read it with ``python -m pstats FILE``). ``--without-sdk`` makes the gateway's Anthropic calls plain aiohttp
requests instead of the SDK's (``benchmarks/without_sdk.py``): the gateway's own share, for comparison. Every
phase is bounded in count and in time (``PHASE_SECONDS``, ``SOAK_SECONDS``). The added TTFT is meaningful at
concurrency 1; at 10 and 50 the client shares the two cores with both servers, so TTFT there is mostly queueing
(and the direct figure can exceed the gateway's).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
DELTAS = 50
EXPECTED_TEXT = "tok " * DELTAS  # what the fake upstream answers (tests/fakes/anthropic_upstream.py --deltas)
CONCURRENCY = (1, 10, 50)
PHASE_SECONDS = 20.0
SOAK_SECONDS = 600.0
CHAT_TIMEOUT = 30.0
USAGE_RECORDS = 100_000
MODEL = "anthropic/claude-sonnet-4-5"
# A model group of two deployments of MODEL on the same upstream: what routing adds to a call.
ROUTED = "routed"
ROUTED_GROUP = (
    f'\n[models.groups."{ROUTED}"]\n'
    f'deployments = [{{ model = "{MODEL}", name = "one" }}, {{ model = "{MODEL}", name = "two" }}]\n'
)
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --- processes ----------------------------------------------------------------------------------


def _env(home: Path, code: Path = ROOT, plugins: str = "") -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AGENTSPACE_", "ANTHROPIC_"))}
    path = os.pathsep.join(filter(None, [str(code), env.get("PYTHONPATH")]))
    return {
        **env,
        "PYTHONPATH": path,
        "AGENTSPACE_HOME": str(home),
        "AGENTSPACE_LOAD_PLUGINS": plugins,  # none by default; "metrics" measures the metrics plugin
        "ANTHROPIC_API_KEY": "sk-bench",
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    }


def read_url(proc: subprocess.Popen[str], pattern: str, timeout: float) -> str:
    """The first URL the process prints on stdout (it prints nothing else before it)."""
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{pattern!r} process exited (code {proc.wait()}) before printing its URL")
        m = re.search(pattern + r" (?:on |at )?(http://[\d.:\[\]]+)", line)
        if m:
            return m.group(1)
    raise RuntimeError(f"no URL from {pattern!r} within {timeout} s")


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)  # the server shuts down gracefully (and a profiler writes its file)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _cpu_times(stat_path: str) -> tuple[float, float]:
    """(user, system) CPU seconds from a /proc ``stat`` file (fields 14 and 15 of proc(5))."""
    with open(stat_path) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def cpu_seconds(pid: int) -> float:
    """User + system CPU of the whole process (every thread), from the kernel's accounting."""
    return sum(_cpu_times(f"/proc/{pid}/stat"))


def thread_cpu_seconds(pid: int) -> dict[int, tuple[float, float]]:
    """(user, system) CPU seconds of each thread of the process, by thread id."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            out[int(tid)] = _cpu_times(f"/proc/{pid}/task/{tid}/stat")
        except FileNotFoundError:  # the thread ended
            continue
    return out


def memory_mib(pid: int, key: str) -> float:
    """``VmHWM`` (peak RSS) or ``VmRSS`` from /proc/<pid>/status, in MiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(key)


async def wait_idle(pid: int, quiet: float = 0.2, limit: float = 10.0) -> None:
    """Until the server's CPU stops moving: its stores finish the writes queued after the last answer."""
    deadline = time.monotonic() + limit
    last = cpu_seconds(pid)
    while time.monotonic() < deadline:
        await asyncio.sleep(quiet)
        now = cpu_seconds(pid)
        if now == last:
            return
        last = now


def machine_speed(folder: Path) -> dict[str, float]:
    """How fast this machine is right now, for comparing runs: the same figures differ by half between runs
    on a shared virtual machine. CPU-ms of a fixed pure-Python loop, and of one fsynced atomic file write
    (what each of a chat's three store writes costs with nothing else running), medians of a few tries."""
    from agentspace.storage.atomic import write_bytes_atomic

    def python_loop() -> None:
        total = 0
        for i in range(200_000):
            total += i % 7

    def file_write() -> None:
        for n in range(50):
            write_bytes_atomic(folder / f"calibration-{n % 5}.json", b"x" * 2000)

    def cpu_ms(fn: Callable[[], None], per: int) -> float:
        runs = []
        for _ in range(5):
            start = time.process_time()
            fn()
            runs.append((time.process_time() - start) * 1000 / per)
        return statistics.median(runs)

    return {"pythonLoopMs": cpu_ms(python_loop, 1), "fsyncedWriteCpuMs": cpu_ms(file_write, 50)}


# --- clients ------------------------------------------------------------------------------------


@dataclass
class Sample:
    ttft: float  # seconds from sending the request to the first text delta
    total: float  # seconds to the end of the stream
    deltas: int = 0  # text deltas received (the clients that check the answer count them)


class ChatFailed(Exception):
    pass


# The streamed Messages request of a direct call (and of floor.py's bare proxy).
DIRECT_BODY = {
    "model": MODEL.split("/", 1)[1],
    "max_tokens": 1024,
    "stream": True,
    "messages": [{"role": "user", "content": "Hello"}],
}
DIRECT_HEADERS = {"x-api-key": "sk-bench", "anthropic-version": "2023-06-01"}


async def direct_chat(http: aiohttp.ClientSession, upstream: str) -> Sample:
    """One streamed Messages call straight to the fake upstream."""
    start = time.perf_counter()
    ttft = None
    async with http.post(f"{upstream}/v1/messages", json=DIRECT_BODY, headers=DIRECT_HEADERS) as resp:
        if resp.status != 200:
            raise ChatFailed(f"HTTP {resp.status}")
        async for line in resp.content:
            if ttft is None and line.startswith(b"data: ") and b'"text_delta"' in line:
                ttft = time.perf_counter() - start
    if ttft is None:
        raise ChatFailed("no text delta")
    return Sample(ttft, time.perf_counter() - start)


class WsClient:
    """One WebSocket connection; chats run on it one after the other (the protocol allows one stream)."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.n = 0

    async def chat(self) -> Sample:
        self.n += 1
        start = time.perf_counter()
        await self.ws.send_str(json.dumps({"type": "chat.send", "id": str(self.n), "content": "Hello"}))
        ttft = None
        text: list[str] = []
        while True:
            msg = await self.ws.receive()
            if msg.type != aiohttp.WSMsgType.TEXT:
                raise ChatFailed(f"socket {msg.type.name}")
            frame = json.loads(msg.data)
            kind = frame["type"]
            if kind == "chat.stream.delta":
                if ttft is None:
                    ttft = time.perf_counter() - start
                text.append(frame["delta"])
            elif kind == "chat.stream.end":
                break
            elif kind == "error":
                raise ChatFailed(f"{frame['code']}: {frame['message']}")
        if ttft is None or "".join(text) != EXPECTED_TEXT:
            raise ChatFailed("wrong answer")
        return Sample(ttft, time.perf_counter() - start, len(text))


async def http_chat(http: aiohttp.ClientSession, gateway: str, headers: dict[str, str]) -> Sample:
    """One ``POST /api/chat`` in a new session, read to ``[DONE]``."""
    chat_id = uuid.uuid4().hex
    body = {"id": chat_id, "messages": [{"id": "u1", "role": "user", "parts": [{"type": "text", "text": "Hello"}]}]}
    start = time.perf_counter()
    ttft = None
    text: list[str] = []
    done = False
    async with http.post(f"{gateway}/api/chat", json=body, headers=headers) as resp:
        if resp.status != 200:
            raise ChatFailed(f"HTTP {resp.status}: {(await resp.text())[:200]}")
        async for line in resp.content:
            if not line.startswith(b"data: "):
                continue
            data = line[6:].strip()
            if data == b"[DONE]":
                done = True
                continue
            chunk = json.loads(data)
            if chunk["type"] == "text-delta":
                if ttft is None:
                    ttft = time.perf_counter() - start
                text.append(chunk["delta"])
            elif chunk["type"] == "error":
                raise ChatFailed(chunk["errorText"])
    if ttft is None or not done or "".join(text) != EXPECTED_TEXT:
        raise ChatFailed("wrong answer")
    return Sample(ttft, time.perf_counter() - start, len(text))


@dataclass
class Phase:
    samples: list[Sample] = field(default_factory=list)
    errors: int = 0
    wall: float = 0.0
    first_error: str | None = None


async def run_phase(workers: list[Callable[[], Awaitable[Sample]]], requests: int, seconds: float) -> Phase:
    """``requests`` chats spread over the workers (one chat at a time each), stopped after ``seconds``."""
    phase = Phase()
    remaining = requests
    deadline = time.monotonic() + seconds

    async def work(chat: Callable[[], Awaitable[Sample]]) -> None:
        nonlocal remaining
        while remaining > 0 and time.monotonic() < deadline:
            remaining -= 1
            try:
                phase.samples.append(await asyncio.wait_for(chat(), CHAT_TIMEOUT))
            except (TimeoutError, ChatFailed, aiohttp.ClientError, ValueError, KeyError) as e:
                phase.errors += 1
                phase.first_error = phase.first_error or f"{type(e).__name__}: {e}"

    start = time.perf_counter()
    await asyncio.gather(*(work(w) for w in workers))
    phase.wall = time.perf_counter() - start
    return phase


def gateway_cli(without_sdk: bool = False) -> tuple[str, ...]:
    """How the gateway's CLI is run: ``python -m agentspace``, or with the SDK-free comparison plugin."""
    return (str(Path(__file__).resolve().parent / "without_sdk.py"),) if without_sdk else ("-m", "agentspace")


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))] if ordered else float("nan")


# --- the benchmark ------------------------------------------------------------------------------


class Bench:
    def __init__(
        self, args: argparse.Namespace, root: Path, code: Path = ROOT, cli: tuple[str, ...] = gateway_cli()
    ) -> None:
        self.args = args
        self.root = root  # scratch: the data directory, config, logs
        self.code = code  # the source tree whose gateway (and fake upstream) runs
        self.cli = cli  # how the gateway's CLI is run (gateway_cli)
        self.plugins = getattr(args, "plugins", "")  # the gateway's AGENTSPACE_LOAD_PLUGINS
        # A model group the chats ask for instead of MODEL (benchmarks/ab.py --b-routed): its TOML table.
        self.routed = getattr(args, "routed", False)
        self.home = root / "home"
        self.procs: list[subprocess.Popen[str]] = []
        self.upstream = ""
        self.gateway = ""
        self.pid = 0
        self.results: dict[str, Any] = {"requestsPerPhase": args.requests, "deltas": DELTAS, "phases": []}
        self.extra_config = ""  # TOML appended to the gateway's config (e.g. a [chat] table)

    def spawn(self, argv: list[str]) -> subprocess.Popen[str]:
        log = open(self.root / f"process-{len(self.procs)}.log", "w")  # the server's log, kept off the table
        proc = subprocess.Popen(
            argv,
            cwd=self.code,
            env=_env(self.home, self.code, self.plugins),
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )
        log.close()
        self.procs.append(proc)
        return proc

    def start_upstream(self) -> None:
        proc = self.spawn([sys.executable, "-m", "tests.fakes.anthropic_upstream", "0", "--deltas", str(DELTAS)])
        self.upstream = read_url(proc, "fake Anthropic upstream", 30)

    async def start_gateway(self) -> None:
        config = self.root / "config.toml"
        # The per-connection message rate limit is raised: one benchmark socket sends hundreds of chats a minute.
        config.write_text(
            f'[server]\nmessages_per_minute = 1000000\n\n[storage]\ndata_dir = "{self.home}"\n\n'
            f'[models]\ndefault = "{ROUTED if self.routed else MODEL}"\n\n'
            f'[providers.anthropic]\nbase_url = "{self.upstream}"\n'
            + (ROUTED_GROUP if self.routed else "")
            + self.extra_config
        )
        serve = [*self.cli, "serve", "--config", str(config), "--port", "0"]
        profile = self.args.profile
        if profile is None:
            argv = [sys.executable, *serve]
        elif profile.endswith(".prof"):
            argv = [sys.executable, "-m", "cProfile", "-o", profile, *serve]
        else:
            argv = [sys.executable, "-m", "pyinstrument", "--renderer", "html", "-o", profile + ".html", *serve]
        started = time.perf_counter()
        proc = self.spawn(argv)
        self.gateway = await asyncio.to_thread(read_url, proc, "agentspace listening", 30)
        async with aiohttp.ClientSession() as http:
            while True:
                try:
                    async with http.get(f"{self.gateway}/healthz") as resp:
                        if resp.status == 200:
                            break
                except aiohttp.ClientError:
                    await asyncio.sleep(0.005)
        self.results["serverStartSeconds"] = time.perf_counter() - started
        self.pid = proc.pid

    async def run(self) -> None:
        from agentspace.gateway_token import load_or_create_token

        self.results["machine"] = machine_speed(self.root)
        self.start_upstream()
        await self.start_gateway()
        token = load_or_create_token(self.home)
        headers = {"Authorization": f"Bearer {token}"}
        connector = aiohttp.TCPConnector(limit=0, force_close=False)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as http:
            # The first chat imports the provider SDK and opens the upstream connection pool: timed apart.
            start = time.perf_counter()
            await http_chat(http, self.gateway, headers)
            self.results["firstChatSeconds"] = time.perf_counter() - start
            await run_phase([lambda: http_chat(http, self.gateway, headers)] * 10, 100, PHASE_SECONDS)
            await wait_idle(self.pid)
            for concurrency in CONCURRENCY:
                direct = await run_phase(
                    [lambda: direct_chat(http, self.upstream)] * concurrency, self.args.requests, PHASE_SECONDS
                )
                sockets = [
                    WsClient(await http.ws_connect(f"{self.gateway}/gateway", headers=headers, max_msg_size=0))
                    for _ in range(concurrency)
                ]
                await self.measure("ws", concurrency, direct, [s.chat for s in sockets])
                for s in sockets:
                    await s.ws.close()
                await self.measure(
                    "http", concurrency, direct, [lambda: http_chat(http, self.gateway, headers)] * concurrency
                )
            if self.args.soak:
                await self.soak(http, headers)
        await self.usage_cli()

    async def measure(
        self, transport: str, concurrency: int, direct: Phase, workers: list[Callable[[], Awaitable[Sample]]]
    ) -> None:
        await wait_idle(self.pid)
        cpu, threads = cpu_seconds(self.pid), thread_cpu_seconds(self.pid)
        phase = await run_phase(workers, self.args.requests, PHASE_SECONDS)
        await wait_idle(self.pid)
        cpu = cpu_seconds(self.pid) - cpu
        # Where it went: the event loop's thread (the process's main thread) and the others (the stores'
        # thread, mostly), user and system time.
        split = {"loopUser": 0.0, "loopSystem": 0.0, "otherUser": 0.0, "otherSystem": 0.0}
        for tid, (user, system) in thread_cpu_seconds(self.pid).items():
            user0, system0 = threads.get(tid, (0.0, 0.0))
            where = "loop" if tid == self.pid else "other"
            split[where + "User"] += user - user0
            split[where + "System"] += system - system0
        ttft = [s.ttft for s in phase.samples]
        direct_ttft = [s.ttft for s in direct.samples]
        done = len(phase.samples)
        self.results["phases"].append(
            {
                "transport": transport,
                "concurrency": concurrency,
                "chats": done,
                "errors": phase.errors,
                "firstError": phase.first_error,
                "addedTtftMs": {f"p{p}": (pct(ttft, p) - pct(direct_ttft, p)) * 1000 for p in (50, 95, 99)},
                "ttftMs": {f"p{p}": pct(ttft, p) * 1000 for p in (50, 95, 99)},
                "directTtftMs": {f"p{p}": pct(direct_ttft, p) * 1000 for p in (50, 95, 99)},
                "streamMsP50": pct([s.total for s in phase.samples], 50) * 1000,
                "requestsPerSecond": done / phase.wall if phase.wall else 0.0,
                "cpuMsPerChat": cpu * 1000 / done if done else float("nan"),
                "cpuMsPerChatByThread": {k: v * 1000 / done for k, v in split.items()} if done else {},
                "peakRssMiB": memory_mib(self.pid, "VmHWM"),
            }
        )

    async def soak(self, http: aiohttp.ClientSession, headers: dict[str, str]) -> None:
        sockets = [WsClient(await http.ws_connect(f"{self.gateway}/gateway", headers=headers)) for _ in range(10)]
        phase = await run_phase([s.chat for s in sockets], self.args.soak, SOAK_SECONDS)
        for s in sockets:
            await s.ws.close()
        await wait_idle(self.pid)
        self.results["soak"] = {
            "chats": len(phase.samples),
            "errors": phase.errors,
            "rssMiB": memory_mib(self.pid, "VmRSS"),
            "peakRssMiB": memory_mib(self.pid, "VmHWM"),
        }

    async def usage_cli(self) -> None:
        """A cold ``agentspace usage --by-model`` (a new process) over 100k records in segments of the store's size."""
        from agentspace.storage.embedded.usage import SEGMENT_SIZE, write_log_segment

        home = self.root / "usage-home"
        rng = random.Random(7)
        day = time.strftime("%Y-%m-%d", time.gmtime())
        models = (MODEL, "anthropic/claude-haiku-4-5", "openai/gpt-4o", "gemini/gemini-2.5-pro")
        for number in range(USAGE_RECORDS // SEGMENT_SIZE):
            write_log_segment(home, day, number, [_usage_record(rng, models, day) for _ in range(SEGMENT_SIZE)])
        runs = []
        for _ in range(3):
            start = time.perf_counter()
            done = subprocess.run(
                [sys.executable, "-m", "agentspace", "usage", "--by-model"],
                env=_env(home, self.code),
                cwd=self.code,
                capture_output=True,
                text=True,
                timeout=120,
            )
            runs.append(time.perf_counter() - start)
            if done.returncode != 0 or f"{USAGE_RECORDS:,}" not in done.stdout:
                raise RuntimeError(f"agentspace usage failed: {done.stderr[-500:] or done.stdout[-500:]}")
        self.results["usageByModelSeconds"] = {"first": runs[0], "median": statistics.median(runs)}

    def stop(self) -> None:
        for proc in reversed(self.procs):
            _stop(proc)


def _usage_record(rng: random.Random, models: tuple[str, ...], day: str) -> dict[str, Any]:
    inp, out = rng.randint(100, 20_000), rng.randint(10, 4_000)
    return {
        "id": f"usage_{rng.getrandbits(64):016x}",
        "timestamp": f"{day}T12:00:00.000Z",
        "model": rng.choice(models),
        "provider": "bench",
        "sessionId": f"s_{rng.randrange(10_000)}",
        "client": "ws",
        "inputTokens": inp,
        "outputTokens": out,
        "cacheReadTokens": 0,
        "cacheWriteTokens": 0,
        "reasoningTokens": 0,
        "totalTokens": inp + out,
        "inputCost": inp * 3e-6,
        "outputCost": out * 15e-6,
        "totalCost": inp * 3e-6 + out * 15e-6,
        "latencyMs": 812.5,
        "finishReason": "stop",
        "estimated": False,
        "priceKnown": True,
    }


def _split(phase: dict[str, Any], where: str) -> str:
    """ "user+system" CPU-ms per chat of the loop's thread or of the other threads."""
    by = phase["cpuMsPerChatByThread"]
    return f"{by[where + 'User']:.1f}+{by[where + 'System']:.1f}" if by else "-"


def print_table(results: dict[str, Any]) -> None:
    if results.get("withoutSdk"):
        print(
            "--without-sdk: the gateway's Anthropic calls are plain aiohttp requests, not the SDK's (for comparison)\n"
        )
    headers = (
        "transport",
        "conc",
        "chats",
        "errors",
        "+TTFT p50",
        "p95",
        "p99",
        "stream p50",
        "req/s",
        "CPU-ms/chat",
        "loop",
        "store",
        "peak RSS",
    )
    rows = [headers]
    for p in results["phases"]:
        added = p["addedTtftMs"]
        rows.append(
            (
                p["transport"],
                str(p["concurrency"]),
                str(p["chats"]),
                str(p["errors"]),
                f"{added['p50']:.2f} ms",
                f"{added['p95']:.2f} ms",
                f"{added['p99']:.2f} ms",
                f"{p['streamMsP50']:.2f} ms",
                f"{p['requestsPerSecond']:.0f}",
                f"{p['cpuMsPerChat']:.2f}",
                _split(p, "loop"),
                _split(p, "other"),
                f"{p['peakRssMiB']:.0f} MiB",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(headers))]
    for i, row in enumerate(rows):
        print("  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths))))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    print()
    print(
        f"direct upstream TTFT p50 at concurrency 1: {results['phases'][0]['directTtftMs']['p50']:.2f} ms "
        f"(+TTFT = gateway TTFT minus direct TTFT, same client, same concurrency; {DELTAS} deltas per chat)"
    )
    print(
        "CPU-ms/chat is the server process's; loop and store split it (user+system) between the event loop's"
        " thread and the others (the stores' thread: fsynced writes)"
    )
    if "machine" in results:
        m = results["machine"]
        print(
            f"this machine now: a fixed Python loop {m['pythonLoopMs']:.1f} CPU-ms, an fsynced atomic write "
            f"{m['fsyncedWriteCpuMs']:.2f} CPU-ms (compare runs by these)"
        )
    print(
        f"server start (spawn to /healthz): {results['serverStartSeconds'] * 1000:.0f} ms; "
        f"first chat (loads the provider SDK): {results['firstChatSeconds'] * 1000:.0f} ms"
    )
    if "soak" in results:
        s = results["soak"]
        print(
            f"after {s['chats']:,} chats ({s['errors']} errors): RSS {s['rssMiB']:.0f} MiB, peak {s['peakRssMiB']:.0f} MiB"
        )
    u = results["usageByModelSeconds"]
    print(
        f"agentspace usage --by-model, {USAGE_RECORDS:,} records, new process: "
        f"{u['first'] * 1000:.0f} ms first run, {u['median'] * 1000:.0f} ms median of 3"
    )
    for p in results["phases"]:
        if p["firstError"]:
            print(f"first error ({p['transport']}, concurrency {p['concurrency']}): {p['firstError']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, help="chats per phase (default 500; 100 with --quick)")
    parser.add_argument("--soak", type=int, help="chats before measuring RSS (default 2000; 300 with --quick; 0: skip)")
    parser.add_argument("--quick", action="store_true", help="fewer chats per phase, a short soak")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument(
        "--profile", metavar="FILE", help="profile the server: pyinstrument (FILE.html) or cProfile (*.prof)"
    )
    parser.add_argument(
        "--without-sdk",
        action="store_true",
        help="the gateway's Anthropic calls without the SDK (benchmarks/without_sdk.py), for comparison",
    )
    parser.add_argument(
        "--plugins", default="", help="AGENTSPACE_LOAD_PLUGINS of the gateway (default: none), e.g. metrics"
    )
    args = parser.parse_args()
    if args.requests is None:
        args.requests = 100 if args.quick else 500
    if args.soak is None:
        args.soak = 300 if args.quick else 2000
    root = Path(tempfile.mkdtemp(prefix="agentspace-bench-"))
    bench = Bench(args, root, cli=gateway_cli(args.without_sdk))
    bench.results["withoutSdk"] = args.without_sdk
    try:
        asyncio.run(bench.run())
    finally:
        bench.stop()
        shutil.rmtree(root, ignore_errors=True)
    if args.json:
        print(json.dumps(bench.results, indent=2))
    else:
        print_table(bench.results)


if __name__ == "__main__":
    main()
