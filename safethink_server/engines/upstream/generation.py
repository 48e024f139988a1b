"""One upstream request as the steering loop drives it: streamed, rolled back, continued, its reasoning and tool calls folded into text."""

from __future__ import annotations

import re
from typing import Any, Literal, Protocol

import aiohttp
from pydantic import BaseModel

from safethink_server.engines.base import EngineError, Generation, SamplingParams, TokenLogprob
from safethink_server.engines.upstream.answer import ToolCallFolder, without_marks
from safethink_server.engines.upstream.bytes import BYTES_PER_TOKEN, END
from safethink_server.engines.upstream.config import UpstreamConfig
from safethink_server.engines.upstream.errors import UpstreamError, transport_error
from safethink_server.engines.upstream.stream import EventReader
from safethink_server.engines.upstream.tokens import TokenMarks
from safethink_server.prompt import Conversation, RenderedPrompt
from safethink_server.schema import SamplingFields, seed_plus

_FINGERPRINT = re.compile(r"[A-Za-z0-9_.:+-]{1,128}")  # an upstream's system_fingerprint, passed back to the client


class UpstreamLink(Protocol):
    """What a generation needs of the engine that made it: its settings, its connection and its slot."""

    config: UpstreamConfig
    returns_token_ids: bool

    async def tokenize_text(self, model: str, text: str) -> list[int]: ...

    async def send(self, path: str, body: dict[str, Any]) -> aiohttp.ClientResponse: ...

    def release(self) -> None: ...


class UpstreamUsage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0


class UpstreamGeneration(Generation):
    def __init__(self, engine: UpstreamLink, model: str, conversation: Conversation, prompt: RenderedPrompt,
                 sampling: SamplingParams) -> None:
        self.engine = engine
        self.model = model
        self.messages = conversation.messages
        self.template_kwargs = conversation.template_kwargs
        self.mode: Literal["token_ids", "chat"] = "token_ids" if prompt.ids else "chat"  # the route render() took
        self.opening = prompt.opening if self.mode == "chat" else ""  # chat mode: the prefill, continued upstream
        self.sampling = sampling
        self.kept = bytearray()  # the kept output: bytes sampled upstream and bytes injected here
        self.kept_tokens = 0  # tokens of `kept` when the current request was sent
        self.prompt_ids: list[int] = list(prompt.ids)  # token_ids mode: the rendered prompt, opening included
        self.usage: UpstreamUsage | None = None  # the upstream's count for the last request that finished
        self._usage_kept_tokens = 0  # kept tokens sent with that request
        self._usage_bytes = 0  # bytes that request generated
        self._request_bytes = 0
        # Token counts by byte position, where the upstream gives each event's token ids (vLLM).
        self.marks: TokenMarks | None = TokenMarks() if engine.returns_token_ids else None
        self._marker_spans: list[tuple[int, int]] = []  # chat mode: reasoning markers folded into the current event's text
        self.finished_by_length = False
        self.system_fingerprint: str | None = None  # the upstream's, passed back to the client
        # Logprob entries by the output position of the last byte of the event that brought them, and the
        # first byte of that event (the window's end is checked against it).
        self.logprobs_at: dict[int, list[TokenLogprob]] = {}
        self.logprobs_from: dict[int, int] = {}
        self._unplaced: list[TokenLogprob] = []  # of events without text: placed with the next text
        self.continuations = 0
        self._end_returned = False
        self._response: aiohttp.ClientResponse | None = None
        self._events: EventReader | None = None
        self._in_reasoning = False  # chat mode: inside a <think> section this engine opened
        constraint = sampling.answer_constraint or {}
        self._calls = ToolCallFolder() if constraint.get("tools") and constraint.get("tool_choice") != "none" else None
        self._reasoned = False
        self._closed = False
        self._resync_sections()

    @property
    def prefilled_tokens(self) -> int:
        return self.usage.prompt_tokens if self.usage else 0

    # --- requests -----------------------------------------------------------------------------
    async def open(self) -> None:
        """Send the request for the current kept text; status errors surface here."""
        e = self.engine
        text = self.kept.decode("utf-8", errors="replace")
        body: dict[str, Any] = {"model": self.model, "stream": True, "stream_options": {"include_usage": True},
                                "temperature": self.sampling.temperature, "top_p": self.sampling.top_p,
                                **self.sampling.model_dump(include=set(SamplingFields.model_fields), exclude_defaults=True)}
        if self.sampling.answer_constraint:  # tools and structured outputs: the upstream applies them
            body.update(self.sampling.answer_constraint)
        if self.sampling.seed is not None:  # a continuation derives its seed, kept within 64 bits
            body["seed"] = seed_plus(self.sampling.seed, self.continuations)
        if self.sampling.logprobs is not None:
            if self.mode == "token_ids":
                body["logprobs"] = self.sampling.logprobs
            else:
                body.update(logprobs=True, top_logprobs=self.sampling.logprobs)
        if self.marks is not None:
            body["return_token_ids"] = True
        if self.mode == "token_ids":
            kept_ids = await e.tokenize_text(self.model, text) if text else []
            self.kept_tokens = len(kept_ids)
            if self.marks is not None:
                self.marks.rebase(len(self.kept), len(kept_ids))
            body["prompt"] = self.prompt_ids + kept_ids
            if body.get("truncate_prompt_tokens", -1) != -1:  # cut here already: the upstream would cut the kept text too
                del body["truncate_prompt_tokens"]
            path = "/completions"
        else:
            if self.marks is not None and self.marks.complete:
                self.marks.add_estimated(len(self.kept), BYTES_PER_TOKEN)  # text injected here: no tokenizer in chat mode
                self.kept_tokens = self.marks.at(len(self.kept))
            else:
                self.kept_tokens = round(len(self.kept) / BYTES_PER_TOKEN)  # chat mode has no tokenizer: an estimate
            body["messages"] = self.messages
            template = dict(self.template_kwargs)
            if "reasoning_effort" in template:  # a field of its own in the chat API (OpenAI's, gpt-oss on vLLM)
                body["reasoning_effort"] = template.pop("reasoning_effort")
            if template:
                body["chat_template_kwargs"] = template
            assistant = self.opening + text
            if assistant:
                body["messages"] = self.messages + [{"role": "assistant", "content": assistant}]
                body.update(continue_final_message=True, add_generation_prompt=False)
            path = "/chat/completions"
        self._request_bytes = 0
        remaining = self.sampling.max_tokens - self.kept_tokens
        if remaining <= 0:
            self.finished_by_length = True
            return
        body["max_tokens"] = remaining
        if self.sampling.min_tokens:
            body["min_tokens"] = min(remaining, max(0, self.sampling.min_tokens - self.kept_tokens))
        self._response = await e.send(path, body)
        self._events = EventReader(self._response.content.iter_any(), e.config.first_byte_timeout_s, e.config.chunk_timeout_s)

    def token_usage(self) -> tuple[int, int] | None:
        """(prompt, completion) tokens of the final sequence. The prompt is exact in token_ids mode and
        from the upstream's count in chat mode; the completion (kept text, injected text included) is
        counted from the upstream's token ids where it gives them (vLLM), else converted from bytes at
        the bytes-per-token rate of the upstream's last counted answer. (The prompt is exact on the
        token_ids route; on the chat route it is the upstream's count.)"""
        bytes_per_token = float(BYTES_PER_TOKEN)
        if self.prompt_ids:
            prompt = len(self.prompt_ids)
        elif self.usage is not None:
            prompt = max(0, self.usage.prompt_tokens - self._usage_kept_tokens)
        else:
            prompt = round(sum(len(m["content"].encode()) for m in self.messages) / BYTES_PER_TOKEN)
        if self.marks is not None and self.marks.complete:
            return prompt, self.marks.at(len(self.kept))
        if self.usage is not None and self.usage.completion_tokens and self._usage_bytes:
            bytes_per_token = self._usage_bytes / self.usage.completion_tokens
        return prompt, round(len(self.kept) / bytes_per_token)

    def token_count_at(self, position: int) -> int | None:
        if self.marks is None or not self.marks.complete:
            return None
        return self.marks.at(position)

    async def _close(self) -> None:
        response, events, self._response, self._events = self._response, self._events, None, None
        try:
            if events is not None:
                await events.aclose()
        finally:
            if response is not None:
                response.close()  # closing the connection makes the upstream abort the request

    # --- the Generation protocol --------------------------------------------------------------
    async def next_tokens(self) -> list[int]:
        if self._closed:
            raise EngineError("generation was aborted")
        if self._events is None and not self.finished_by_length:
            self.continuations += 1
            await self.open()
        if self._events is None:
            self._end_returned = True
            return [END]
        while True:
            try:
                events = await self._events.take()
            except StopAsyncIteration:
                await self._close()
                raise UpstreamError("the upstream ended the stream without a finish reason", 502, "closed") from None
            except (aiohttp.ClientError, OSError) as exc:
                await self._close()
                raise transport_error(exc, mid_stream=True) from exc
            text: list[str] = []
            end = len(self.kept)
            for at, event in enumerate(events):
                self._marker_spans.clear()
                self._take_usage(event)
                choices = event.get("choices") or []
                if not choices:
                    continue
                choice = choices[0]
                text.append((choice.get("text") or "") if self.mode == "token_ids" else self._chat_text(choice.get("delta") or {}))
                if self.sampling.logprobs is not None or self.marks is not None:
                    start, end = end, end + len(text[-1].encode("utf-8"))
                    if self.sampling.logprobs is not None:
                        self._place_logprobs(choice.get("logprobs"), start, end)
                    if self.marks is not None:
                        self._mark(choice.get("token_ids"), start, end)
                if choice.get("finish_reason") is not None:
                    self.finished_by_length = choice["finish_reason"] == "length"
                    data = self._keep(text)
                    for rest in events[at + 1 :]:
                        self._take_usage(rest)
                    await self._read_final_usage()
                    self._end_returned = True
                    return data + [END]
            data = self._keep(text)
            if data:
                return data

    def _mark(self, token_ids: Any, start: int, end: int) -> None:
        """An event's token count at the end of its text; markers this engine wrote into it count none."""
        marks = self.marks
        assert marks is not None
        if not marks.complete:
            return
        if not isinstance(token_ids, list):
            if end > start:
                marks.complete = False  # text without its count: usage falls back to the estimate
            return  # (an event without text, as vLLM's first chat event, is no tokens)
        for span_start, span_end in self._marker_spans:
            marks.add(start + span_start, 0)
            marks.add(start + span_end, 0)
        marks.add(end, len(token_ids))

    def _place_logprobs(self, logprobs: Any, start: int, end: int) -> None:
        """An event's entries go out once its text has all been released: they sit at its last byte.
        The entries of events without text (a marker, a tool-call token the upstream's parser holds)
        wait for the next event with text, whose tokens they come before."""
        self._unplaced += upstream_logprobs(logprobs)
        if self._unplaced and end > start:
            self.logprobs_at[end - 1] = self.logprobs_at.get(end - 1, []) + self._unplaced
            self.logprobs_from.setdefault(end - 1, start)
            self._unplaced = []

    def token_logprobs(self, start: int, end: int) -> list[TokenLogprob | None]:
        return [entry for at in range(start, end) for entry in self.logprobs_at.get(at, ())]

    def logprob_entries(self, start: int, end: int) -> list[tuple[int, TokenLogprob]]:
        return [(self.logprobs_from[at], entry) for at in range(start, end) for entry in self.logprobs_at.get(at, ())]

    def _keep(self, text: list[str]) -> list[int]:
        data = "".join(text).encode("utf-8")
        self.kept += data
        self._request_bytes += len(data)
        return list(data)

    def _take_usage(self, event: dict[str, Any]) -> None:
        fingerprint = event.get("system_fingerprint")
        if isinstance(fingerprint, str) and _FINGERPRINT.fullmatch(fingerprint):  # an identifier, or not passed back
            self.system_fingerprint = fingerprint
        if event.get("usage"):
            self.usage = UpstreamUsage.model_validate(event["usage"])
            self._usage_kept_tokens, self._usage_bytes = self.kept_tokens, self._request_bytes

    async def _read_final_usage(self) -> None:
        """After the finish reason only the usage event and [DONE] follow: read them, then close."""
        try:
            while self._events is not None:
                for event in await self._events.take():
                    self._take_usage(event)
        except (StopAsyncIteration, UpstreamError, aiohttp.ClientError, OSError):
            pass  # the answer is complete; a missing usage event only loses the counts
        finally:
            await self._close()

    def _chat_text(self, delta: dict[str, Any]) -> str:
        """Fold reasoning fields back into text between the configured reasoning markers."""
        reasoning = delta.get("reasoning_content") or delta.get("reasoning") or ""
        content = delta.get("content") or ""
        if self._calls is not None:  # tool calls folded into the answer text, where they are judged
            reasoning = without_marks(reasoning)  # (reasoning may come after the answer has begun)
            content = self._calls.fold(content, delta.get("tool_calls"))
        text = ""
        if reasoning:
            if not self._in_reasoning and not self._reasoned:
                text += self._folded_marker(text, self.engine.config.reasoning.start_marker)
            self._in_reasoning = self._reasoned = True
            text += reasoning
        if content:
            if self._in_reasoning:
                text += self._folded_marker(text, self.engine.config.reasoning.end_marker)
                self._in_reasoning = False
            text += content
        return text

    def _folded_marker(self, before: str, marker: str) -> str:
        """A marker this engine writes into the text: (start, end) offsets within the event's text go to
        `_marker_spans`, where it counts no tokens (the upstream sent none for it)."""
        if self.marks is not None:
            start = len(before.encode("utf-8"))
            self._marker_spans.append((start, start + len(marker.encode("utf-8"))))
        return marker

    async def rollback(self, n_tokens: int) -> None:
        if n_tokens <= 0:
            return
        if self._end_returned:  # the end id is not part of the kept text
            self._end_returned = False
            self.finished_by_length = False
            n_tokens -= 1
        if n_tokens > len(self.kept):
            raise ValueError("cannot roll back into the prompt")
        await self._close()
        del self.kept[len(self.kept) - n_tokens :]
        if self.marks is not None:
            self.marks.cut(len(self.kept))
        self._unplaced = []
        for at in [at for at in self.logprobs_at if at >= len(self.kept)]:
            del self.logprobs_at[at]
            del self.logprobs_from[at]
        self._resync_sections()

    async def inject(self, token_ids: list[int]) -> None:
        if self._closed:
            raise EngineError("generation was aborted")
        if token_ids:
            await self._close()
            self.kept += bytes(i for i in token_ids if i < END)
            self._resync_sections()

    def _resync_sections(self) -> None:
        start, end = self.engine.config.reasoning.start_marker, self.engine.config.reasoning.end_marker
        text = self.opening + self.kept.decode("utf-8", errors="replace")
        self._reasoned = start in text or end in text
        self._in_reasoning = start in text and text.rfind(start) > text.rfind(end)

    async def abort(self) -> None:
        if not self._closed:
            self._closed = True
            try:
                await self._close()
            finally:
                self.engine.release()


def upstream_logprobs(logprobs: Any) -> list[TokenLogprob]:
    """An event's logprobs, in the chat format ({"content": [...]}) or the completions one ({"tokens",
    "token_logprobs", "top_logprobs"}); tokens as the upstream's text."""
    if not isinstance(logprobs, dict):
        return []
    try:
        if "content" in logprobs:
            return [TokenLogprob(token_id=e["token"], logprob=e["logprob"],
                                 top=[(t["token"], t["logprob"]) for t in e.get("top_logprobs") or []])
                    for e in logprobs["content"] or []]
        tops = logprobs.get("top_logprobs") or [None] * len(logprobs["tokens"])
        return [TokenLogprob(token_id=token, logprob=logprob, top=sorted((top or {}).items(), key=lambda t: -t[1]))
                for token, logprob, top in zip(logprobs["tokens"], logprobs["token_logprobs"], tops, strict=True)
                if logprob is not None]
    except (KeyError, TypeError, ValueError) as exc:
        raise UpstreamError(f"the upstream sent malformed logprobs ({type(exc).__name__})", 502, "protocol") from exc

