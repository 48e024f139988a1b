"""The in-process server's own cost per token: the steering loop, output processing and SSE, with the
model taken out of the measurement.

    python bench/loop_cost.py --concurrency 8 32 --requests 64 --tokens 256

The server is the real app (`create_app`) with the real SmolLM2 tokenizer, the real probe scorer and
the real HTTP stack, in its own process; only the engine is replaced, by one that replays tokenized
text through the engine contract the way vLLM hands tokens out:
- `--step-ms 0`: one token per `next_tokens` call, at once (the loop is the only work);
- `--step-ms N`: one token per sequence every N ms, as a continuously batched engine decodes, and a
  call returns every token decoded since the last one (vLLM's delta outputs).

Reported per route (steering off: --early-steps 0; steering on: the defaults), side by side in one run:
CPU of the serving process per token (utime + stime from /proc), that of its main thread alone (the
event loop: everything but the scorer's forwards), and SSE text events per request. `--floor` adds
a bare Starlette stream with one ready-made event per token: the HTTP stack's own cost per event. `--slow-client-ms` makes every client pause after each event it
reads: with a paced engine, tokens that arrive meanwhile go out together.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.gateway_cost import measure, start, stop_all  # noqa: E402
from safethink_server.engines.base import Engine, Generation, SamplingParams  # noqa: E402
from safethink_server.prompt import Conversation, RenderedPrompt  # noqa: E402
from tests.support.servers import free_port  # noqa: E402

PARAGRAPH = ("First we look at the numbers in the list and add them up one by one, keeping a running total so that "
             "nothing is counted twice.\n\n")
ANSWER = "The total is 42, found by adding the numbers in order."


class ReplayGeneration(Generation):
    def __init__(self, engine: ReplayEngine) -> None:
        self.engine = engine
        self.sequence: list[int] = []
        self._at = 0
        self._loop = asyncio.get_running_loop()
        self._handed_out = 0  # paced: tokens decoded so far by the engine's clock
        # Paced: every sequence decodes on the engine's one step clock, as in a continuously batched
        # engine, so all sequences' tokens of a step arrive in the same event-loop turn.
        now = self._loop.time()
        epoch = engine.epoch = now if engine.epoch is None else engine.epoch
        self._started = epoch + (now - epoch) // engine.step_s * engine.step_s if engine.step_s else now

    @property
    def prefilled_tokens(self) -> int:
        return 0

    async def next_tokens(self) -> list[int]:
        step = self.engine.step_s
        if step == 0:
            await asyncio.sleep(0)
            n = 1
        else:
            while (n := int((self._loop.time() - self._started) / step) - self._handed_out) <= 0:
                await asyncio.sleep(self._started + (self._handed_out + 1) * step - self._loop.time())
        self._handed_out += n
        script = self.engine.script
        batch = script[self._at : self._at + n]
        self._at += len(batch)
        if self._at >= len(script):
            batch.append(self.engine.eos)
        self.sequence += batch
        return batch

    async def rollback(self, n_tokens: int) -> None:
        del self.sequence[len(self.sequence) - n_tokens :]

    async def inject(self, token_ids: list[int]) -> None:
        self.sequence += token_ids

    async def abort(self) -> None:
        return None


class ReplayEngine(Engine):
    name = "replay"

    def __init__(self, tokenizer_dir: Path, tokens: int, step_ms: float) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        self.model_name = "replay"
        self.eos = self.tokenizer.eos_token_id
        paragraph = self.tokenizer.encode(PARAGRAPH, add_special_tokens=False)
        reasoning = (paragraph * (tokens // len(paragraph) + 1))[: max(0, tokens - 40)]
        self.script = reasoning + self.tokenizer.encode("</think>\n\n" + ANSWER, add_special_tokens=False)
        self.step_s = step_ms / 1000
        self.epoch: float | None = None  # the step clock's start, on the event loop's clock

    async def start(self, prompt: RenderedPrompt, sampling: SamplingParams, conversation: Conversation,
                    model: str | None = None) -> Generation:
        return ReplayGeneration(self)


def serve_floor(port: int, tokens: int) -> None:
    """The HTTP stack alone: a bare Starlette stream of one ready-made chunk per event-loop turn, as
    many as the steering-off route sends (its events are about as long). What this costs per event
    is the floor under the server's cost per token at stream interval 1."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse, StreamingResponse
    from starlette.routing import Route

    event = ('data: {"id":"chatcmpl-0","object":"chat.completion.chunk","created":0,"model":"replay","choices":[{"index":0,'
             '"delta":{"reasoning_content":" numbers","reasoning":" numbers"}}]}\n\n')

    async def events() -> AsyncIterator[str]:
        for _ in range(tokens):
            await asyncio.sleep(0)  # as the replay engine hands out a token
            yield event
        yield f'data: {{"choices":[],"usage":{{"completion_tokens":{tokens}}}}}\n\n'  # one token an event
        yield "data: [DONE]\n\n"

    async def chat(request: Request) -> StreamingResponse:
        await request.body()
        return StreamingResponse(events(), media_type="text/event-stream")

    app = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"]),
                            Route("/health", lambda request: PlainTextResponse("ok"))])
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def serve(port: int, tokens: int, step_ms: float, flags: list[str]) -> None:
    import uvicorn

    from reward_models.registry import build_scorer
    from safethink_server.api.app import create_app
    from safethink_server.config import ServerSettings
    from safethink_server.engines.model_store import embedded_model_dir

    settings = ServerSettings(**dict(zip(flags[::2], flags[1::2], strict=True)))  # type: ignore[arg-type]
    app = create_app(settings, ReplayEngine(embedded_model_dir(), tokens, step_ms), build_scorer(settings.scorer_config()))
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


async def one(client: httpx.AsyncClient, base: str, pause_s: float) -> tuple[int, int]:
    """(text events, completion tokens) of one streamed request."""
    body = {"model": "replay", "messages": [{"role": "user", "content": "Add the numbers."}], "stream": True,
            "max_tokens": 4096, "stream_options": {"include_usage": True}}
    events, tokens = 0, 0
    async with client.stream("POST", base + "/chat/completions", json=body) as response:
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            delta = (chunk.get("choices") or [{}])[0].get("delta") or {}
            if delta.get("content") or delta.get("reasoning_content"):
                events += 1
                if pause_s:
                    await asyncio.sleep(pause_s)
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return events, tokens


async def main(args: argparse.Namespace) -> None:
    interval = ["stream_interval", str(args.stream_interval)]
    routes = {"steering off": ["early_steps", "0", *interval], "steering on": interval}
    if args.floor:
        routes["HTTP floor"] = ["--floor"]
    procs, bases = {}, {}
    try:
        for route, flags in routes.items():
            port = free_port()
            command = [sys.executable, __file__, "--serve", str(port), "--tokens", str(args.tokens), "--step-ms", str(args.step_ms), *flags]
            procs[route] = start(command, f"http://127.0.0.1:{port}/health", Path(f"/tmp/loop-cost-{port}.log"))
            bases[route] = f"http://127.0.0.1:{port}/v1"
        print(f"{args.requests} requests of about {args.tokens} tokens, engine step {args.step_ms} ms, "
              f"client pause {args.slow_client_ms} ms an event, stream interval {args.stream_interval}")
        print(f"{'streams':>7} {'route':13} {'CPU µs/token':>13} {'event loop':>11} {'events/req':>11} {'tokens/req':>11} {'time s':>7}")
        for concurrency in args.concurrency:
            for route, base in bases.items():
                t = time.perf_counter()
                pause_s = args.slow_client_ms / 1000
                run = await measure(base, procs[route].pid, concurrency, args.requests,
                                    lambda client, base=base, pause_s=pause_s: one(client, base, pause_s),
                                    warm_up=lambda client, base=base: one(client, base, 0))  # the warm-up reads at once
                cpu, loop_cpu = run.cpu_s, run.loop_cpu_s
                events, tokens = statistics.mean(r[0] for r in run.results), sum(r[1] for r in run.results)
                print(f"{concurrency:7} {route:13} {cpu / tokens * 1e6:13.1f} {loop_cpu / tokens * 1e6:11.1f} {events:11.1f} "
                      f"{tokens / args.requests:11.1f} {time.perf_counter() - t:7.1f}")
    finally:
        stop_all(procs.values())


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--concurrency", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--requests", type=int, default=256, help="enough for CPU ticks (10 ms) not to matter")
    parser.add_argument("--tokens", type=int, default=256, help="tokens the engine replays per request")
    parser.add_argument("--step-ms", type=float, default=0.0, help="0: a token per call at once; N: a token per sequence every N ms")
    parser.add_argument("--stream-interval", type=int, default=1, help="the servers' --stream-interval")
    parser.add_argument("--slow-client-ms", type=float, default=0.0, help="each client pauses this long after every event")
    parser.add_argument("--floor", action="store_true",
                        help="also a bare Starlette stream of one ready chunk per token: the HTTP stack's own cost per event")
    parser.add_argument("--serve", type=int, metavar="PORT", help=argparse.SUPPRESS)
    cli, rest = parser.parse_known_args()
    if cli.serve and cli.floor:
        serve_floor(cli.serve, cli.tokens)
    elif cli.serve:
        serve(cli.serve, cli.tokens, cli.step_ms, rest)
    else:
        asyncio.run(main(cli))
