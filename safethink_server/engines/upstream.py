"""`upstream`: a steering gateway in front of an OpenAI-compatible deployment (vLLM, SGLang,
llama.cpp's server, this project's own server).

The steering loop needs a token stream it can roll back and extend. Here the tokens are the UTF-8
bytes of the upstream's text (ids 0-255, 256 = end), which round-trip exactly whatever tokenizer the
upstream model uses; token counts for clients come from the upstream's own `usage`.

Two ways to talk to the upstream, chosen by `--upstream-mode` (`auto` detects):
- `token_ids` (vLLM, SGLang): the prompt is rendered by the upstream's `/tokenize` (it takes chat
  messages) and generated through `/v1/completions` with token ids. The text is the model's raw
  text, reasoning markers included, exactly as the local engines see it. A continuation after an
  injection sends `prompt ids + /tokenize(kept text)`, so the upstream's prefix cache serves it.
- `chat`: `/v1/chat/completions` (also, in token_ids mode, for a request with tools, which
  /v1/completions would ignore). Reasoning arrives as `delta.reasoning_content`, `delta.reasoning`
  or `<think>` text inside `content`; this engine folds the first two back into `<think>...</think>`
  text so that one splitter serves all three. A continuation resends the messages with the kept
  text as a final assistant message and `continue_final_message` (vLLM, SGLang, this server).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from typing import Any, Literal

import aiohttp
from pydantic import BaseModel, Field

from safethink_server.engines.base import (
    SAMPLING_FIELDS,
    AnswerFormat,
    Engine,
    EngineError,
    EngineOverloaded,
    Generation,
    SamplingParams,
    TokenLogprob,
)
from safethink_server.engines.upstream_answer import ANSWER_FIELDS, ToolCallFolder, answer_format, without_marks
from safethink_server.engines.upstream_errors import UpstreamError, logged, status_error, transport_error
from safethink_server.engines.upstream_stream import EventReader
from safethink_server.engines.upstream_tokens import TokenMarks
from safethink_server.prompt import Conversation, PromptError, RenderedPrompt, open_turn, raw_prompt_section
from safethink_server.schema import ReasoningConfig, SamplingFields, seed_plus

logger = logging.getLogger(__name__)

END = 256  # the end-of-sequence id of the byte stream
BYTES_PER_TOKEN = 4  # to turn token-denominated limits into byte counts where no tokenizer is at hand
_FINGERPRINT = re.compile(r"[A-Za-z0-9_.:+-]{1,128}")  # an upstream's system_fingerprint, passed back to the client


class UpstreamConfig(BaseModel):
    url: str = Field(description="base URL of the upstream's OpenAI API, ending in /v1")
    api_key: str | None = None
    model: str | None = Field(default=None, description="model name upstream (default: its first listed model)")
    mode: Literal["auto", "token_ids", "chat"] = "auto"
    reasoning_start: str = Field(default="<think>", description="chat mode: reasoning fields are folded back between these markers")
    reasoning_end: str = "</think>"
    connect_timeout_s: float = Field(default=5.0, gt=0)
    first_byte_timeout_s: float = Field(default=60.0, gt=0, description="request sent to first streamed event")
    chunk_timeout_s: float = Field(default=30.0, gt=0, description="longest silence between streamed events")
    max_connections: int = Field(default=256, ge=1)


class ByteTokenizer:
    """Tokens are UTF-8 bytes: exact round trips, and no tokenizer of the upstream model needed here."""

    eos_token_id = END
    model_max_length = 1 << 30

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        try:
            data = bytes(ids)
        except ValueError:  # the end id
            data = bytes(i for i in ids if i < END)
        return data.decode("utf-8", errors="replace")


class UpstreamUsage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0


class UpstreamGeneration(Generation):
    def __init__(self, engine: UpstreamEngine, model: str, conversation: Conversation, prompt: RenderedPrompt,
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
                text += self._folded_marker(text, self.engine.config.reasoning_start)
            self._in_reasoning = self._reasoned = True
            text += reasoning
        if content:
            if self._in_reasoning:
                text += self._folded_marker(text, self.engine.config.reasoning_end)
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
        start, end = self.engine.config.reasoning_start, self.engine.config.reasoning_end
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


class UpstreamEngine(Engine):
    name = "upstream"
    # Passed through to the upstream, which may refuse them; logprobs come back with the text they belong to.
    honoured_fields = Engine.honoured_fields | SAMPLING_FIELDS | {"logprobs", "top_logprobs", *ANSWER_FIELDS}
    counts_tokens = False  # the stream is bytes: limits and usage come from the upstream
    returns_token_ids = False  # the upstream gives each event's token ids (vLLM): token counts are exact
    constrains_answer_itself = True  # the upstream applies a structured answer where its reasoning parser sees it begin
    ids_per_token = BYTES_PER_TOKEN

    def __init__(self, config: UpstreamConfig, served_model_name: str | None = None, max_queued_requests: int = 64) -> None:
        self.config = config
        self.tokenizer = ByteTokenizer()
        self.mode: Literal["token_ids", "chat"] = "chat" if config.mode == "auto" else config.mode
        self.upstream_model = config.model or ""
        self.model_name = served_model_name or config.model or ""
        self.max_model_len = ByteTokenizer.model_max_length
        self.max_queued = max_queued_requests
        self.root = config.url.rstrip("/").removesuffix("/v1")
        self.base = config.url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
        self._http: aiohttp.ClientSession | None = None
        self._active = 0
        self._template_opens_reasoning: dict[str, bool] = {}
        self._discovery: asyncio.Task[None] | None = None
        self.upstream_models: list[dict[str, Any]] = []

    @property
    def eos_token_ids(self) -> set[int]:
        return {END}

    @property
    def http(self) -> aiohttp.ClientSession:
        """aiohttp for its C HTTP parser, and because a read returns every event that has arrived."""
        if self._http is None:  # created on the serving event loop
            c = self.config
            self._http = aiohttp.ClientSession(
                headers=self._headers, connector=aiohttp.TCPConnector(limit=c.max_connections), trust_env=True,  # HTTPS_PROXY, NO_PROXY
                timeout=self._timeout(sock_read=c.first_byte_timeout_s))
        return self._http

    async def open(self) -> None:
        """Learn the upstream's models and, in auto mode, whether it can render and take token ids.
        An upstream that is not up yet is asked again in the background until it answers."""
        if not await self._discover():
            self._discovery = asyncio.get_running_loop().create_task(self._discover_until_up())

    async def _discover_until_up(self) -> None:
        while not await self._discover():
            await asyncio.sleep(5.0)

    def _timeout(self, sock_read: float | None) -> aiohttp.ClientTimeout:
        """`connect` bounds the wait for a pooled connection as well as the connect itself."""
        c = self.config
        return aiohttp.ClientTimeout(total=None, connect=c.first_byte_timeout_s, sock_connect=c.connect_timeout_s, sock_read=sock_read)

    async def _discover(self) -> bool:
        try:
            async with self.http.get(self.base + "/models") as response:
                response.raise_for_status()
                self.upstream_models = _listed_models(await response.json(content_type=None))
        except (aiohttp.ClientError, TimeoutError, ValueError, AttributeError) as exc:
            logger.warning("upstream %s: could not list models yet (%r)", self.base, exc)
            return False
        self.returns_token_ids = any(m.get("owned_by") == "vllm" for m in self.upstream_models if isinstance(m, dict))
        if not self.upstream_model and self.upstream_models:
            self.upstream_model = self.upstream_models[0]["id"]
        self.model_name = self.model_name or self.upstream_model
        if self.config.mode == "auto":
            self.mode = "token_ids" if await self._has_tokenize() else "chat"
        logger.info("upstream %s, model %s, mode %s", self.base, self.upstream_model, self.mode)
        return True

    async def _has_tokenize(self) -> bool:
        """Whether the upstream renders with /tokenize and generates from token ids (/v1/completions,
        asked for one token): vLLM, SGLang and this project's own server do."""
        try:
            async with self.http.post(self.root + "/tokenize", json={"model": self.upstream_model, "prompt": "ok"}) as response:
                tokens = (await response.json(content_type=None)).get("tokens") if response.status == 200 else None
            if not tokens:
                return False
            body = {"model": self.upstream_model, "prompt": tokens, "max_tokens": 1}
            async with self.http.post(self.base + "/completions", json=body) as response:
                return response.status == 200
        except (aiohttp.ClientError, TimeoutError, ValueError, TypeError, AttributeError):
            return False

    def answer_format(self, request: dict[str, Any]) -> AnswerFormat | None:
        return answer_format(request)

    def route(self, conversation: Conversation) -> Literal["token_ids", "chat"]:
        """The API a request goes through: a request with tools takes the chat API in either mode, where
        the upstream's template renders the tools and its tool parser reads the calls (its
        /v1/completions would ignore them)."""
        return "chat" if self.mode == "chat" or conversation.tools else "token_ids"

    def reasoning_for(self, configured: ReasoningConfig, conversation: Conversation | None = None) -> ReasoningConfig:
        budget = configured.budget_tokens
        route = self.route(conversation) if conversation is not None else self.mode
        return configured.model_copy(update={
            # the chat API: reasoning arrives folded between the markers, so the section starts closed.
            "prefill_start": route == "token_ids" and configured.prefill_start,
            "budget_tokens": budget * self.ids_per_token if budget else None,  # the loop's ids are bytes
        })

    async def render(self, conversation: Conversation, reasoning: ReasoningConfig, model: str | None = None) -> RenderedPrompt:
        """The token_ids route: the chat prompt as the upstream's /tokenize renders it, with the
        reasoning section opened (or the client's prefill appended). The chat route (chat mode, or a
        request with tools): the upstream renders the messages itself; only the opening is known here."""
        model = self.upstream_name(model)
        if self.route(conversation) == "chat":
            return open_turn(conversation, reasoning, template_opens_reasoning=False)
        body = {"model": model, "messages": conversation.messages, "add_generation_prompt": True}
        if conversation.template_kwargs:
            body["chat_template_kwargs"] = conversation.template_kwargs
        tokens = _tokens(await self._post_json(self.root + "/tokenize", body))
        if model not in self._template_opens_reasoning:  # the same for every prompt of a model: ask once
            tail = await self._post_json(self.root + "/detokenize", {"model": model, "tokens": tokens[-4:]})
            self._template_opens_reasoning[model] = str(tail.get("prompt", "")).rstrip().endswith(reasoning.start_marker)
        rendered = open_turn(conversation, reasoning, self._template_opens_reasoning[model])
        rendered.ids = tokens + (await self.tokenize_text(model, rendered.opening) if rendered.opening else [])
        return rendered

    async def render_raw(self, prompt: str | list[int], reasoning: ReasoningConfig, model: str | None = None,
                         add_special_tokens: bool = True) -> RenderedPrompt:
        """token_ids mode: a text prompt as the upstream's /tokenize encodes it; ids as they are."""
        if self.mode == "chat":
            raise PromptError("this gateway's upstream is served in chat mode: /v1/completions needs an upstream that takes "
                              "token ids (vLLM, SGLang)", param="prompt")
        model = self.upstream_name(model)
        if isinstance(prompt, str):
            body = {"model": model, "prompt": prompt, "add_special_tokens": add_special_tokens}
            ids = _tokens(await self._post_json(self.root + "/tokenize", body))
            return RenderedPrompt(ids, raw_prompt_section(prompt, reasoning), raw_text=prompt)
        if any(token < 0 for token in prompt):
            raise PromptError("a prompt token id is negative", param="prompt")
        text = (await self._post_json(self.root + "/detokenize", {"model": model, "tokens": prompt})).get("prompt")
        if not isinstance(text, str):
            raise UpstreamError("the upstream's /detokenize answered without a prompt", 502, "protocol")
        return RenderedPrompt(list(prompt), raw_prompt_section(text, reasoning), raw_text=text)

    async def upstream_json(self, path: str, body: dict[str, Any], model: str | None) -> dict[str, Any]:
        if self.mode != "token_ids":
            raise UpstreamError(f"the upstream has no {path} (it is served in chat mode)", 404, "status_404")
        return await self._post_json(self.root + path, {**body, "model": self.upstream_name(model)})

    async def tokenize_text(self, model: str, text: str) -> list[int]:
        body = {"model": model, "prompt": text, "add_special_tokens": False}
        return _tokens(await self._post_json(self.root + "/tokenize", body))

    async def _post_json(self, url: str, body: dict[str, Any]) -> dict[str, Any]:
        path = url.removeprefix(self.root)
        try:
            async with self.http.post(url, json=body) as response:
                status, text = response.status, await response.text(errors="replace")
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise transport_error(exc) from exc
        if status != 200:
            raise status_error(status, text, path)
        try:
            reply = json.loads(text)
        except ValueError:
            reply = None
        if not isinstance(reply, dict):
            logger.warning("the upstream's %s answered 200 with what is not a JSON object: %s", path, logged(text))
            raise UpstreamError(f"the upstream's {path} answered with what is not a JSON object", 502, "protocol")
        return reply

    async def send(self, path: str, body: dict[str, Any]) -> aiohttp.ClientResponse:
        """A streamed request, once the upstream answered with its status (within the first-byte timeout)."""
        try:
            async with asyncio.timeout(self.config.first_byte_timeout_s):
                response = await self.http.post(self.base + path, json=body, timeout=self._timeout(sock_read=None))
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise transport_error(exc) from exc
        if response.status != 200:
            try:
                async with asyncio.timeout(self.config.chunk_timeout_s):
                    text = await response.text(errors="replace")
            except (aiohttp.ClientError, TimeoutError, OSError):
                text = ""
            finally:
                response.close()
            raise status_error(response.status, text, (self.base + path).removeprefix(self.root))
        return response

    def model_ids(self) -> list[str]:
        ids = [m["id"] for m in self.upstream_models]
        if self.model_name and self.model_name not in ids:
            ids.insert(0, self.model_name)
        return ids

    def accepts_model(self, name: str) -> bool:
        return not self.upstream_models or name in self.model_ids()  # unknown yet: the upstream decides

    async def start(self, prompt: RenderedPrompt, sampling: SamplingParams, conversation: Conversation,
                    model: str | None = None) -> Generation:
        if self._active >= self.config.max_connections + self.max_queued:
            raise EngineOverloaded(f"{self._active} requests are in flight upstream")
        self._active += 1
        generation = UpstreamGeneration(self, self.upstream_name(model), conversation, prompt, sampling)
        try:
            await generation.open()
        except BaseException:
            self.release()
            raise
        return generation

    def upstream_name(self, model: str | None) -> str:
        """The upstream's name for the model a client asked for (the served name maps to the upstream's)."""
        if model in (None, self.model_name):
            return self.upstream_model or model or ""
        return model

    def release(self) -> None:
        self._active -= 1

    def stats(self) -> dict[str, int | str]:
        return {"running": self._active, "upstream_mode": self.mode}

    async def close(self) -> None:
        if self._discovery is not None:
            self._discovery.cancel()
        if self._http is not None:
            await self._http.close()


def _tokens(reply: dict[str, Any]) -> list[int]:
    """The ids of an upstream's /tokenize answer."""
    tokens = reply.get("tokens") if isinstance(reply, dict) else None
    if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
        raise UpstreamError("the upstream's /tokenize answered without token ids", 502, "protocol")
    return tokens


def _listed_models(reply: Any) -> list[dict[str, Any]]:
    """The models of an upstream's /v1/models that have a name (a non-empty string of printable
    characters, at most 256): those are listed to clients as this gateway's."""
    if not isinstance(reply, dict):
        raise ValueError("the upstream's /v1/models answered with what is not a JSON object")
    data = reply.get("data")
    return [m for m in data if isinstance(m, dict) and isinstance(m.get("id"), str) and 0 < len(m["id"]) <= 256
            and m["id"].isprintable()] if isinstance(data, list) else []
