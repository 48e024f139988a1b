"""The proxy's own cost per relayed token, in front of a minimal upstream that streams as fast as it can.

    python bench/gateway_cost.py --concurrency 8 32 --requests 128 --tokens 250

Three real processes on this machine: the upstream (a tiny ASGI app that streams `--tokens` chat
chunks per request, reasoning first, one token per event), and two gateways in front of it
(`safethink serve --engine upstream`), one with steering off and one with the defaults (and with
`--workers N`, a third: the defaults with N worker processes). Each route
gets the same requests, interleaved route by route. Reported per route:
- CPU seconds of the serving process (utime + stime from /proc) per relayed token, and those of its
  main thread alone: the event loop, which does all of the gateway's own work (the scorer's forwards
  run in their own threads);
- text events per request, against the upstream's own;
- time to first text p50 / p99, and what the gateway adds to the direct route; with steering on, the
  scoring wait p50 and p99 of the first step and the p50 of every judged step (from the response's steering record):
  the rest of the added time is the first step's generation, held back until it is whole;
- with steering on, the scorer's forward time from the gateway's metrics, reported apart.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.support.servers import free_port  # noqa: E402  the same port helper the tests use

T = TypeVar("T")
WORDS = ["First", " we", " look", " at", " the", " numbers", " and", " add", " them", " up", "."]


def upstream_app(tokens: int, reasoning_tokens: int, token_ms: float = 0.0):  # type: ignore[no-untyped-def]
    """A minimal OpenAI-style streaming server: no model, no framework, as fast as it can go (or a
    token every `token_ms`, as a model decodes)."""

    def event(delta: dict[str, str], finish: str | None = None) -> bytes:
        chunk = {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "m",
                 "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        return b"data: " + json.dumps(chunk).encode() + b"\n\n"

    usage = json.dumps({"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "m", "choices": [],
                        "usage": {"prompt_tokens": 10, "completion_tokens": tokens, "total_tokens": tokens + 10}}).encode()
    # Steps of 24 tokens: a paragraph break ends each one, as reasoning models write. Each step opens
    # with the request's number, so that no request's steps are in the scorer's cache.
    pieces = [("\n\n" if i % 24 == 23 else WORDS[i % len(WORDS)]) for i in range(tokens)]
    body = [event({"reasoning_content": p} if i < reasoning_tokens else {"content": p}) for i, p in enumerate(pieces)]
    body[-1] = event({"content": pieces[-1]}, "stop")
    step_starts = [i for i in range(tokens - 1) if i % 24 == 0]
    served = 0
    models = json.dumps({"object": "list", "data": [{"id": "m", "object": "model", "owned_by": "bench"}]}).encode()

    async def app(scope, receive, send):  # type: ignore[no-untyped-def]
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body"):
            pass
        if scope["path"].endswith("/models"):
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": models})
            return
        if not scope["path"].endswith("/chat/completions"):
            await send({"type": "http.response.start", "status": 404, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        nonlocal served
        served += 1
        number = served
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        numbered = list(body)
        for i in step_starts:
            numbered[i] = event({"reasoning_content" if i < reasoning_tokens else "content": f"Request {number}: {pieces[i]}"})
        started = asyncio.get_running_loop().time()
        for i, chunk in enumerate(numbered):
            if token_ms:
                await asyncio.sleep(max(0.0, started + i * token_ms / 1000 - asyncio.get_running_loop().time()))
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"data: " + usage + b"\n\ndata: [DONE]\n\n", "more_body": False})

    return app


def serve_upstream(port: int, tokens: int, reasoning_tokens: int, token_ms: float) -> None:
    import uvicorn

    uvicorn.run(upstream_app(tokens, reasoning_tokens, token_ms), host="127.0.0.1", port=port, log_level="warning")


def start(command: list[str], health: str, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """A server process (with `env` added to this one's environment), once `health` answers; stopped
    again if it never does."""
    with log.open("w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    deadline = time.monotonic() + 300
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{command} exited:\n{log.read_text()[-2000:]}")
            try:
                if httpx.get(health, timeout=1).status_code == 200:
                    return proc
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{command} did not start:\n{log.read_text()[-2000:]}")
            time.sleep(0.3)
    except BaseException:
        proc.kill()
        proc.wait()
        raise


def stop_all(procs: Iterable[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        proc.terminate()
        proc.wait(timeout=30)


def _stat_cpu(stat: Path) -> float:
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> tuple[float, float]:
    """utime + stime of a process and every process under it (the workers of `serve --workers N`):
    (all threads, main threads only). A gateway's main thread runs its event loop, which does all of
    its own work; the scorer's forwards (and torch's threads) run in other threads."""
    total, main = _stat_cpu(Path(f"/proc/{pid}/stat")), _stat_cpu(Path(f"/proc/{pid}/task/{pid}/stat"))
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            child_total, child_main = cpu_seconds(int(child))
            total, main = total + child_total, main + child_main
    return total, main


def scorer_seconds(base: str) -> float:
    """The scorer's forward time so far (judging and warming), from a gateway's metrics (0 for a server without them)."""
    response = httpx.get(base.removesuffix("/v1") + "/metrics", timeout=10)
    if response.status_code != 200:
        return 0.0
    text = response.text
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith(("safethink_scorer_latency_seconds_sum", "safethink_scorer_warm_seconds_total")))


REQUESTS = itertools.count()


STAGGER = random.Random(0)


async def one(client: httpx.AsyncClient, base: str, stagger_ms: float = 0.0) -> tuple[float, int, list[float]]:
    """(TTFT ms, text events, each judged step's scoring wait in ms) of one streamed request. With
    `stagger_ms`, the request pauses up to that long first, so that paced streams do not all write
    their steps in the same instant (requests that arrive at random do not); only the first streams
    pause, and the later ones, which start as others end, stay out of step."""
    if stagger_ms:
        await asyncio.sleep(STAGGER.uniform(0, stagger_ms / 1000))
    prompt = f"Add the numbers of list {next(REQUESTS)}."  # no two requests share a context in the scorer's cache
    body = {"model": "m", "messages": [{"role": "user", "content": prompt}], "stream": True, "max_tokens": 4096}
    started, ttft, events, scoring = time.perf_counter(), None, 0, []
    async with client.stream("POST", base + "/chat/completions", json=body) as response:
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            delta = (chunk.get("choices") or [{}])[0].get("delta") or {}
            if delta.get("content") or delta.get("reasoning_content"):
                events += 1
                ttft = ttft if ttft is not None else time.perf_counter() - started
            scoring += [step["score_ms"] for step in (chunk.get("safethink") or {}).get("steps", [])]
    return (ttft or 0.0) * 1000, events, scoring


@dataclass
class Measured(Generic[T]):
    results: list[T]
    wall_s: float
    cpu_s: float  # of the serving process tree
    loop_cpu_s: float  # of its main threads: the event loops, where all but the scorer's forwards run
    scorer_s: float  # the scorer's forward time, from the server's metrics


async def measure(base: str, pid: int, concurrency: int, requests: int,
                  one_request: Callable[[httpx.AsyncClient], Awaitable[T]],
                  warm_up: Callable[[httpx.AsyncClient], Awaitable[object]] | None = None) -> Measured[T]:
    """`requests` calls of `one_request`, `concurrency` at a time, with the serving process's time;
    a warm-up call first (`warm_up`, else `one_request`: connections, the scorer's first forward) is
    left out of every figure."""
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=concurrency)) as client:
        await (warm_up or one_request)(client)
        gate = asyncio.Semaphore(concurrency)

        async def bounded() -> T:
            async with gate:
                return await one_request(client)

        (cpu, loop_cpu), scored, t = cpu_seconds(pid), scorer_seconds(base), time.perf_counter()
        results = await asyncio.gather(*(bounded() for _ in range(requests)))
        wall, (cpu_end, loop_cpu_end) = time.perf_counter() - t, cpu_seconds(pid)
        return Measured(list(results), wall, cpu_end - cpu, loop_cpu_end - loop_cpu, scorer_seconds(base) - scored)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def main(args: argparse.Namespace) -> None:
    logs = Path("/tmp")
    up_port, off_port, on_port = free_port(), free_port(), free_port()
    url = f"http://127.0.0.1:{up_port}/v1"

    def gateway(port: int, *flags: str) -> subprocess.Popen[bytes]:
        command = [sys.executable, "-m", "safethink_server.cli", "serve", "--engine", "upstream", "--upstream-url", url,
                   "--upstream-mode", "chat", "--port", str(port), "--log-level", "warning", *flags]
        return start(command, f"http://127.0.0.1:{port}/health", logs / f"gateway-cost-{port}.log")

    procs: dict[str, subprocess.Popen[bytes]] = {}
    bases = {"direct": url, "steering off": f"http://127.0.0.1:{off_port}/v1", "steering on": f"http://127.0.0.1:{on_port}/v1"}
    try:
        procs["direct"] = start([sys.executable, __file__, "--serve-upstream", str(up_port), "--tokens", str(args.tokens),
                                 "--reasoning-tokens", str(args.reasoning_tokens), "--token-ms", str(args.token_ms)], f"http://127.0.0.1:{up_port}/v1/models",
                                logs / f"gateway-cost-upstream-{up_port}.log")
        procs["steering off"] = gateway(off_port, "--early-steps", "0")
        procs["steering on"] = gateway(on_port)
        if args.no_warm_route:
            port = free_port()
            procs["on, no warming"] = gateway(port, "--no-scorer-warm")
            bases["on, no warming"] = f"http://127.0.0.1:{port}/v1"
        if args.workers > 1:
            port = free_port()
            route = f"on, {args.workers} workers"
            procs[route] = gateway(port, "--workers", str(args.workers))
            bases[route] = f"http://127.0.0.1:{port}/v1"
        print(f"{args.requests} requests of {args.tokens} tokens, a token every {args.token_ms} ms; CPU of the process serving each route")
        print(f"{'streams':>7} {'route':18} {'CPU µs/token':>13} {'event loop':>11} {'events/req':>11} {'ttft p50':>9} "
              f"{'ttft p99':>9} {'added p50':>10} {'1st step p50/p99':>17} {'step scoring':>13} {'tok/s':>8} {'scorer s':>9}")
        for concurrency in args.concurrency:
            direct_p50 = None
            for route, base in bases.items():
                run = await measure(base, procs[route].pid, concurrency, args.requests, lambda client, base=base, first=itertools.count(): one(client, base, args.stagger_ms if next(first) <= concurrency else 0))
                ttfts, events = [r[0] for r in run.results], [r[1] for r in run.results]
                scoring = [r[2] for r in run.results if r[2]]
                wall, cpu, loop_cpu, scored = run.wall_s, run.cpu_s, run.loop_cpu_s, run.scorer_s
                relayed = args.requests * args.tokens
                p50 = statistics.median(ttfts)
                direct_p50 = p50 if direct_p50 is None else direct_p50
                firsts = [r[0] for r in scoring]
                first = f"{statistics.median(firsts):8.1f} /{pct(firsts, 0.99):7.1f}" if scoring else f"{'':17}"
                every = f"{statistics.median(ms for r in scoring for ms in r):13.1f}" if scoring else f"{'':13}"
                print(f"{concurrency:7} {route:18} {cpu / relayed * 1e6:13.1f} {loop_cpu / relayed * 1e6:11.1f} "
                      f"{statistics.mean(events):11.1f} {p50:9.1f} {pct(ttfts, 0.99):9.1f} {p50 - direct_p50:+10.1f} "
                      f"{first} {every} {relayed / wall:8.0f} {scored:9.2f}")
    finally:
        stop_all(procs.values())


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--concurrency", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--requests", type=int, default=256, help="enough for CPU ticks (10 ms) not to matter")
    parser.add_argument("--tokens", type=int, default=250, help="tokens the upstream streams per request")
    parser.add_argument("--workers", type=int, default=1, help="also a steered gateway with this many worker processes")
    parser.add_argument("--reasoning-tokens", type=int, default=150, help="of which reasoning")
    parser.add_argument("--token-ms", type=float, default=0.0, help="the upstream streams a token every this many ms (0: at once)")
    parser.add_argument("--stagger-ms", type=float, default=0.0, help="each request waits a random time up to this before it is sent")
    parser.add_argument("--no-warm-route", action="store_true", help="also a steered gateway whose scorer does not warm contexts")
    parser.add_argument("--serve-upstream", type=int, metavar="PORT", help=argparse.SUPPRESS)
    cli = parser.parse_args()
    if cli.serve_upstream:
        serve_upstream(cli.serve_upstream, cli.tokens, cli.reasoning_tokens, cli.token_ms)
    else:
        asyncio.run(main(cli))
