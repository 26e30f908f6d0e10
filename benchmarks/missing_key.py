"""How long a missing provider key takes to answer, on a fresh ``agentspace serve`` that never imported litellm.

    python benchmarks/missing_key.py [--requests N]

Starts the gateway (scripts/harness.py: no provider keys but Anthropic's, so no background import of
litellm) and, for each model below, sends ``--requests`` calls to ``/v1/chat/completions`` and as many
``chat.send`` frames over one WebSocket, each answered ``NO_API_KEY`` (424). Prints the latency per model and
route (first call, median, p95, max, in ms) and whether the server's log shows an import of litellm (the
litellm provider logs each one it makes on the request path). The first call of each model is the one that
used to import litellm (seconds). Measured once the server is idle after its start (scripts/body_attack.py).
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
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scripts.body_attack import settled  # noqa: E402
from scripts.harness import GatewayProcess  # noqa: E402

MODELS = (
    "openai/gpt-4o-mini",
    "groq/openai/gpt-oss-120b",
    "mistral/mistral-small-latest",
    "deepseek/deepseek-chat",
    "together_ai/meta-llama/Llama-3.3-70B-Instruct-Turbo",
    "openrouter/openai/gpt-4o-mini",
    "cohere/command-r-08-2024",
    "xai/grok-4.20-0309-reasoning",
    "perplexity/sonar",
    "fireworks_ai/accounts/fireworks/models/deepseek-r1",
)


def summary(times: list[float]) -> str:
    ms = sorted(t * 1000 for t in times)
    p95 = ms[min(len(ms) - 1, int(len(ms) * 0.95))]
    return (
        f"first {ms and times[0] * 1000:7.1f}  median {statistics.median(ms):6.1f}  p95 {p95:6.1f}  max {ms[-1]:6.1f}"
    )


async def run(requests: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        gateway = GatewayProcess(Path(tmp) / "data", "http://127.0.0.1:9")  # no Anthropic call is made
        await gateway.start()
        try:
            assert gateway.process is not None
            await settled(gateway.process.pid)  # start-up's background import of the Anthropic SDK done
            print(f"load average {os.getloadavg()[0]:.1f}")
            headers = {"Authorization": f"Bearer {gateway.token}"}
            async with aiohttp.ClientSession() as http:
                for model in MODELS:
                    body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
                    http_times: list[float] = []
                    for _ in range(requests):
                        started = time.perf_counter()
                        async with http.post(gateway.url + "/v1/chat/completions", json=body, headers=headers) as r:
                            await r.read()
                            assert r.status == 424, (model, r.status)
                        http_times.append(time.perf_counter() - started)
                    ws_times: list[float] = []
                    async with http.ws_connect(gateway.ws_url, headers=headers) as ws:
                        for i in range(requests):
                            started = time.perf_counter()
                            await ws.send_json({"type": "chat.send", "id": str(i), "content": "hi", "model": model})
                            frame = json.loads((await ws.receive(timeout=60)).data)
                            assert frame.get("code") == "NO_API_KEY", frame
                            ws_times.append(time.perf_counter() - started)
                    print(f"{model:52} /v1/chat/completions {summary(http_times)}")
                    print(f"{'':52} WebSocket            {summary(ws_times)}")
            imported = [line for line in gateway.log().splitlines() if "litellm imported" in line]
            print("litellm imported by the server:", imported or "no")
        finally:
            await gateway.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20)
    args = parser.parse_args()
    asyncio.run(run(args.requests))


if __name__ == "__main__":
    main()
