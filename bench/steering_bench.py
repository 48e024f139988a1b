"""Steered (default policy) against bare (--early-steps 0) on the hf engine, side by side in one run,
plus the cost of one intervention against a full re-prefill at several context lengths.

    python bench/steering_bench.py [--requests 4] [--max-tokens 96]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from reward_models.base import StepItem, StepScore
from reward_models.batcher import MicroBatcher
from reward_models.probe import ProbeScorer
from safethink_server.engines.base import SamplingParams
from safethink_server.engines.hf import HFEngine
from safethink_server.engines.model_store import embedded_model_dir
from safethink_server.steering.policy import PolicyConfig
from safethink_server.steering.session import ReasoningConfig, SteeringSession
from safethink_server.steering.steps import StepBoundaryDetector

PROMPTS = [
    "A shop sells pens at 3 dollars each. How much do 7 pens cost? Think step by step.",
    "Explain why the sky is blue, step by step.",
    "How do I pick a strong password? Think it through.",
    "What is 15% of 80? Show your reasoning.",
]


async def run_one(engine, batcher, prompt: str, policy: PolicyConfig, max_tokens: int) -> tuple[float, int, float, int]:
    tok = engine.tokenizer
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True) + "<think>\n"
    ids = tok.encode(text, add_special_tokens=False)

    async def score(item: StepItem) -> StepScore:
        return await batcher.score_one(item)

    session = SteeringSession(engine, ids, prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0), policy,
                              ReasoningConfig(), StepBoundaryDetector(), score)
    start = time.perf_counter()
    ttft = None
    async for delta in session.run():
        if ttft is None and delta.text:
            ttft = time.perf_counter() - start
    return ttft or 0.0, session.output_tokens, time.perf_counter() - start, len(session.report.interventions)


async def compare(engine, batcher, requests: int, max_tokens: int) -> None:
    configs = {"steered": PolicyConfig(), "bare": PolicyConfig(early_steps=0)}
    results: dict[str, list[tuple[float, int, float, int]]] = {k: [] for k in configs}
    for i in range(requests):  # interleave so both see the same machine load
        prompt = PROMPTS[i % len(PROMPTS)]
        for name, policy in configs.items():
            results[name].append(await run_one(engine, batcher, prompt, policy, max_tokens))
    print(f"{'mode':8} {'ttft p50 ms':>12} {'tok/s':>8} {'interventions':>14}")
    rates = {}
    for name, rows in results.items():
        rates[name] = sum(r[1] for r in rows) / sum(r[2] for r in rows)
        print(f"{name:8} {statistics.median(r[0] for r in rows) * 1000:12.0f} {rates[name]:8.1f} {sum(r[3] for r in rows):14d}")
    print(f"steered/bare tokens/s ratio: {rates['steered'] / rates['bare']:.3f}")


async def intervention_cost(engine, contexts: list[int]) -> None:
    tok = engine.tokenizer
    filler = tok.encode(" the quick brown fox jumps over the lazy dog." * 400, add_special_tokens=False)
    prefix = tok.encode("Wait, think safely.", add_special_tokens=False)
    print(f"{'context':>8} {'rollback+inject ms':>19} {'re-prefill ms':>14} {'ratio':>7}")
    for n in contexts:
        gen = await engine.start(filler[:n], SamplingParams(max_tokens=8, temperature=0.0))
        for _ in range(9):
            await gen.next_tokens()
        t = time.perf_counter()
        await gen.rollback(8)
        await gen.inject(prefix)
        steer = time.perf_counter() - t
        await gen.abort()
        fresh = await engine.start(filler[:n] + prefix, SamplingParams(max_tokens=1, temperature=0.0))
        t = time.perf_counter()
        await fresh.next_tokens()
        prefill = time.perf_counter() - t
        await fresh.abort()
        print(f"{n:8d} {steer * 1000:19.0f} {prefill * 1000:14.0f} {prefill / steer:7.1f}x")


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--contexts", type=int, nargs="+", default=[256, 1024, 2048])
    args = parser.parse_args()
    engine = HFEngine(embedded_model_dir(), "bench")
    batcher = MicroBatcher(ProbeScorer(device="cpu"))
    await run_one(engine, batcher, PROMPTS[0], PolicyConfig(), 8)  # warm-up
    await compare(engine, batcher, args.requests, args.max_tokens)
    await intervention_cost(engine, args.contexts)
    await batcher.aclose()


if __name__ == "__main__":
    asyncio.run(main())
