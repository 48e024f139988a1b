"""The proxy engine: discovery of the upstream, rendering through it, and one `UpstreamGeneration` per sequence."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, Literal

import aiohttp
from pydantic import ValidationError

from safethink_server.engines.base import SAMPLING_FIELDS, AnswerFormat, Engine, EngineOverloaded, Generation, SamplingParams
from safethink_server.engines.upstream.answer import ANSWER_FIELDS, answer_format
from safethink_server.engines.upstream.bytes import BYTES_PER_TOKEN, END, ByteTokenizer
from safethink_server.engines.upstream.config import UpstreamConfig
from safethink_server.engines.upstream.errors import UpstreamError, logged, status_error, transport_error
from safethink_server.engines.upstream.generation import UpstreamGeneration
from safethink_server.prompt import Conversation, PromptError, RenderedPrompt, open_turn, raw_prompt_section
from safethink_server.schema import ReasoningConfig, TokenizeOptions, TokenizeResponse

logger = logging.getLogger(__name__)


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

    def end_ids(self, sampling: SamplingParams) -> set[int]:
        return {END}  # the stream's end (the upstream applies ignore_eos itself)

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
        if isinstance(prompt, str):
            body = {"model": self.upstream_name(model), "prompt": prompt, "add_special_tokens": add_special_tokens}
            ids = _tokens(await self._post_json(self.root + "/tokenize", body))
            return RenderedPrompt(ids, raw_prompt_section(prompt, reasoning), raw_text=prompt)
        if any(token < 0 for token in prompt):
            raise PromptError("a prompt token id is negative", param="prompt")
        text = await self.detokenize(list(prompt), model)
        return RenderedPrompt(list(prompt), raw_prompt_section(text, reasoning), raw_text=text)

    async def tokenize(self, prompt: str | list[dict[str, Any]], options: TokenizeOptions, max_model_len: int,
                       model: str | None = None) -> TokenizeResponse:
        """The upstream's tokens (this engine's ids are bytes); the options the client set, passed on."""
        body = {**options.model_dump(exclude_unset=True), ("prompt" if isinstance(prompt, str) else "messages"): prompt}
        try:
            return TokenizeResponse.model_validate(await self._tokens_route("/tokenize", body, model))
        except ValidationError as exc:
            raise UpstreamError("the upstream's /tokenize answered without count, max_model_len and tokens", 502, "protocol") from exc

    async def detokenize(self, ids: list[int], model: str | None = None) -> str:
        reply = await self._tokens_route("/detokenize", {"tokens": ids}, model)
        if not isinstance(reply.get("prompt"), str):
            raise UpstreamError("the upstream's /detokenize answered without a prompt", 502, "protocol")
        return str(reply["prompt"])

    async def _tokens_route(self, path: str, body: dict[str, Any], model: str | None) -> dict[str, Any]:
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
