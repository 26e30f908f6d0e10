"""A server's first call may come while its start-up threads still import the Anthropic SDK and load tiktoken's
encoding (seconds on a loaded machine). That call waits for them off the event loop: meanwhile other requests
are served (``/healthz`` here; on replicas, the stream locks' renewals too), where an ``import`` on the loop
would have stopped everything until the import ended."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp

from scripts.harness import GatewayProcess
from tests.fakes import anthropic_upstream as fa
from tests.support.ws import chat, of

# Runs the CLI with an import hook that holds the import of the SDK and of tiktoken (in whichever thread asks)
# until the test creates the gate file: the slow imports of a loaded machine, made as slow as the test needs.
HELD_IMPORTS = """
import importlib.machinery, os, sys, time
GATE = sys.argv.pop(1)
class HeldLoader:
    def __init__(self, real):
        self.real = real
    def __getattr__(self, name):
        return getattr(self.real, name)
    def create_module(self, spec):
        return self.real.create_module(spec)
    def exec_module(self, module):  # under the module's own lock only, as a slow import runs
        while not os.path.exists(GATE):
            time.sleep(0.02)
        self.real.exec_module(module)
class HoldImports:
    def find_spec(self, name, path=None, target=None):
        if name not in ("anthropic", "tiktoken"):
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None:
            spec.loader = HeldLoader(spec.loader)
        return spec
sys.meta_path.insert(0, HoldImports())
from agentspace.cli import main
sys.argv[0] = "agentspace"
main()
"""


async def test_the_first_call_waits_for_the_sdk_off_the_event_loop(
    tmp_path: Path, fake_anthropic: fa.FakeAnthropic
) -> None:
    gate = tmp_path / "imports-may-go"
    server = GatewayProcess(tmp_path / "data", fake_anthropic.url)
    server.launch = ["-c", HELD_IMPORTS, str(gate)]
    try:
        await server.start()
        async with aiohttp.ClientSession() as http:
            ws = await http.ws_connect(server.ws_url, headers={"Authorization": f"Bearer {server.token}"})
            first = asyncio.ensure_future(chat(ws, "Hi"))
            try:
                await asyncio.sleep(0.5)  # the turn is under way, held at the SDK's import
                assert not first.done()
                # Served while the first call waits: the event loop is not held by the import.
                async with http.get(server.url + "/healthz", timeout=aiohttp.ClientTimeout(total=20)) as resp:
                    assert resp.status == 200
                assert not gate.exists() and not first.done()
            finally:
                gate.touch()
            frames = await asyncio.wait_for(first, 60)
            assert frames[-1]["type"] == "chat.stream.end", frames
            assert "".join(f["delta"] for f in of(frames, "chat.stream.delta")) == fa.DEFAULT_TEXT
            await ws.close()
        assert len(fake_anthropic.requests) == 1
    finally:
        await server.aclose()
