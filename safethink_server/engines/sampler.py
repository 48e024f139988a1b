"""Sampling for the `hf` engine: a request's sampling fields applied to one position's logits in
vLLM's order (allowed_token_ids and bad_words, min_tokens and logit_bias, penalties, temperature,
min_p, top_k, top_p), and logprobs taken from the raw logits, as vLLM reports them by default."""

from __future__ import annotations

from typing import Any

import torch

from safethink_server.engines.base import SamplingParams, TokenLogprob

GREEDY_BELOW = 1e-5  # as vLLM: a smaller temperature is greedy (dividing by it would overflow the logits)


def bad_words_token_ids(tokenizer: Any, words: list[str]) -> list[list[int]]:
    """Each bad word as token ids, as vLLM encodes it: the word alone, and after a space where that
    is another token sequence of the same length (the word in the middle of text)."""
    out: list[list[int]] = []
    for word in words:
        alone = tokenizer.encode(word.lstrip(), add_special_tokens=False)
        if not alone:
            continue
        out.append(alone)
        spaced = tokenizer.encode(" " + word.lstrip(), add_special_tokens=False)
        if spaced and spaced[0] != alone[0] and len(spaced) == len(alone):
            out.append(spaced)
    return out


class TokenSampler:
    def __init__(self, sampling: SamplingParams, vocab_size: int, eos_ids: set[int], bad_words: list[list[int]] | None = None) -> None:
        self.sampling = sampling
        self.vocab_size = vocab_size
        self.bad_words = bad_words or []
        self.allowed_ids = torch.tensor(sorted(set(sampling.allowed_token_ids or [])), dtype=torch.long)
        self._allowed_mask: torch.Tensor | None = None  # 0 at the allowed ids, -inf elsewhere; sized to the logits
        bias = sampling.logit_bias_ids()
        self.bias_ids = torch.tensor(list(bias), dtype=torch.long)
        self.bias_values = torch.tensor(list(bias.values()), dtype=torch.float32)
        self.eos_ids = torch.tensor(sorted(i for i in eos_ids if i < vocab_size), dtype=torch.long)
        self.penalised = bool(sampling.frequency_penalty or sampling.presence_penalty
                              or (sampling.repetition_penalty not in (None, 1.0)))

    def sample(self, logits: torch.Tensor, ids: list[int], prompt_len: int,
               generator: torch.Generator) -> tuple[int, TokenLogprob | None]:
        """The next token after `ids` (the prompt's first `prompt_len`), and its logprob entry when asked for."""
        logits = logits.float()
        raw = logits
        s = self.sampling
        if len(self.allowed_ids):
            if self._allowed_mask is None:
                self._allowed_mask = torch.full_like(logits, float("-inf")).index_fill(0, self.allowed_ids, 0.0)
            logits = logits + self._allowed_mask
        banned = self._banned(ids[prompt_len:]) if self.bad_words else []
        if banned:
            logits = logits.index_fill(0, torch.tensor(banned, dtype=torch.long), float("-inf"))
        if len(ids) - prompt_len < s.min_tokens and len(self.eos_ids):
            logits = logits.index_fill(0, self.eos_ids, float("-inf"))
        if len(self.bias_ids):
            logits = logits.index_add(0, self.bias_ids, self.bias_values)
        if self.penalised:
            logits = self._penalise(logits, ids[:prompt_len], ids[prompt_len:])
        if not torch.isfinite(logits).any():  # the bans and min_tokens left nothing: the allowed ids alone decide
            logits = raw if self._allowed_mask is None else raw + self._allowed_mask
        token = self._choose(logits, generator)
        return token, (self._logprob(raw, token) if s.logprobs is not None else None)

    def _banned(self, output_ids: list[int]) -> list[int]:
        """The last token of each bad word whose other tokens the output ends with."""
        return [word[-1] for word in self.bad_words
                if word[-1] < self.vocab_size and (len(word) == 1 or output_ids[len(output_ids) - len(word) + 1 :] == word[:-1])]

    def _penalise(self, logits: torch.Tensor, prompt_ids: list[int], output_ids: list[int]) -> torch.Tensor:
        s = self.sampling
        logits = logits.clone()
        counts = torch.bincount(torch.tensor(output_ids, dtype=torch.long), minlength=self.vocab_size)[: self.vocab_size].float()
        if s.repetition_penalty not in (None, 1.0):
            seen = counts > 0
            seen[torch.tensor(prompt_ids, dtype=torch.long)] = True
            penalty = float(s.repetition_penalty)  # type: ignore[arg-type]
            logits[seen] = torch.where(logits[seen] > 0, logits[seen] / penalty, logits[seen] * penalty)
        if s.frequency_penalty:
            logits -= s.frequency_penalty * counts
        if s.presence_penalty:
            logits -= s.presence_penalty * (counts > 0).float()
        return logits

    def _choose(self, logits: torch.Tensor, generator: torch.Generator) -> int:
        s = self.sampling
        if s.temperature < GREEDY_BELOW:
            return int(logits.argmax())
        probs = torch.softmax(logits / s.temperature, dim=-1)
        if s.min_p:
            probs = torch.where(probs >= s.min_p * probs.max(), probs, torch.zeros_like(probs))
        if s.top_k and 0 < s.top_k < probs.numel():
            kth = probs.topk(s.top_k).values[-1]
            probs = torch.where(probs >= kth, probs, torch.zeros_like(probs))
        if s.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            sorted_probs = sorted_probs / sorted_probs.sum()
            keep = sorted_probs.cumsum(-1) - sorted_probs < s.top_p
            sorted_probs = torch.where(keep, sorted_probs, torch.zeros_like(sorted_probs))
            return int(order[torch.multinomial(sorted_probs, 1, generator=generator)])
        return int(torch.multinomial(probs, 1, generator=generator))

    def _logprob(self, raw: torch.Tensor, token: int) -> TokenLogprob:
        logprobs = torch.log_softmax(raw, dim=-1)
        k = self.sampling.logprobs or 0
        top = logprobs.topk(k) if k else None
        alternatives = list(zip(top.indices.tolist(), top.values.tolist(), strict=True)) if top is not None else []
        return TokenLogprob(token_id=token, logprob=float(logprobs[token]), top=alternatives)
