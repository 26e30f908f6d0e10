"""The large-body attack on a real ``agentspace serve``: N concurrent ``/v1/chat/completions`` bodies of
MiB mebibytes each, ``{"model": ..., "messages": [{},{},...]}``, from a client whose model is not allowed,
while ``/healthz`` is polled every 20 ms. Prints the slowest ``/healthz`` answer (and the slowest with no
attack, the machine's own noise), the server's CPU time during the attack (its event loop's thread and all),
the load average, the server's RSS growth and the attack's statuses, as JSON.

    python scripts/body_attack.py [--bodies 8] [--mib 32] [--gzip MIB --path /api/chat]

``--gzip MIB``: each body is instead MIB mebibytes of text sent gzip-compressed (``Content-Encoding: gzip``,
about 1 MB on the wire for 1000 MiB), to ``--path``.

The measures start once the server is idle after its start (``settled``): the Anthropic SDK it imports in
the background then holds the interpreter lock, which a fresh server's ``/healthz`` feels whatever the load.

Goal: ``healthz_max_ms`` under 100 and ``rss_growth_mb`` under 300 (docs: README, Hardening scripts).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
import zlib
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scripts.harness import GatewayProcess, child_env
from tests.fakes.anthropic_upstream import FakeAnthropic


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def cpu_ms(pid: int) -> tuple[float, float]:
    """The server's CPU time (user + system, ms): its event loop's thread (the main one), and all its threads."""
    ticks = os.sysconf("SC_CLK_TCK")

    def of(stat: Path) -> float:
        fields = stat.read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) * 1000 / ticks

    return of(Path(f"/proc/{pid}/task/{pid}/stat")), of(Path(f"/proc/{pid}/stat"))


async def settled(pid: int, timeout: float = 60.0) -> None:
    """Wait until the server is idle: under 5 ms of CPU in each of three 200 ms windows in a row."""
    deadline, quiet = time.monotonic() + timeout, 0
    last = cpu_ms(pid)[1]
    while quiet < 3 and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        now = cpu_ms(pid)[1]
        quiet, last = (quiet + 1 if now - last < 5 else 0), now


def attack_body(mib: int) -> bytes:
    head, tail = b'{"model":"anthropic/claude-sonnet-4-5","messages":[', b"]}"
    n = (mib * 1024 * 1024 - len(head) - len(tail)) // 3 - 1  # just under the size limit
    return head + b"{}," * n + b"{}" + tail


def gzip_body(mib: int) -> bytes:
    """``mib`` MiB of JSON text, gzip-compressed piece by piece (about 1 KB per MiB)."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)  # 31: the gzip container
    head = b'{"id":"s1","model":"anthropic/claude-sonnet-4-5","messages":[{"role":"user","content":"'
    out = [packer.compress(head)]
    out += [packer.compress(b"a" * (1 << 20)) for _ in range(mib)]
    out += [packer.compress(b'"}]}'), packer.flush()]
    return b"".join(out)


async def run(bodies: int, mib: int, gzipped: int = 0, path: str = "/v1/chat/completions") -> dict[str, object]:
    upstream = FakeAnthropic()
    await upstream.start()
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "data"
        gateway = GatewayProcess(data_dir, upstream.url)
        try:
            await gateway.start()
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "agentspace",
                "clients",
                "add",
                "mallory",
                "--models",
                "openai/gpt-4o-mini",
                stdout=asyncio.subprocess.PIPE,
                env=child_env(data_dir),
            )
            key = (await proc.communicate())[0].decode().strip()
            assert gateway.process is not None
            pid = gateway.process.pid
            await settled(pid)  # start-up's background imports (the SDK) done: they would hold the GIL
            async with aiohttp.ClientSession() as http:
                idle: list[float] = []  # the machine's own noise: /healthz with no attack
                for _ in range(50):
                    started = time.perf_counter()
                    async with http.get(gateway.url + "/healthz") as resp:
                        await resp.read()
                    idle.append((time.perf_counter() - started) * 1000)
                    await asyncio.sleep(0.02)
                before = rss_mb(pid)
                peak = before
                loop_cpu, all_cpu = cpu_ms(pid)
                attack_started = time.perf_counter()
                latencies: list[float] = []
                done = asyncio.Event()

                async def poll() -> None:
                    nonlocal peak
                    while not done.is_set():
                        started = time.perf_counter()
                        async with http.get(gateway.url + "/healthz") as resp:
                            await resp.read()
                        latencies.append((time.perf_counter() - started) * 1000)
                        peak = max(peak, rss_mb(pid))
                        await asyncio.sleep(0.02)

                poller = asyncio.create_task(poll())
                # The attack runs in a process of its own: writing 256 MiB must not delay our own polls.
                attacker = await asyncio.create_subprocess_exec(
                    sys.executable,
                    __file__,
                    "--send",
                    gateway.url,
                    key,
                    "--bodies",
                    str(bodies),
                    "--mib",
                    str(mib),
                    "--gzip",
                    str(gzipped),
                    "--path",
                    path,
                    stdout=asyncio.subprocess.PIPE,
                )
                statuses = json.loads((await attacker.communicate())[0])
                attack_ms = (time.perf_counter() - attack_started) * 1000
                loop_cpu, all_cpu = (after - earlier for after, earlier in zip(cpu_ms(pid), (loop_cpu, all_cpu)))
                await asyncio.sleep(0.3)
                done.set()
                await poller
                peak = max(peak, rss_mb(pid))
        finally:
            await gateway.aclose()
            await upstream.close()
    return {
        "bodies": bodies,
        "mib": mib,
        "gzip_mib": gzipped,
        "path": path,
        "statuses": sorted(statuses),
        "healthz_max_ms": round(max(latencies), 1),
        "healthz_p50_ms": round(statistics.median(latencies), 1),
        "healthz_p95_ms": round(statistics.quantiles(latencies, n=20)[-1], 1),
        "healthz_idle_max_ms": round(max(idle[5:]), 1),
        "healthz_samples": len(latencies),
        "attack_ms": round(attack_ms),
        "server_loop_cpu_ms": round(loop_cpu),  # the event loop's thread: what could have delayed /healthz
        "server_cpu_ms": round(all_cpu),
        "load_average": os.getloadavg()[0],
        "rss_before_mb": round(before, 1),
        "rss_growth_mb": round(peak - before, 1),
    }


async def send(url: str, key: str, bodies: int, mib: int, gzipped: int, path: str) -> list[int]:
    body = gzip_body(gzipped) if gzipped else attack_body(mib)
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    if gzipped:
        headers["Content-Encoding"] = "gzip"
    async with aiohttp.ClientSession() as http:

        async def one() -> int:
            try:
                async with http.post(url + path, data=body, headers=headers) as r:
                    await r.read()
                    return r.status
            except aiohttp.ClientError:
                return -1  # the connection closed under the upload

        return sorted(await asyncio.gather(*(one() for _ in range(bodies))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bodies", type=int, default=8)
    parser.add_argument("--mib", type=int, default=32)
    parser.add_argument("--gzip", type=int, default=0, metavar="MIB")
    parser.add_argument("--path", default="/v1/chat/completions")
    parser.add_argument("--send", nargs=2, metavar=("URL", "KEY"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.send:
        print(json.dumps(asyncio.run(send(*args.send, args.bodies, args.mib, args.gzip, args.path))))
        return
    print(json.dumps(asyncio.run(run(args.bodies, args.mib, args.gzip, args.path))))


if __name__ == "__main__":
    main()
