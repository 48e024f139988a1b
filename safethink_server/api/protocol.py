"""OpenAI chat-completions wire format (the fields users rely on), with vLLM's reasoning fields."""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from safethink_server.schema import INT64_MAX, INT64_MIN, MAX_TOP_LOGPROBS, SamplingFields, SteeringOverrides, SteeringReport

MAX_STOP_CHARS = 256
MAX_TOOLS = 128
MAX_CHOICES = 16  # n: each choice takes an engine slot of its own
MAX_MESSAGES = 4096
MAX_CONTENT_PARTS = 1024


def _unasked(value: Any) -> bool:
    """A field sent as null or empty (clients echo a returned message back with `refusal: null`,
    `annotations: []`): it asks for nothing."""
    return value is None or (isinstance(value, list | dict | str) and not value)


def _set_extra(model: BaseModel) -> str | None:
    """The first field this server does not know that `model` sets to something."""
    return next((name for name, value in sorted((model.model_extra or {}).items()) if not _unasked(value)), None)


_ROLE_FIELDS = {"tool_calls": "assistant", "reasoning": "assistant", "reasoning_content": "assistant", "tool_call_id": "tool"}


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")  # an unknown field is refused by name (`ChatMessage.refused_field`)
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """A message, with the fields vLLM passes to the chat template. Any other field it sets is
    refused by name (`refused_field`), never dropped."""

    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = Field(default=None, union_mode="left_to_right")
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_call_id: str | None = None
    reasoning: str | None = Field(default=None, description="an assistant turn's reasoning, for templates that render it")
    reasoning_content: str | None = Field(default=None, description="the same, under the older name")

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, content: Any) -> Any:
        if isinstance(content, list):
            if len(content) > MAX_CONTENT_PARTS:
                raise ValueError(f"a message has at most {MAX_CONTENT_PARTS} content parts")
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind != "text":
                    raise ValueError(f"content parts must be objects of type 'text' (this server reads text only), not {str(kind)[:40]!r}")
        elif content is not None and not isinstance(content, str):
            raise ValueError("content is a string or a list of text parts")
        return content

    def for_template(self) -> dict[str, Any]:
        """The message as chat templates and upstreams take it (as vLLM builds it): role, text, a tool
        call's or result's fields, and an assistant turn's reasoning under both of its names."""
        message: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": self.text()}
        if self.name is not None:
            message["name"] = self.name
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        if self.tool_calls is not None:
            message["tool_calls"] = self.tool_calls
        reasoning = self.reasoning if self.reasoning is not None else self.reasoning_content
        if reasoning is not None:
            message["reasoning"] = message["reasoning_content"] = reasoning
        return message

    def refused_field(self) -> str | None:
        """The path, below this message, of the first field it sets that no engine honours."""
        if (name := _set_extra(self)) is not None:
            return name
        for field, role in _ROLE_FIELDS.items():
            if self.role != role and not _unasked(getattr(self, field)):
                return field
        for index, part in enumerate(self.content if isinstance(self.content, list) else []):
            if (name := _set_extra(part)) is not None:
                return f"content[{index}].{name}"
        return None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


def refused_message_field(messages: list[ChatMessage]) -> str | None:
    """`messages[i].field` for the first message field no engine honours, if any."""
    for index, message in enumerate(messages):
        if (path := message.refused_field()) is not None:
            return f"messages[{index}].{path}"
    return None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")  # an option this server does not know is refused, not ignored
    include_usage: bool = False


class GenerationRequest(SamplingFields):
    """The fields both completion APIs share. Any other field of a request is kept (extra="allow") so
    that the API can refuse it by name (`api.fields`): nothing a client sends is silently ignored."""

    model_config = ConfigDict(extra="allow")
    model: str
    max_tokens: int | None = Field(default=None, ge=1, le=INT64_MAX)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=INT64_MIN, le=INT64_MAX)
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1, le=MAX_CHOICES)
    stream: bool = False
    stream_options: StreamOptions | None = None
    safethink: SteeringOverrides | None = None  # type: ignore[valid-type]

    @field_validator("stop")
    @classmethod
    def _at_most_four_stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences are allowed")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"a stop sequence is at most {MAX_STOP_CHARS} characters")
        return v

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class ChatCompletionRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=INT64_MAX)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[dict[str, Any]] | None = Field(default=None, max_length=MAX_TOOLS, description="read with vLLM's request model")
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    chat_template_kwargs: dict[str, Any] | None = Field(default=None, description="extra variables for the chat template")
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"] | None = Field(
        default=None, description="passed to the chat template, as vLLM does")
    add_generation_prompt: bool = Field(default=True, description="vLLM extension: false only with continue_final_message")
    continue_final_message: bool = Field(default=False, description="vLLM extension: continue the last assistant message "
                                         "(an assistant prefill: refused unless the server allows it)")

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs to be true")
        return self


MAX_PROMPT_IDS = 1 << 20


class CompletionRequest(GenerationRequest):
    """`/v1/completions`: one raw prompt, text or token ids (a list of several prompts is refused)."""

    prompt: str | list[int] | list[str] | list[list[int]] = Field(description="one prompt: a string or a list of token ids")
    max_tokens: int | None = Field(default=16, ge=1, le=INT64_MAX)  # the completions API's default, as OpenAI's and vLLM's
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS, description="the sampled token's and this many alternatives")
    add_special_tokens: bool = Field(default=True, description="vLLM extension: the tokenizer's special tokens around a text prompt")

    def one_prompt(self) -> str | list[int]:
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            if len(prompt) != 1:
                raise ValueError("one prompt per request: send a list of prompts as separate requests")
            prompt = prompt[0]
        if isinstance(prompt, list) and not prompt or prompt == "":
            raise ValueError("the prompt is empty")
        if isinstance(prompt, list) and len(prompt) > MAX_PROMPT_IDS:
            raise ValueError(f"a prompt is at most {MAX_PROMPT_IDS} token ids")
        return prompt  # type: ignore[return-value]


class CompletionTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    completion_tokens_details: CompletionTokensDetails | None = None


class FunctionCall(BaseModel):
    name: str
    arguments: str


def tool_call_id() -> str:
    return f"chatcmpl-tool-{uuid.uuid4().hex}"


class ToolCall(BaseModel):
    id: str = Field(default_factory=tool_call_id)
    type: Literal["function"] = "function"
    function: FunctionCall


class DeltaFunctionCall(BaseModel):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(BaseModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    reasoning_content: str | None = None
    reasoning: str | None = None
    tool_calls: list[ToolCall] | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprobEntry(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprobEntry] | None = None


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str | None
    logprobs: ChoiceLogprobs | None = None
    safethink: SteeringReport | None = Field(default=None, description="this choice's steering (the top-level one is choice 0's)")


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=completion_id)
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[Choice]
    usage: Usage
    system_fingerprint: str | None = None
    safethink: SteeringReport | None = Field(default=None, description="choice 0's steering, as the server discloses it")


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class StreamChoice(BaseModel):
    index: int = 0
    delta: DeltaMessage
    finish_reason: str | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[StreamChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None
    safethink: SteeringReport | None = None


class CompletionLogprobs(BaseModel):
    """The completions API's logprobs: per token its text, its logprob and the likeliest alternatives."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]


class CompletionChoice(BaseModel):
    """A `/v1/completions` choice: `text` as the model wrote it, reasoning markers included (as vLLM's
    completions give it), with the server's texts (prefix, refusal) where steering put them."""

    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    safethink: SteeringReport | None = Field(default=None, description="this choice's steering")


def text_completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex}"


class CompletionResponse(BaseModel):
    id: str = Field(default_factory=text_completion_id)
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None
    safethink: SteeringReport | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "safethink"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody

    @classmethod
    def of(cls, message: str, type_: str, param: str | None = None, code: Any = None) -> ErrorResponse:
        return cls(error=ErrorBody(message=message, type=type_, param=param, code=code))
