"""`guard`: generative guard models (Llama Guard 3, ShieldGemma, Granite Guardian, Qwen3Guard-Gen).

The guard's own chat template renders the conversation (user prompt, assistant reasoning so far +
step); p_unsafe is read from the first generated token: P(unsafe) / (P(unsafe) + P(safe)) over the
configured token strings. One forward per batch, no sampling.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from reward_models.base import Scorer, StepItem, StepScore
from reward_models.device import pick_device, pick_dtype
from reward_models.text import JOIN_MARGIN, MIN_ROOM, highest_per_item, rendered, sequence_parts

FORWARD_ROWS = 8  # texts in one forward (each up to max_length tokens)


def first_token_id(tokenizer, text: str) -> int:  # type: ignore[no-untyped-def]
    ids = tokenizer.encode(text, add_special_tokens=False)
    if not ids:
        raise ValueError(f"{text!r} encodes to no tokens")
    return int(ids[0])


class GuardScorer(Scorer):
    name = "guard"

    def __init__(
        self,
        model_path: str | Path,
        device: str | None = None,
        dtype: str | None = None,
        unsafe_token: str = "unsafe",
        safe_token: str = "safe",
        max_length: int = 4096,
    ) -> None:
        super().__init__()
        self.device = pick_device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        if self.tokenizer.chat_template is None:
            raise ValueError(f"{model_path} has no chat template; a guard model renders its own moderation prompt")
        self.tokenizer.padding_side = "left"
        self.tokenizer.truncation_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=pick_dtype(self.device, dtype)).to(self.device).eval()
        self.unsafe_id = first_token_id(self.tokenizer, unsafe_token)
        self.safe_id = first_token_id(self.tokenizer, safe_token)
        if self.unsafe_id == self.safe_id:
            raise ValueError(f"{unsafe_token!r} and {safe_token!r} start with the same token; give distinct token strings")
        self.max_length = max_length
        self.room = max_length - len(self.tokenizer(self._prompt("", ""), add_special_tokens=False)["input_ids"]) - JOIN_MARGIN
        if self.room < MIN_ROOM:
            raise ValueError(f"max_length {max_length} leaves {self.room} tokens beside the guard's prompt; at least {MIN_ROOM} are needed")

    def render(self, item: StepItem) -> list[str]:
        """The guard's prompt for each view of the conversation and of the step (`sequence_parts`), each within
        max_length tokens, so that truncation never cuts the guard's own instructions."""
        parts = sequence_parts(item, self.tokenizer, self.room)
        responses = [f"{parts.reasoning}\n\n{step}" if parts.reasoning else step for step in parts.steps]
        return [self._prompt(request, response) for request in parts.requests for response in responses]

    def _prompt(self, request: str, response: str) -> str:
        conversation = [{"role": "user", "content": request}, {"role": "assistant", "content": response}]
        return self.tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)

    @torch.inference_mode()
    def score_batch(self, items: Sequence[StepItem]) -> list[StepScore]:
        if not items:
            return []
        texts, owners = rendered(items, self.render)
        p_unsafe: list[float] = []
        for start in range(0, len(texts), FORWARD_ROWS):  # a long conversation is many texts: bounded memory
            enc = self.tokenizer(texts[start : start + FORWARD_ROWS], padding=True, truncation=True, max_length=self.max_length,
                                 add_special_tokens=False, return_tensors="pt").to(self.device)
            # Left padding puts every row's last token at -1; positions must skip the padding.
            positions = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)
            logits = self.model(**enc, position_ids=positions, logits_to_keep=1).logits[:, -1, :].float()
            p_unsafe += torch.stack([logits[:, self.unsafe_id], logits[:, self.safe_id]], dim=-1).softmax(-1)[:, 0].tolist()
        return highest_per_item([StepScore(p_unsafe=p) for p in p_unsafe], owners, len(items))
