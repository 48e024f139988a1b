"""`probe`: the offline default scorer. MiniLM encodings of the step and of its context (prompt and
reasoning so far), a small MLP head over them, and Platt calibration."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from reward_models.base import Scorer, StepItem, StepScore, request_context, tail
from reward_models.embedder import SENTENCE_ROW, TOKEN_MAX_ROW, SentenceEmbedder

FEATURE_VERSION = "minilm-l6-layers-step-context-v2"
DEFAULT_HEAD_PATH = Path(__file__).with_name("probe_head.safetensors")
_PROMPT_CHARS = 600
_REASONING_CHARS = 400
_STEP_CHARS = 1200
_TOKEN_MAX_SCALE = 0.1  # brings token-wise maxima near the scale of the normalised means


def feature_texts(item: StepItem) -> tuple[str, str]:
    """The two texts encoded for one item: the step, and its context."""
    step = item.step.strip()[:_STEP_CHARS] or "(empty step)"
    context = request_context(item, _PROMPT_CHARS)
    reasoning = tail(item.reasoning.strip(), _REASONING_CHARS)
    if reasoning:
        context = f"{context}\n\n{reasoning}"
    return step, context


def features(embedder: SentenceEmbedder, items: Sequence[StepItem]) -> torch.Tensor:
    """(n, 10 * 384) feature matrix: the step's six layer means, the context's sentence embedding,
    their product, and both token-wise maxima. All texts of the batch go through one embedder call."""
    pairs = [feature_texts(i) for i in items]
    encodings = embedder.embed([s for s, _ in pairs] + [c for _, c in pairs])
    step, context = encodings[: len(items)], encodings[len(items) :]
    return torch.cat(
        [
            step[:, :TOKEN_MAX_ROW].flatten(1),
            context[:, SENTENCE_ROW],
            step[:, SENTENCE_ROW] * context[:, SENTENCE_ROW],
            step[:, TOKEN_MAX_ROW] * _TOKEN_MAX_SCALE,
            context[:, TOKEN_MAX_ROW] * _TOKEN_MAX_SCALE,
        ],
        dim=1,
    )


class ProbeHead:
    """Feature standardisation, a one-hidden-layer ReLU MLP and Platt scaling, in a small safetensors
    file with JSON metadata. The hidden layer's weights are stored in float16."""

    def __init__(
        self,
        feature_mean: torch.Tensor,
        feature_scale: torch.Tensor,
        hidden_weight: torch.Tensor,
        hidden_bias: torch.Tensor,
        output_weight: torch.Tensor,
        output_bias: float,
        platt_scale: float,
        platt_bias: float,
        metadata: dict[str, str],
    ):
        self.feature_mean = feature_mean.float()
        self.feature_scale = feature_scale.float()
        self.hidden_weight = hidden_weight.float()
        self.hidden_bias = hidden_bias.float()
        self.output_weight = output_weight.float()
        self.output_bias = output_bias
        self.platt_scale = platt_scale
        self.platt_bias = platt_bias
        self.metadata = metadata

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.feature_mean) / self.feature_scale
        return torch.relu(x @ self.hidden_weight + self.hidden_bias) @ self.output_weight + self.output_bias

    def p_unsafe(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.platt_scale * self.logits(x) + self.platt_bias)

    def save(self, path: Path) -> None:
        tensors = {
            "feature_mean": self.feature_mean.contiguous(),
            "feature_scale": self.feature_scale.contiguous(),
            "hidden_weight": self.hidden_weight.half().contiguous(),
            "hidden_bias": self.hidden_bias.contiguous(),
            "output_weight": self.output_weight.contiguous(),
            "output_bias": torch.tensor([self.output_bias]),
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
        return cls(
            t["feature_mean"], t["feature_scale"], t["hidden_weight"], t["hidden_bias"], t["output_weight"],
            float(t["output_bias"][0]), float(t["platt"][0]), float(t["platt"][1]), metadata,
        )

    def describe(self) -> dict[str, object]:
        return {k: (json.loads(v) if v.startswith("{") else v) for k, v in self.metadata.items()}


class ProbeScorer(Scorer):
    name = "probe"

    def __init__(self, head_path: Path | None = None, device: str | None = None, embedder: SentenceEmbedder | None = None,
                 dtype: str | None = None):
        super().__init__()
        self.head = ProbeHead.load(head_path or DEFAULT_HEAD_PATH)
        self.embedder = embedder or SentenceEmbedder(device=device, dtype=dtype)

    warms = True

    def warm_batch(self, items: Sequence[StepItem]) -> None:
        """Encode the items' contexts into the embedder's cache: a request's context is known before
        its step is, so it can be encoded while the model still writes the step."""
        self.embedder.embed([feature_texts(i)[1] for i in items])

    def score_batch(self, items: Sequence[StepItem]) -> list[StepScore]:
        if not items:
            return []
        with torch.inference_mode():
            p = self.head.p_unsafe(features(self.embedder, items))
        return [StepScore(p_unsafe=float(v)) for v in p.clamp(0.0, 1.0)]
