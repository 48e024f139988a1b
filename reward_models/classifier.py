"""`classifier`: any Hugging Face sequence-classification safety or reward model from a local path."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from reward_models.base import Scorer, StepItem, StepScore
from reward_models.device import pick_device, pick_dtype
from reward_models.text import (
    DEFAULT_TEMPLATE,
    JOIN_MARGIN,
    MIN_ROOM,
    highest_per_item,
    rendered,
    sequence_parts,
    unsafe_label_indices,
)

FORWARD_ROWS = 32  # texts in one forward


class ClassifierScorer(Scorer):
    """p_unsafe is the softmax mass on the unsafe labels. A single-logit reward model gives
    p_unsafe = sigmoid(-reward) by default (a high reward means safe); `single_logit="unsafe"`
    flips that for a head whose logit already means unsafe."""

    name = "classifier"

    def __init__(
        self,
        model_path: str | Path,
        device: str | None = None,
        dtype: str | None = None,
        unsafe_labels: list[str] | None = None,
        single_logit: str = "safe",
        template: str = DEFAULT_TEMPLATE,
        max_length: int = 512,
    ) -> None:
        super().__init__()
        self.device = pick_device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            model_path, dtype=pick_dtype(self.device, dtype)
        ).to(self.device).eval()
        self.id2label = {int(k): v for k, v in self.model.config.id2label.items()}
        self.num_labels = int(self.model.config.num_labels)
        if single_logit not in ("safe", "unsafe"):
            raise ValueError("single_logit must be 'safe' or 'unsafe'")
        self.single_logit = single_logit
        self.unsafe = [] if self.num_labels == 1 else unsafe_label_indices(self.id2label, unsafe_labels)
        self.template = template
        self.max_length = max_length
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        frame = self.tokenizer(template.format(prompt="", reasoning="", step=""))["input_ids"]  # special tokens included
        self.room = max_length - len(frame) - JOIN_MARGIN
        if self.room < MIN_ROOM:
            raise ValueError(f"max_length {max_length} leaves {self.room} tokens beside the template; at least {MIN_ROOM} are needed")

    @torch.inference_mode()
    def score_batch(self, items: Sequence[StepItem]) -> list[StepScore]:
        if not items:
            return []
        texts, owners = rendered(items, self.render)
        self.tokenizer.truncation_side = "left"  # a safety net: the parts are cut to fit already
        rows: list[StepScore] = []
        for start in range(0, len(texts), FORWARD_ROWS):  # a long conversation is many texts: bounded memory
            enc = self.tokenizer(texts[start : start + FORWARD_ROWS], padding=True, truncation=True, max_length=self.max_length,
                                 return_tensors="pt").to(self.device)
            rows += [self._row_score(row) for row in self.model(**enc).logits.float()]
        return highest_per_item(rows, owners, len(items))

    def render(self, item: StepItem) -> list[str]:
        """One text per view of the conversation and of the step (`sequence_parts`), each within max_length tokens."""
        parts = sequence_parts(item, self.tokenizer, self.room)
        reasoning = f"{parts.reasoning}\n\n" if parts.reasoning else ""
        return [self.template.format(prompt=request, reasoning=reasoning, step=step) for request in parts.requests for step in parts.steps]

    def _row_score(self, logits: torch.Tensor) -> StepScore:
        if self.num_labels == 1:
            sign = -1.0 if self.single_logit == "safe" else 1.0
            return StepScore(p_unsafe=float(torch.sigmoid(sign * logits[0])))
        unsafe = logits.softmax(-1)[self.unsafe]
        category = self.id2label.get(self.unsafe[int(unsafe.argmax())]) if len(self.unsafe) > 1 else None
        return StepScore(p_unsafe=float(unsafe.sum().clamp(0.0, 1.0)), category=category)
