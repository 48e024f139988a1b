"""`classifier`: any Hugging Face sequence-classification safety or reward model from a local path."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from reward_models.base import Scorer, StepItem, StepScore
from reward_models.device import pick_device, pick_dtype
from reward_models.text import DEFAULT_TEMPLATE, render_item, request_in_tokens, unsafe_label_indices


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

    @torch.inference_mode()
    def score_batch(self, items: Sequence[StepItem]) -> list[StepScore]:
        if not items:
            return []
        # The conversation's start and end in half of max_length tokens, and the reasoning's end; left
        # truncation then cuts only what still overflows (a long step's reasoning), keeping the step.
        texts = [render_item(i, self.template, reasoning_chars=self.max_length,
                             request=request_in_tokens(i, self.tokenizer, self.max_length // 2)) for i in items]
        self.tokenizer.truncation_side = "left"
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt").to(self.device)
        logits = self.model(**enc).logits.float()
        if self.num_labels == 1:
            sign = -1.0 if self.single_logit == "safe" else 1.0
            return [StepScore(p_unsafe=float(p)) for p in torch.sigmoid(sign * logits[:, 0])]
        probs = logits.softmax(-1)
        unsafe = probs[:, self.unsafe]
        p_unsafe = unsafe.sum(-1).clamp(0.0, 1.0)
        scores = []
        for row, p in zip(unsafe, p_unsafe, strict=True):
            category = self.id2label.get(self.unsafe[int(row.argmax())]) if len(self.unsafe) > 1 else None
            scores.append(StepScore(p_unsafe=float(p), category=category))
        return scores
