"""`/tokenize` and `/detokenize` as vLLM has them: a prompt, or chat messages rendered with the
model's template, to token ids; token ids to text. The engine answers (`Engine.tokenize`): the local
ones with their tokenizer, the proxy by asking its upstream, whose tokens they are."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from safethink_server.api.fields import refuse_message_fields
from safethink_server.api.protocol import MAX_MESSAGES, ChatMessage
from safethink_server.engines.base import Engine
from safethink_server.schema import TokenizeOptions, TokenizeResponse

MAX_DETOKENIZE_IDS = 1 << 20


class TokenizeRequest(TokenizeOptions):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(default=None, max_length=MAX_MESSAGES)

    @model_validator(mode="after")
    def _prompt_or_messages(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give either 'prompt' or 'messages'")
        return self


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    tokens: list[int] = Field(max_length=MAX_DETOKENIZE_IDS)


class DetokenizeResponse(BaseModel):
    prompt: str


async def tokenize(engine: Engine, request: TokenizeRequest, max_model_len: int) -> TokenizeResponse:
    refuse_message_fields(request.messages or [])
    prompt = request.prompt if request.prompt is not None else [m.for_template() for m in request.messages or []]
    options = TokenizeOptions.model_validate(request.model_dump(exclude_unset=True, include=set(TokenizeOptions.model_fields)))
    return await engine.tokenize(prompt, options, max_model_len, request.model)


async def detokenize(engine: Engine, request: DetokenizeRequest) -> DetokenizeResponse:
    return DetokenizeResponse(prompt=await engine.detokenize(request.tokens, request.model))
