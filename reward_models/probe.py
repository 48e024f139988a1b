"""`probe`: the offline default scorer. MiniLM embeddings of the step and of its context (prompt and
reasoning so far), a logistic head over [step, context, step*context], and Platt calibration."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from reward_models.base import Scorer, StepItem, StepScore, tail
from reward_models.embedder import SentenceEmbedder

FEATURE_VERSION = "minilm-l6-step-context-v1"
DEFAULT_HEAD_PATH = Path(__file__).with_name("probe_head.safetensors")
_PROMPT_CHARS = 600
_REASONING_CHARS = 400
_STEP_CHARS = 1200


def feature_texts(item: StepItem) -> tuple[str, str]:
    """The two texts embedded for one item: the step, and its context."""
    step = item.step.strip()[:_STEP_CHARS] or "(empty step)"
    context = item.prompt.strip()[:_PROMPT_CHARS]
    reasoning = tail(item.reasoning.strip(), _REASONING_CHARS)
    if reasoning:
        context = f"{context}\n\n{reasoning}"
    return step, context


def features(embedder: SentenceEmbedder, items: Sequence[StepItem]) -> torch.Tensor:
    """(n, 3 * 384) feature matrix; all texts of the batch go through the embedder in one call."""
    pairs = [feature_texts(i) for i in items]
    vectors = embedder.embed([s for s, _ in pairs] + [c for _, c in pairs])
    step, context = vectors[: len(items)], vectors[len(items) :]
    return torch.cat([step, context, step * context], dim=1)


class ProbeHead:
    """Linear head + Platt scaling, stored as a small safetensors file with JSON metadata."""

    def __init__(self, weight: torch.Tensor, bias: float, platt_scale: float, platt_bias: float, metadata: dict[str, str]):
        self.weight = weight.float()
        self.bias = bias
        self.platt_scale = platt_scale
        self.platt_bias = platt_bias
        self.metadata = metadata

    def p_unsafe(self, x: torch.Tensor) -> torch.Tensor:
        logits = x @ self.weight + self.bias
        return torch.sigmoid(self.platt_scale * logits + self.platt_bias)

    def save(self, path: Path) -> None:
        tensors = {
            "weight": self.weight.contiguous(),
            "bias": torch.tensor([self.bias]),
            "platt": torch.tensor([self.platt_scale, self.platt_bias]),
        }
        save_file(tensors, str(path), metadata={"feature_version": FEATURE_VERSION, **self.metadata})

    @classmethod
    def load(cls, path: Path) -> ProbeHead:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
        if metadata.get("feature_version") != FEATURE_VERSION:
            raise ValueError(
                f"{path} was trained for features {metadata.get('feature_version')!r}, this code computes {FEATURE_VERSION!r}"
            )
        t = load_file(str(path))
        return cls(t["weight"], float(t["bias"][0]), float(t["platt"][0]), float(t["platt"][1]), metadata)

    def describe(self) -> dict[str, object]:
        return {k: (json.loads(v) if v.startswith("{") else v) for k, v in self.metadata.items()}


class ProbeScorer(Scorer):
    name = "probe"

    def __init__(self, head_path: Path | None = None, device: str | None = None, embedder: SentenceEmbedder | None = None):
        super().__init__()
        self.head = ProbeHead.load(head_path or DEFAULT_HEAD_PATH)
        self.embedder = embedder or SentenceEmbedder(device=device)

    def score_batch(self, items: Sequence[StepItem]) -> list[StepScore]:
        if not items:
            return []
        with torch.inference_mode():
            p = self.head.p_unsafe(features(self.embedder, items))
        return [StepScore(p_unsafe=float(v)) for v in p.clamp(0.0, 1.0)]
