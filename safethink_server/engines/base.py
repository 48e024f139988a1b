"""The engine contract the steering loop drives. One module per engine implements it.

A `Generation` is one sequence being decoded: the prompt, then every token `next_tokens` returned,
then tokens `inject`ed, less tokens `rollback`ed. Engines keep their KV cache and prefill only new
tokens (hf: crop the cache; vllm: resubmit token ids so the prefix cache serves the rest; upstream:
continue through the upstream's own prefix cache).

The contract, exact at any batch size:
- `next_tokens` returns one or more new tokens. Only the caller's reading of them commits them: the
  steering loop reads through a `SequenceCursor`, which rolls the unread rest of a batch back
  before any rollback or injection. So the engine's sequence is always exactly what the loop has
  seen, plus what it injected.
- `rollback(n)` removes exactly the last n tokens of that sequence: the tokens the loop read since
  its checkpoint, never a token it did not read, never a token before the checkpoint.
- `inject(ids)` appends ids; the next `next_tokens` samples after them. An engine that sampled a
  token ahead (hf samples with the injection forward) never lets that unread token into the
  sequence when another rollback or injection comes first.
- `abort` frees the engine's slot at once; it is safe to call at any time and more than once.
  The slot is owned from `Engine.start` until `abort`, whatever ends the request.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, Field

from safethink_server.prompt import Conversation, PromptError, RenderedPrompt, prompt_ids, render_chat, render_raw
from safethink_server.schema import (
    INT64_MAX,
    INT64_MIN,
    MAX_TOP_LOGPROBS,
    ReasoningConfig,
    RequestStatus,
    SamplingFields,
    TokenizeOptions,
    TokenizeResponse,
)


class SamplingParams(SamplingFields):
    max_tokens: int = Field(default=512, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=INT64_MIN, le=INT64_MAX)
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS,
                                 description="None: no logprobs; else the sampled token's and this many alternatives")
    answer_constraint: dict[str, Any] | None = Field(
        default=None, description="structured output for the answer section only (vLLM's StructuredOutputsParams "
                                  "fields; an upstream's: the request fields it applies itself)")


class TokenLogprob(BaseModel):
    """One sampled token's log probability and the likeliest alternatives, each token as an id of the
    engine's tokenizer, or as text where the engine has only text (an upstream's logprobs)."""

    token_id: int | str
    logprob: float
    top: list[tuple[int | str, float]] = []


@dataclass(frozen=True)
class CallPiece:
    """A piece of a streamed answer with tool calls: text that goes out as content, or a piece of the
    arguments of call `index`; `name` is set on a call's first piece (its id and name go out with it)."""

    content: str | None = None
    index: int = 0
    name: str | None = None
    arguments: str = ""


class CallStreamer(ABC):
    """One choice's released answer text, read into call pieces as it comes."""

    @abstractmethod
    def feed(self, text: str) -> list[CallPiece]: ...


class NamedCall(CallStreamer):
    """A forced function: the answer is its arguments."""

    def __init__(self, name: str) -> None:
        self.name: str | None = name

    def feed(self, text: str) -> list[CallPiece]:
        header = [CallPiece(name=self.name)] if self.name is not None else []
        self.name = None
        return [*header, CallPiece(arguments=text)]


class ToolCallReader(ABC):
    """Turns a choice's answer text into tool calls, for an engine that honours `tools`."""

    named: str | None = None  # a forced function: the answer is its arguments, streamed as they are released

    @abstractmethod
    def final(self, answer: str) -> tuple[str | None, list[tuple[str, str]]]:
        """(content left over, [(function name, arguments JSON)]) from the whole answer."""

    def streamer(self) -> CallStreamer | None:
        """A new choice's reader of the answer as it is released; None: calls are read from the whole
        answer (`final`), so the answer is held until the choice ends."""
        return NamedCall(self.named) if self.named is not None else None

    def plain(self, text: str) -> str:
        """Answer text that goes out as content (a refused answer's judged start), as the client reads it."""
        return text


class AnswerFormat(BaseModel):
    """What a request asks of the answer beyond text: a structured output from the answer's first
    token, and tool calls read from it."""

    model_config = {"arbitrary_types_allowed": True}
    constraint: dict[str, Any] | None = None
    tools: ToolCallReader | None = None
    finish_with_tool_calls: bool = True  # finish_reason "tool_calls" when calls were made (not for a forced function)
    keep_special_tokens: bool = False  # the tool parser reads special tokens (hermes' <tool_call> in Qwen's vocabulary)


class EngineError(RuntimeError):
    """The engine failed, with what the API answers: its status, error code and type, the request
    field at fault where there is one, how the request is counted, and (`kind`) the backend failure
    it was, for the metrics of an upstream's failures."""

    status = 500
    code: str | None = None
    error_type: str | None = "server_error"
    counted_as = RequestStatus.ERROR
    kind: str | None = None
    param: str | None = None

    @property
    def client_message(self) -> str:
        return f"generation failed: {self}"


class EngineOverloaded(EngineError):
    """No slot free and the wait queue is full: the API answers 503."""

    status = 503
    code = "overloaded"
    error_type = None
    counted_as = RequestStatus.OVERLOADED

    @property
    def client_message(self) -> str:
        return f"server overloaded: {self}"


class Generation(ABC):
    @abstractmethod
    async def next_tokens(self) -> list[int]:
        """Newly sampled token ids (at least one), ending with EOS when the model stops."""

    @abstractmethod
    async def rollback(self, n_tokens: int) -> None:
        """Forget the last `n_tokens` of the sequence (returned or injected)."""

    @abstractmethod
    async def inject(self, token_ids: list[int]) -> None:
        """Append forced tokens; only they are prefilled."""

    @abstractmethod
    async def abort(self) -> None:
        """Stop at once and free the engine's slot; safe to call twice."""

    @property
    @abstractmethod
    def prefilled_tokens(self) -> int:
        """Tokens the engine ran a forward over for this sequence so far (prompt prefill included)."""

    finished_by_length = False  # the EOS last returned marks the engine's own token limit, not the model's stop
    system_fingerprint: str | None = None  # the backend's configuration, where it reports one (an upstream)

    async def begin_answer(self) -> None:
        """The answer section begins after the last token read: an engine that constrains the answer
        (`SamplingParams.answer_constraint`) samples every later token under the constraint. Engines
        that do not honour a constraint never get one: the API refuses the fields that ask for it."""
        return None

    def token_logprobs(self, start: int, end: int) -> list[TokenLogprob | None]:
        """The logprobs of the tokens at output positions `start`..`end` of the sequence (None for
        injected ones), where the sampling asked for them."""
        raise NotImplementedError(f"{type(self).__name__} does not return logprobs")

    def logprob_entries(self, start: int, end: int) -> list[tuple[int, TokenLogprob]]:
        """The entries of output positions `start`..`end`, each with the first position its text covers
        (its own, where ids are tokens; an upstream event's first byte, where ids are bytes)."""
        return [(position, entry) for position, entry in enumerate(self.token_logprobs(start, end), start) if entry is not None]

    def token_usage(self) -> tuple[int, int] | None:
        """(prompt, completion) tokens when the engine counts them itself (upstream); else None."""
        return None

    def token_count_at(self, position: int) -> int | None:
        """Tokens of the output's first `position` ids, where the engine's ids are not tokens and it
        knows the count (an upstream that gives token ids); else None."""
        return None


class SequenceCursor:
    """Reads a generation token by token and keeps the contract above: the unread rest of a batch
    is rolled back before any rollback or injection, so nothing the reader has not seen stays in
    the sequence."""

    def __init__(self, generation: Generation) -> None:
        self.generation = generation
        self._batch: list[int] = []
        self._read = 0

    async def next(self) -> int:
        if self._read == len(self._batch):
            self._batch, self._read = await self.generation.next_tokens(), 0
        token = self._batch[self._read]
        self._read += 1
        return token

    async def peek(self) -> list[int]:
        """The unread rest of the batch (the next batch once it is all read), not read yet."""
        if self._read == len(self._batch):
            self._batch, self._read = await self.generation.next_tokens(), 0
        return self._batch[self._read :]

    def advance(self, n_tokens: int) -> None:
        """Read `n_tokens` of what `peek` returned."""
        assert 0 < n_tokens <= self.unread
        self._read += n_tokens

    @property
    def finished_by_length(self) -> bool:
        return self.generation.finished_by_length

    @property
    def unread(self) -> int:
        """Tokens of the current batch not read yet: the next read will not wait for the engine."""
        return len(self._batch) - self._read

    def _take_unread(self) -> int:
        unread = self.unread
        self._batch, self._read = [], 0
        return unread

    async def rollback(self, n_tokens: int) -> None:
        """Roll back the last `n_tokens` read (and the unread rest of the batch)."""
        total = n_tokens + self._take_unread()
        if total:
            await self.generation.rollback(total)

    async def inject(self, token_ids: list[int]) -> None:
        unread = self._take_unread()
        if unread:
            await self.generation.rollback(unread)
        await self.generation.inject(token_ids)


# Request fields every engine honours; each engine adds what it supports (`Engine.honoured_fields`).
COMMON_FIELDS = frozenset({"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stop",
                           "n", "stream", "stream_options", "safethink", "continue_final_message", "add_generation_prompt",
                           "chat_template_kwargs", "reasoning_effort"})
SAMPLING_FIELDS = frozenset(SamplingFields.model_fields)
# What `next_tokens` returns where the sequence ends without an end-of-sequence token of the model's
# (a limit, a stop token id, a request that ignores EOS); never a token of the sequence.
SEQUENCE_END = -1


class Engine(ABC):
    name: str
    honoured_fields: frozenset[str] = COMMON_FIELDS
    model_name: str
    tokenizer: Any  # a transformers tokenizer (chat template, encode, decode), or the upstream's byte tokenizer
    counts_tokens = True  # False: the steering loop's ids are not model tokens (upstream: bytes)
    # True: a structured answer is applied from where the answer begins by the engine's backend itself
    # (an upstream's reasoning parser), so the loop need not resample the answer's first token.
    constrains_answer_itself = False
    ids_per_token = 1  # loop ids per model token, to scale token-denominated limits (upstream: ~4 bytes)
    vocab_size: int | None = None  # token ids are checked against it where known (None: the backend checks them)
    max_model_len: int | None = None  # the context the engine knows (None or 0: the tokenizer's model_max_length)

    @abstractmethod
    async def start(self, prompt: RenderedPrompt, sampling: SamplingParams, conversation: Conversation,
                    model: str | None = None) -> Generation:
        """Reserve a slot (queueing if needed) and begin decoding after the prompt. If this raises,
        no slot is held."""

    async def render(self, conversation: Conversation, reasoning: ReasoningConfig, model: str | None = None) -> RenderedPrompt:
        """The prompt for a conversation; local engines render with their tokenizer, off the event loop."""
        return await asyncio.to_thread(render_chat, self.tokenizer, conversation, reasoning)

    async def render_raw(self, prompt: str | list[int], reasoning: ReasoningConfig, model: str | None = None,
                         add_special_tokens: bool = True) -> RenderedPrompt:
        """A raw prompt for `/v1/completions` (text, or token ids), off the event loop."""
        return await asyncio.to_thread(render_raw, self.tokenizer, prompt, reasoning, add_special_tokens)

    def model_ids(self) -> list[str]:
        return [self.model_name]

    async def tokenize(self, prompt: str | list[dict[str, Any]], options: TokenizeOptions, max_model_len: int,
                       model: str | None = None) -> TokenizeResponse:
        """`/tokenize`: a text, or messages (as `ChatMessage.for_template` gives them) rendered with the
        model's template. Local engines use their tokenizer, off the event loop."""
        ids = await asyncio.to_thread(prompt_ids, self.tokenizer, prompt, options)
        strs = self.tokenizer.convert_ids_to_tokens(ids) if options.return_token_strs else None
        return TokenizeResponse(count=len(ids), max_model_len=max_model_len, tokens=ids, token_strs=strs)

    async def detokenize(self, ids: list[int], model: str | None = None) -> str:
        """`/detokenize`: ids to text; PromptError naming `tokens` for an id outside the vocabulary."""
        if any(not 0 <= token < (self.vocab_size or 2**31) for token in ids):
            raise PromptError("a token id is outside the vocabulary", param="tokens")
        return str(await asyncio.to_thread(self.tokenizer.decode, ids))

    def answer_format(self, request: dict[str, Any]) -> AnswerFormat | None:
        """Tools and structured outputs of a request (its fields as sent); only engines that honour them
        implement this. PromptError, naming the field, for a request they cannot serve."""
        return None

    def accepts_model(self, name: str) -> bool:
        return name in self.model_ids()

    def reasoning_for(self, configured: ReasoningConfig, conversation: Conversation | None = None) -> ReasoningConfig:
        """The reasoning settings as this engine's token stream needs them, for a chat request's
        conversation (None: a raw prompt)."""
        return configured

    @property
    def eos_token_ids(self) -> set[int]:
        ids = self.tokenizer.eos_token_id
        return set(ids) if isinstance(ids, list) else {ids}

    def end_ids(self, sampling: SamplingParams) -> set[int]:
        """The ids that end a generation's sequence: SEQUENCE_END, and the model's end-of-sequence ids
        unless the request ignores them (`ignore_eos`: they are tokens like any other)."""
        return {SEQUENCE_END} | (set() if sampling.ignore_eos else self.eos_token_ids)

    async def open(self) -> None:
        """Start what needs the server's event loop (called once before serving)."""
        return None

    async def close(self) -> None:
        return None

    def stats(self) -> dict[str, int | str]:
        return {}

    def dead_reason(self) -> str | None:
        """Why the engine can serve no more requests, if it cannot (the pod should be restarted)."""
        return None
