"""`hf`: the embedded transformers engine. One model, forwards run on one worker thread.

KV-cache steering: `rollback(n)` crops the DynamicCache, `inject(ids)` runs one forward over only
the new tokens. The last sampled token is not in the cache yet (it is `pending`), so an injection
forward covers `[pending] + ids`.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from safethink_server.engines.base import (
    SAMPLING_FIELDS,
    Engine,
    EngineError,
    EngineOverloaded,
    Generation,
    SamplingParams,
    TokenLogprob,
)
from safethink_server.engines.sampler import TokenSampler, bad_words_token_ids
from safethink_server.prompt import Conversation, RenderedPrompt

logger = logging.getLogger(__name__)
OUT_OF_MEMORY_IN_A_ROW = 3
_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


class HFGeneration(Generation):
    """State: `cached_ids` are in the KV cache; `pending` is the last token returned to the caller,
    sampled but not yet in the cache; `lookahead` is a token an injection forward sampled that the
    caller has not read yet (it is not part of the sequence until `next_tokens` returns it).
    `entries` holds a logprob entry per output position (None: injected, or not asked for)."""

    def __init__(self, engine: HFEngine, prompt_ids: list[int], sampling: SamplingParams) -> None:
        self.engine = engine
        self.sampling = sampling
        self.cache = DynamicCache()
        self.cached_ids: list[int] = []
        self.pending: int | None = None
        self.lookahead: int | None = None
        self.prompt_ids = prompt_ids
        bad_words = bad_words_token_ids(engine.tokenizer, sampling.bad_words) if sampling.bad_words else None
        self.sampler = TokenSampler(sampling, engine.vocab_size, engine.eos_token_ids, bad_words)
        self.entries: list[TokenLogprob | None] = []
        self._lookahead_entry: TokenLogprob | None = None
        self.generator = torch.Generator()
        seed = sampling.seed if sampling.seed is not None else int(torch.seed())
        self.generator.manual_seed(seed & (2**64 - 1))  # any 64-bit seed, negative ones included
        self._prefilled = 0
        self._closed = False

    @property
    def prefilled_tokens(self) -> int:
        return self._prefilled

    @property
    def sequence(self) -> list[int]:
        """The prompt and every token kept so far, as the caller sees it."""
        return self.cached_ids + ([self.pending] if self.pending is not None else [])

    def token_logprobs(self, start: int, end: int) -> list[TokenLogprob | None]:
        return self.entries[start:end]

    def _forward_and_sample(self, ids: list[int]) -> tuple[int, TokenLogprob | None]:
        model = self.engine.model
        with torch.inference_mode():
            out = model(
                input_ids=torch.tensor([ids], device=model.device),
                past_key_values=self.cache,
                use_cache=True,
                logits_to_keep=1,
            )
        self.engine.forward_failed(None)
        self.cached_ids.extend(ids)
        self._prefilled += len(ids)
        return self.sampler.sample(out.logits[0, -1], self.cached_ids, len(self.prompt_ids), self.generator)

    def _advance(self) -> int:
        if self.lookahead is not None:
            self.pending, self.lookahead = self.lookahead, None
            self.entries.append(self._lookahead_entry)
            return self.pending
        if self.pending is not None:
            feed = [self.pending]
        elif not self.cached_ids:
            feed = list(self.prompt_ids)
        else:
            # After a bare rollback there are no logits for the last cached token: recompute it.
            feed = [self.cached_ids.pop()]
            self.cache.crop(len(self.cached_ids))
        self.pending, entry = self._forward_and_sample(feed)
        self.entries.append(entry)
        return self.pending

    def _rollback(self, n: int) -> None:
        if n <= 0:
            return
        self.lookahead = None  # never read: not part of the sequence
        if self.pending is not None:
            self.pending = None
            n -= 1
        if n > len(self.cached_ids) - len(self.prompt_ids):
            raise ValueError("cannot roll back into the prompt")
        del self.entries[len(self.cached_ids) - len(self.prompt_ids) - n :]
        if n:
            del self.cached_ids[-n:]
            self.cache.crop(-n)

    def _inject(self, ids: list[int]) -> None:
        if not ids:
            return
        self.lookahead = None  # an unread sample is replaced by what follows the injection
        feed = ([self.pending] if self.pending is not None else []) + list(ids)
        self.pending = None
        if not self.cached_ids:
            feed = list(self.prompt_ids) + feed
        self.entries += [None] * len(ids)
        self.lookahead, self._lookahead_entry = self._forward_and_sample(feed)

    async def _run(self, fn, *args):  # type: ignore[no-untyped-def]
        if self._closed:
            raise EngineError("generation was aborted")
        try:
            result = await asyncio.get_running_loop().run_in_executor(self.engine.executor, fn, *args)
        except (ValueError, EngineError):
            raise
        except Exception as exc:
            logger.exception("a model forward failed")
            self.engine.forward_failed(exc)
            raise EngineError("the model forward failed") from exc  # (its text stays in the server's log)
        return result

    async def next_tokens(self) -> list[int]:
        return [await self._run(self._advance)]

    async def rollback(self, n_tokens: int) -> None:
        await self._run(self._rollback, n_tokens)

    async def inject(self, token_ids: list[int]) -> None:
        await self._run(self._inject, token_ids)

    async def abort(self) -> None:
        if not self._closed:
            self._closed = True
            self.cache = DynamicCache()
            self.engine.release_slot()


def out_of_memory(exc: BaseException) -> bool:
    """An allocation that failed: a GPU's OutOfMemoryError, Python's MemoryError, or the CPU allocator's
    RuntimeError ("DefaultCPUAllocator: can't allocate memory", or a C++ std::bad_alloc), which torch
    raises on CPU."""
    return isinstance(exc, MemoryError | torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and any(sign in str(exc) for sign in ("can't allocate memory", "std::bad_alloc")))


class HFEngine(Engine):
    name = "hf"
    honoured_fields = Engine.honoured_fields | SAMPLING_FIELDS - {"stop_token_ids", "priority"} | {"logprobs", "top_logprobs"}

    def __init__(self, model_path: Path, model_name: str, dtype: str = "bfloat16",
                 max_concurrent_sequences: int = 1, max_queued_requests: int = 64, device: str = "cpu") -> None:
        self.model_name = model_name
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=_DTYPES[dtype]).to(device).eval()
        self.vocab_size = int(self.model.get_output_embeddings().weight.shape[0])
        # All forwards on one thread: torch already uses every core inside a forward.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hf-engine")
        self.max_concurrent = max_concurrent_sequences
        self.max_queued = max_queued_requests
        self._slots = asyncio.Semaphore(max_concurrent_sequences)
        self._waiting = 0
        self._running = 0
        self.failure: str | None = None  # what killed the engine, if anything did
        self._out_of_memory = 0  # forwards in a row that ran out of memory

    async def start(self, prompt: RenderedPrompt, sampling: SamplingParams, conversation: Conversation,
                    model: str | None = None) -> Generation:
        if self._slots.locked() and self._waiting >= self.max_queued:
            raise EngineOverloaded(f"{self._waiting} requests are already waiting for the engine")
        self._waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self._waiting -= 1
        try:
            generation = HFGeneration(self, prompt.ids, sampling)
        except BaseException:
            self._slots.release()
            raise
        self._running += 1
        return generation

    def release_slot(self) -> None:
        self._running -= 1
        self._slots.release()

    def stats(self) -> dict[str, int | str]:
        return {"running": self._running, "waiting": self._waiting}

    def forward_failed(self, exc: Exception | None) -> None:
        """One request's forward running out of memory fails that request; several in a row, with
        nothing succeeding between them, mean the process is unusable: the engine is dead."""
        if exc is None:
            self._out_of_memory = 0
        elif out_of_memory(exc):
            self._out_of_memory += 1
            if self._out_of_memory >= OUT_OF_MEMORY_IN_A_ROW:
                self.failure = f"{self._out_of_memory} forwards in a row ran out of memory"

    def dead_reason(self) -> str | None:
        if getattr(self.executor, "_shutdown", False):
            return "the engine's worker thread is shut down"
        return self.failure

    async def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
