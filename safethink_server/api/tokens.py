"""`/tokenize` and `/detokenize` as vLLM has them: a prompt, or chat messages rendered with the
model's template, to token ids; token ids to text. The local engines use their tokenizer (off the
event loop); the proxy asks its upstream, whose tokens they are."""

from __future__ import annotations

import asyncio
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from safethink_server.api.fields import refuse_message_fields
from safethink_server.api.protocol import MAX_MESSAGES, ChatMessage
from safethink_server.engines.base import Engine
from safethink_server.prompt import PromptError, chat_text, template_kwargs

MAX_DETOKENIZE_IDS = 1 << 20


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(default=None, max_length=MAX_MESSAGES)
    add_generation_prompt: bool = True
    add_special_tokens: bool = Field(default=True, description="prompt only: the tokenizer's special tokens (BOS)")
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _prompt_or_messages(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give either 'prompt' or 'messages'")
        return self


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    tokens: list[int] = Field(max_length=MAX_DETOKENIZE_IDS)


class DetokenizeResponse(BaseModel):
    prompt: str


def _tokenize(tokenizer: Any, request: TokenizeRequest) -> list[int]:
    if request.prompt is not None:
        return list(tokenizer.encode(request.prompt, add_special_tokens=request.add_special_tokens))
    messages = [m.for_template() for m in request.messages or []]
    text = chat_text(tokenizer, messages, template_kwargs(request.chat_template_kwargs, None),
                     add_generation_prompt=request.add_generation_prompt)
    return list(tokenizer.encode(text, add_special_tokens=False))


async def tokenize(engine: Engine, request: TokenizeRequest, max_model_len: int) -> TokenizeResponse:
    refuse_message_fields(request.messages or [])
    if not engine.counts_tokens:
        body = request.model_dump(exclude_unset=True, exclude={"model"})
        return TokenizeResponse.model_validate(await engine.upstream_json("/tokenize", body, request.model))
    ids = await asyncio.to_thread(_tokenize, engine.tokenizer, request)
    strs = engine.tokenizer.convert_ids_to_tokens(ids) if request.return_token_strs else None
    return TokenizeResponse(count=len(ids), max_model_len=max_model_len, tokens=ids, token_strs=strs)


async def detokenize(engine: Engine, request: DetokenizeRequest, vocab_size: int | None) -> DetokenizeResponse:
    if not engine.counts_tokens:
        body = request.model_dump(exclude={"model"})
        return DetokenizeResponse.model_validate(await engine.upstream_json("/detokenize", body, request.model))
    if any(not 0 <= token < (vocab_size or 2**31) for token in request.tokens):
        raise PromptError("a token id is outside the vocabulary", param="tokens")
    return DetokenizeResponse(prompt=await asyncio.to_thread(engine.tokenizer.decode, request.tokens))
