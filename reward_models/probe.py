"""`probe`: the offline default scorer. MiniLM encodings of the step, of the reasoning so far and of
the whole conversation, a small MLP head over them, and Platt calibration.

The conversation is read in overlapping windows (`reward_models.context.windows`), each encoded
once per request (ahead of the first step, see `warm_batch`). The head judges the step against each
window and the step's p_unsafe is the highest: text around a request can neither push it out of view
nor average it away.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from reward_models.base import Scorer, StepItem, StepScore
from reward_models.context import conversation_text, normalised, tail
from reward_models.embedder import SENTENCE_ROW, TOKEN_MAX_ROW, SentenceEmbedder

FEATURE_VERSION = "minilm-l6-layers-step-reasoning-windows-v3"
DEFAULT_HEAD_PATH = Path(__file__).with_name("probe_head.safetensors")
_REASONING_CHARS = 400
_STEP_CHARS = 1200
_TOKEN_MAX_SCALE = 0.1  # brings token-wise maxima near the scale of the normalised means
_NO_REASONING = "(no reasoning yet)"
MAX_ROWS = 2048  # feature rows (item x window) scored together: about 40 MB of float32
WARM_WINDOWS = 16  # windows encoded per warming call: what a step arriving meanwhile may wait for


class FeatureTexts:
    """The texts encoded for one item: its step, its reasoning so far, and its conversation's windows
    (`windows_of`: cut so that the encoder reads each whole, `SentenceEmbedder.windows_of`)."""

    def __init__(self, item: StepItem, windows_of: Callable[[str], Sequence[str]]) -> None:
        self.step = normalised(item.step).strip()[:_STEP_CHARS] or "(empty step)"
        self.reasoning = tail(normalised(item.reasoning).strip(), _REASONING_CHARS) or _NO_REASONING
        self.windows = list(windows_of(conversation_text(item.prompt, item.history))) or [""]


def features(embedder: SentenceEmbedder, items: Sequence[StepItem]) -> tuple[torch.Tensor, torch.Tensor]:
    """One feature row per (item, window of its conversation), and the index of each row's item.

    A row: the step's six layer means, its token-wise max, the window's sentence embedding, its
    product with the step's, the window's token-wise max, and the same three of the reasoning so far.
    All texts of the batch go through one embedder call."""
    texts = [FeatureTexts(i, embedder.windows_of) for i in items]
    owner = torch.tensor([k for k, t in enumerate(texts) for _ in t.windows], dtype=torch.long)
    flat_windows = [w for t in texts for w in t.windows]
    encodings = embedder.embed([t.step for t in texts] + [t.reasoning for t in texts] + flat_windows)
    n = len(items)
    step, reasoning, window = encodings[:n][owner], encodings[n : 2 * n][owner], encodings[2 * n :]
    return torch.cat(
        [
            step[:, :TOKEN_MAX_ROW].flatten(1),
            step[:, TOKEN_MAX_ROW] * _TOKEN_MAX_SCALE,
            window[:, SENTENCE_ROW],
            step[:, SENTENCE_ROW] * window[:, SENTENCE_ROW],
            window[:, TOKEN_MAX_ROW] * _TOKEN_MAX_SCALE,
            reasoning[:, SENTENCE_ROW],
            step[:, SENTENCE_ROW] * reasoning[:, SENTENCE_ROW],
            reasoning[:, TOKEN_MAX_ROW] * _TOKEN_MAX_SCALE,
        ],
        dim=1,
    ), owner


def max_per_item(values: torch.Tensor, owner: torch.Tensor, n: int) -> torch.Tensor:
    """The highest of each item's rows."""
    out = torch.full((n,), float("-inf"), dtype=values.dtype)
    return out.scatter_reduce(0, owner, values, reduce="amax")


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
        """One logit per feature row (before Platt scaling)."""
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
    warms = True

    def __init__(self, head_path: Path | None = None, device: str | None = None, embedder: SentenceEmbedder | None = None,
                 dtype: str | None = None):
        super().__init__()
        self.head = ProbeHead.load(head_path or DEFAULT_HEAD_PATH)
        self.embedder = embedder or SentenceEmbedder(device=device, dtype=dtype)

    def warm_batch(self, items: Sequence[StepItem]) -> bool:
        """Encode up to WARM_WINDOWS of the items' conversation windows (and their reasoning) into the
        embedder's cache: a request's conversation is known before its step is, so it is encoded
        while the model still writes the step. True when all of them are cached."""
        texts = [t for i in items for f in [FeatureTexts(i, self.embedder.windows_of)] for t in (f.reasoning, *f.windows)]
        missing = list(dict.fromkeys(t for t in texts if not self.embedder.cached(t)))
        self.embedder.embed(missing[:WARM_WINDOWS])
        return len(missing) <= WARM_WINDOWS

    def score_batch(self, items: Sequence[StepItem]) -> list[StepScore]:
        scores: list[StepScore] = []
        with torch.inference_mode():
            for chunk in self._chunks(items):
                x, owner = features(self.embedder, chunk)
                p = max_per_item(self.head.p_unsafe(x), owner, len(chunk))
                scores += [StepScore(p_unsafe=float(v)) for v in p.clamp(0.0, 1.0)]
        return scores

    def _chunks(self, items: Sequence[StepItem]) -> list[Sequence[StepItem]]:
        """Items in consecutive groups of at most MAX_ROWS feature rows (one item alone where it has
        more): the rows of a batch of long conversations are never all in memory at once."""
        out: list[Sequence[StepItem]] = []
        start, rows = 0, 0
        for k, item in enumerate(items):
            n = len(self.embedder.windows_of(conversation_text(item.prompt, item.history)))
            if k > start and rows + n > MAX_ROWS:
                out.append(items[start:k])
                start, rows = k, 0
            rows += n
        if start < len(items):
            out.append(items[start:])
        return out
