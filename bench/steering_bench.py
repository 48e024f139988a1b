"""Steered (default policy) against bare (--early-steps 0) on one engine, side by side in one run, at
several concurrency levels; then the cost of one intervention against a cold re-prefill.

    python bench/steering_bench.py --engine hf --concurrency 1 --rounds 2 --max-tokens 64
    python bench/steering_bench.py --engine vllm --concurrency 1 8 32
    python bench/steering_bench.py --engine vllm --model DIR --scorer-device cuda   # on a GPU

Both modes run through the same SteeringSession on the same engine; rounds alternate between the modes
(each from an empty prefix cache and an empty scorer cache, the order swapped every round) so both see the same machine load. tokens/s is all output tokens of a round over the round's wall time.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from pathlib import Path

from reward_models.base import StepItem, StepScore
from reward_models.batcher import LATER_STEP_DELAY_MS, MicroBatcher
from reward_models.probe import ProbeScorer
from safethink_server.engines.base import Engine, SamplingParams
from safethink_server.engines.model_store import embedded_model_dir
from safethink_server.prompt import Conversation, RenderedPrompt
from safethink_server.schema import PolicyConfig, ReasoningConfig
from safethink_server.steering.session import SteeringSession
from safethink_server.steering.steps import StepBoundaryDetector

PROMPTS = [
    "A shop sells pens at 3 dollars each. How much do 7 pens cost? Think step by step.",
    "Explain why the sky is blue, step by step.",
    "How do I pick a strong password? Think it through.",
    "What is 15% of 80? Show your reasoning.",
    "A train travels 60 km in 45 minutes. What is its speed in km/h? Reason step by step.",
    "Why do leaves change colour in autumn? Think it through.",
    "How many seconds are in a day? Show your steps.",
    "What are good habits for studying? Reason carefully.",
]
NO_CONVERSATION = Conversation([{"role": "user", "content": ""}])
MODES = {"steered": PolicyConfig(), "bare": PolicyConfig(early_steps=0)}
# "fifo" (with --fifo): steered, with the micro-batcher serving steps in arrival order (no first-step priority)
LATER_STEP_DELAY_S = {"steered": LATER_STEP_DELAY_MS / 1000, "fifo": 0.0, "bare": 0.0}


class Result:
    def __init__(self, ttft: float, tokens: int, interventions: int, first_wait_ms: float | None = None) -> None:
        self.ttft, self.tokens, self.interventions = ttft, tokens, interventions
        self.first_wait_ms = first_wait_ms  # the first judged step's wait for its score


async def run_one(engine: Engine, batcher: MicroBatcher, prompt: str, policy: PolicyConfig, max_tokens: int) -> Result:
    conversation = Conversation([{"role": "user", "content": prompt}])
    reasoning = ReasoningConfig()
    rendered = await engine.render(conversation, reasoning)

    async def score(item: StepItem, first: bool) -> StepScore:
        return await batcher.score_one(item, first)

    session = SteeringSession(engine, rendered, conversation, SamplingParams(max_tokens=max_tokens, temperature=0.0), policy,
                              reasoning, StepBoundaryDetector(), score, warm=batcher.prefetch)  # the server's default
    start = time.perf_counter()
    ttft = None
    async for delta in session.run():
        if ttft is None and delta.text:
            ttft = time.perf_counter() - start
    steps = session.report.steps
    return Result(ttft or 0.0, session.output_tokens, len(session.report.interventions), steps[0].score_ms if steps else None)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def compare(engine: Engine, batcher: MicroBatcher, concurrency: int, rounds: int, max_tokens: int, fifo: bool = False) -> float:
    modes = {**MODES, **({"fifo": MODES["steered"]} if fifo else {})}
    results: dict[str, list[Result]] = {m: [] for m in modes}
    wall: dict[str, float] = {m: 0.0 for m in modes}
    for r in range(rounds):
        # Every stream has a prompt of its own (numbered), so that no two steps share a scorer encoding.
        prompts = [f"{PROMPTS[(r * concurrency + i) % len(PROMPTS)]} (Question {r * concurrency + i + 1}.)" for i in range(concurrency)]
        # Each mode starts from an empty prefix cache, and the order alternates by round: neither mode
        # gets the prompts the other has just prefilled.
        for mode, policy in list(modes.items())[:: 1 if r % 2 == 0 else -1]:
            batcher.later_step_delay_s = LATER_STEP_DELAY_S[mode]
            await reset_prefix_cache(engine)
            batcher.scorer.embedder.clear_cache()  # type: ignore[attr-defined]  # every step's encoding is computed
            t = time.perf_counter()
            results[mode] += await asyncio.gather(*(run_one(engine, batcher, p, policy, max_tokens) for p in prompts))
            wall[mode] += time.perf_counter() - t
    rate = {m: sum(x.tokens for x in results[m]) / wall[m] for m in modes}
    for mode, rows in results.items():
        ttfts = [x.ttft * 1000 for x in rows]
        waits = [x.first_wait_ms for x in rows if x.first_wait_ms is not None]
        wait = f"{statistics.median(waits):9.0f} {percentile(waits, 0.99):9.0f}" if waits else f"{'-':>9} {'-':>9}"
        print(f"{concurrency:5d} {mode:8} {rate[mode]:8.1f} {statistics.median(ttfts):10.0f} {percentile(ttfts, 0.99):10.0f} "
              f"{sum(x.interventions for x in rows):6d}/{len(rows)} {wait}")
    ratio = rate["steered"] / rate["bare"]
    print(f"{concurrency:5d} steered/bare tokens/s = {ratio:.3f}")
    return ratio


async def intervention_cost(engine: Engine, contexts: list[int], repeats: int) -> None:
    """One rollback + inject until the next token, against a fresh request over the same ids with a cold
    cache; the median of `repeats` pairs, measured alternately."""
    tok = engine.tokenizer
    filler = tok.encode(" the quick brown fox jumps over the lazy dog." * 400, add_special_tokens=False)
    prefix = tok.encode("Wait, think safely.", add_special_tokens=False)
    print(f"{'context':>8} {'intervention ms':>16} {'cold re-prefill ms':>19} {'ratio':>7}")
    for n in contexts:
        steer_s, prefill_s = [], []
        for _ in range(repeats):
            gen = await engine.start(RenderedPrompt(filler[:n], "reasoning"), SamplingParams(max_tokens=16, temperature=0.0),
                                     NO_CONVERSATION)
            for _ in range(9):
                await gen.next_tokens()
            t = time.perf_counter()
            await gen.rollback(8)
            await gen.inject(prefix)
            await gen.next_tokens()
            steer_s.append(time.perf_counter() - t)
            await gen.abort()
            await reset_prefix_cache(engine)
            fresh = await engine.start(RenderedPrompt(filler[:n] + prefix, "reasoning"), SamplingParams(max_tokens=1, temperature=0.0),
                                       NO_CONVERSATION)
            t = time.perf_counter()
            await fresh.next_tokens()
            prefill_s.append(time.perf_counter() - t)
            await fresh.abort()
            await reset_prefix_cache(engine)
        steer, prefill = statistics.median(steer_s), statistics.median(prefill_s)
        print(f"{n:8d} {steer * 1000:16.0f} {prefill * 1000:19.0f} {prefill / steer:7.1f}x")


async def reset_prefix_cache(engine: Engine) -> None:
    """Empty vLLM's prefix cache (it refuses while blocks of aborted requests are still being freed)."""
    llm = getattr(engine, "llm", None)
    if llm is None:
        return
    for _ in range(100):
        if await llm.reset_prefix_cache() is not False:
            return
        await asyncio.sleep(0.05)
    raise RuntimeError("vLLM did not reset its prefix cache")


def build_engine(args: argparse.Namespace) -> Engine:
    model = Path(args.model) if args.model else embedded_model_dir()
    if args.engine == "vllm":
        from safethink_server.engines.vllm import VLLMEngine

        return VLLMEngine(model, "bench", {"max_model_len": args.max_model_len, **({"dtype": args.dtype} if args.dtype else {})},
                          max_queued_requests=1024)
    from safethink_server.engines.hf import HFEngine

    return HFEngine(model, "bench", dtype=args.dtype or "bfloat16", device="cuda" if args.scorer_device == "cuda" else "cpu")


async def main(args: argparse.Namespace) -> None:
    engine = build_engine(args)
    t = time.perf_counter()
    await engine.open()
    print(f"engine={args.engine} model={args.model or 'embedded SmolLM2-135M'} started in {time.perf_counter() - t:.0f} s")
    batcher = MicroBatcher(ProbeScorer(device=args.scorer_device), max_batch_size=32, max_wait_ms=2.0)
    await run_one(engine, batcher, PROMPTS[0], PolicyConfig(), 16)  # warm-up
    print(f"{'conc':>5} {'mode':8} {'tok/s':>8} {'ttft p50':>10} {'ttft p99':>10} {'interv':>8} {'wait p50':>9} {'wait p99':>9}")
    ratios = {c: await compare(engine, batcher, c, args.rounds, args.max_tokens, args.fifo) for c in args.concurrency}
    await intervention_cost(engine, args.contexts, args.repeats)
    print("summary steered/bare tokens/s: " + ", ".join(f"{c} streams {r:.3f}" for c, r in ratios.items()))
    await batcher.aclose()
    await engine.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--engine", choices=["hf", "vllm"], default="hf")
    parser.add_argument("--model", help="model folder (default: the embedded SmolLM2)")
    parser.add_argument("--dtype", help="engine dtype (default: the engine's)")
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1])
    parser.add_argument("--rounds", type=int, default=2, help="rounds per mode and concurrency level")
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--contexts", type=int, nargs="+", default=[256, 1024, 2048])
    parser.add_argument("--repeats", type=int, default=3, help="intervention/re-prefill pairs per context (median)")
    parser.add_argument("--scorer-device", default="cpu")
    parser.add_argument("--fifo", action="store_true", help="also steered with the scorer serving steps in arrival order "
                        "(no first-step priority); 'wait' is the first judged step's wait for its score, in ms")
    asyncio.run(main(parser.parse_args()))
