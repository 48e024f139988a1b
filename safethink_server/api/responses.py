"""`/v1/responses` (OpenAI's Responses API), served by the chat path: the request becomes a chat
request (instructions as the system turn, the input as the conversation), and the steered output
comes back as a reasoning item and a message item, whole or as the streaming events vLLM and OpenAI
send. Output items and events are the `openai` package's own models."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Annotated, Any, Literal

from openai.types.responses import (
    Response,
    ResponseCompletedEvent,
    ResponseContentPartAddedEvent,
    ResponseContentPartDoneEvent,
    ResponseCreatedEvent,
    ResponseErrorEvent,
    ResponseIncompleteEvent,
    ResponseInProgressEvent,
    ResponseOutputItemAddedEvent,
    ResponseOutputItemDoneEvent,
    ResponseOutputMessage,
    ResponseOutputText,
    ResponseReasoningItem,
    ResponseReasoningTextDeltaEvent,
    ResponseReasoningTextDoneEvent,
    ResponseTextDeltaEvent,
    ResponseTextDoneEvent,
    ResponseUsage,
)
from openai.types.responses.response_reasoning_item import Content as ReasoningText
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)

from safethink_server.api.errors import APIError
from safethink_server.api.protocol import MAX_CONTENT_PARTS, MAX_MESSAGES, ChatCompletionRequest, Usage
from safethink_server.schema import INT64_MAX, SteeringOverrides, SteeringReport

Effort = Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"]


class InputText(BaseModel):
    model_config = ConfigDict(extra="allow")  # what a returned output part carries (`annotations: []`) asks for nothing
    type: Literal["input_text", "output_text"]
    text: str

    @model_validator(mode="after")
    def _nothing_else(self) -> InputText:
        if any(value not in (None, [], {}, "") for value in (self.model_extra or {}).values()):
            raise ValueError(f"a text part takes only type and text, not {sorted(self.model_extra or {})}")
        return self


class InputMessage(BaseModel):
    """An input item: a message (the other item kinds, tool calls and their outputs, are refused)."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["message"] = "message"
    role: Literal["system", "developer", "user", "assistant"]
    content: str | Annotated[list[InputText], Field(max_length=MAX_CONTENT_PARTS)]
    id: str | None = None
    status: str | None = None

    def as_chat(self) -> dict[str, str]:
        text = self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)
        return {"role": self.role, "content": text}


class ReasoningOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    effort: Effort | None = None
    summary: None = Field(default=None, description="no summaries are written: only null is taken")


class ResponsesRequest(BaseModel):
    """The fields this server reads; any other is kept so that it can be refused by name."""

    model_config = ConfigDict(extra="allow")
    model: str
    input: str | list[InputMessage] = Field(min_length=1)

    @field_validator("input", mode="wrap")
    @classmethod
    def _one_problem(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> str | list[InputMessage]:
        """A bad input is named as `input` with its first problem (not as a member of the union)."""
        if isinstance(value, list) and len(value) > MAX_MESSAGES:
            raise ValueError(f"input has at most {MAX_MESSAGES} items")
        try:
            return handler(value)  # type: ignore[no-any-return]
        except ValidationError as exc:
            if isinstance(value, list):
                error = next((e for e in exc.errors() if e["loc"] and isinstance(e["loc"][0], str) and e["loc"][0].startswith("list")),
                             exc.errors()[0])
            else:
                error = exc.errors()[0]
            where = ".".join(str(p) for p in error["loc"][1:])
            raise ValueError(f"{error['msg']}{f' at {where}' if where else ''} (input is a string or a list of messages)") from None
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1, le=INT64_MAX)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    stream: bool = False
    reasoning: ReasoningOptions | None = None
    metadata: dict[Annotated[str, StringConstraints(max_length=64)], Annotated[str, StringConstraints(max_length=512)]] | None = Field(
        default=None, max_length=16, description="returned with the response, as OpenAI's: at most 16 pairs of strings")
    safethink: SteeringOverrides | None = None  # type: ignore[valid-type]

    def as_chat(self) -> ChatCompletionRequest:
        """The chat request that serves this one."""
        messages = [{"role": "system", "content": self.instructions}] if self.instructions else []
        if isinstance(self.input, str):
            messages.append({"role": "user", "content": self.input})
        else:
            messages += [item.as_chat() for item in self.input]
        fields: dict[str, Any] = {"model": self.model, "messages": messages, "max_tokens": self.max_output_tokens,
                                  "temperature": self.temperature, "top_p": self.top_p, "stream": self.stream,
                                  "reasoning_effort": self.reasoning.effort if self.reasoning else None}
        if self.safethink is not None:
            fields["safethink"] = self.safethink
        try:
            return ChatCompletionRequest.model_validate({k: v for k, v in fields.items() if v is not None})
        except ValidationError as exc:
            raise APIError(400, f"invalid input: {exc.errors()[0].get('msg')}", param="input") from exc


# Fields of /v1/responses the server reads or that ask for nothing here (`text` only as plain text,
# tools only as none): any other that is set is refused.
RESPONSES_FIELDS = frozenset({"model", "input", "instructions", "max_output_tokens", "temperature", "top_p", "stream", "reasoning",
                              "safethink", "text", "tool_choice", "tools", "parallel_tool_calls", "truncation", "include"})


def refused_response_field(body: ResponsesRequest) -> str | None:
    """The fields the Responses API shares with chat, where they ask for something this path cannot do."""
    extra = body.model_extra or {}
    if extra.get("text") not in (None, {}, {"format": {"type": "text"}}):
        return "text"
    if extra.get("tools"):
        return "tools"
    if extra.get("tool_choice") not in (None, "none", "auto"):
        return "tool_choice"
    if extra.get("truncation") not in (None, "disabled"):
        return "truncation"
    if extra.get("include"):
        return "include"
    if extra.get("store"):  # nothing is stored to be fetched or continued later
        return "store"
    return None


def _reasoning_item(item_id: str, text: str | None, status: Literal["in_progress", "completed"]) -> ResponseReasoningItem:
    content = [ReasoningText(type="reasoning_text", text=text)] if text is not None else None
    return ResponseReasoningItem(type="reasoning", id=item_id, summary=[], content=content, status=status)


def _message_item(item_id: str, text: str | None, status: Literal["in_progress", "completed", "incomplete"]) -> ResponseOutputMessage:
    content = [ResponseOutputText(type="output_text", text=text, annotations=[])] if text is not None else []
    return ResponseOutputMessage(type="message", id=item_id, role="assistant", content=content, status=status)


def _usage(usage: Usage) -> ResponseUsage:
    reasoning = usage.completion_tokens_details.reasoning_tokens if usage.completion_tokens_details else 0
    return ResponseUsage(input_tokens=usage.prompt_tokens, input_tokens_details={"cached_tokens": 0, "cache_write_tokens": 0},
                         output_tokens=usage.completion_tokens, output_tokens_details={"reasoning_tokens": reasoning},
                         total_tokens=usage.total_tokens)


class ResponseBuilder:
    """One response's identity and its whole form."""

    def __init__(self, body: ResponsesRequest, model: str) -> None:
        self.body = body
        self.model = model
        self.id = f"resp_{uuid.uuid4().hex}"
        self.created_at = int(time.time())

    def response(self, output: list[Any], status: str, finish_reason: str | None = None, usage: Usage | None = None,
                 report: SteeringReport | None = None) -> dict[str, Any]:
        incomplete = {"max_output_tokens": "max_output_tokens", "length": "max_output_tokens",
                      "content_filter": "content_filter"}.get(finish_reason or "") if status == "incomplete" else None
        response = Response(
            id=self.id, object="response", created_at=self.created_at, model=self.model, output=output, status=status,  # type: ignore[arg-type]
            parallel_tool_calls=False, tool_choice="none", tools=[], instructions=self.body.instructions,
            max_output_tokens=self.body.max_output_tokens, temperature=self.body.temperature, top_p=self.body.top_p,
            incomplete_details={"reason": incomplete} if incomplete else None, usage=_usage(usage) if usage else None,
            store=False, metadata=self.body.metadata)
        wire = response.model_dump(mode="json", exclude_none=True)
        if report is not None:
            wire["safethink"] = report.model_dump(mode="json", exclude_none=True)
        return wire

    def whole(self, reasoning: str | None, answer: str, finish_reason: str | None, usage: Usage, report: SteeringReport | None) -> dict[str, Any]:
        output: list[Any] = []
        if reasoning:
            output.append(_reasoning_item(f"rs_{uuid.uuid4().hex}", reasoning, "completed"))
        status = status_of(finish_reason)
        output.append(_message_item(f"msg_{uuid.uuid4().hex}", answer, status))
        return self.response(output, status, finish_reason, usage, report)


def status_of(finish_reason: str | None) -> Literal["completed", "incomplete"]:
    """A response is complete where the model stopped; a token limit or a refusal leaves it incomplete."""
    return "completed" if finish_reason == "stop" else "incomplete"


class ResponseEvents:
    """A streamed response's events, in the order OpenAI and vLLM send them: the response created and
    in progress, then per output item (the reasoning, then the message) its item and content part
    added, text deltas, and text, part and item done, then the response completed (or incomplete)."""

    def __init__(self, builder: ResponseBuilder) -> None:
        self.builder = builder
        self.sequence = 0
        self.output: list[Any] = []
        self._open: tuple[str, str] | None = None  # (section, item id) of the item being written
        self._text: list[str] = []

    def _sse(self, event: BaseModel) -> str:
        data = event.model_dump(mode="json", exclude_none=True)
        data["sequence_number"] = self.sequence
        self.sequence += 1
        return f"event: {data['type']}\ndata: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"

    def start(self) -> Iterator[str]:
        created = self.builder.response([], "in_progress")
        yield self._sse(ResponseCreatedEvent.model_validate({"type": "response.created", "sequence_number": 0, "response": created}))
        yield self._sse(ResponseInProgressEvent.model_validate({"type": "response.in_progress", "sequence_number": 0,
                                                                "response": created}))

    def delta(self, section: str, text: str) -> Iterator[str]:
        if self._open is not None and self._open[0] != section:
            yield from self._close("completed")
        index = len(self.output)
        if self._open is None:
            item_id = f"{'rs' if section == 'reasoning' else 'msg'}_{uuid.uuid4().hex}"
            self._open, self._text = (section, item_id), []
            item: Any = _reasoning_item(item_id, None, "in_progress") if section == "reasoning" else _message_item(item_id, None, "in_progress")
            part: Any = {"type": "reasoning_text", "text": ""} if section == "reasoning" else {"type": "output_text", "text": "",
                                                                                               "annotations": []}
            yield self._sse(ResponseOutputItemAddedEvent(type="response.output_item.added", sequence_number=0, output_index=index,
                                                         item=item))
            yield self._sse(ResponseContentPartAddedEvent.model_validate({
                "type": "response.content_part.added", "sequence_number": 0, "output_index": index, "item_id": item_id,
                "content_index": 0, "part": part}))
        item_id = self._open[1]
        self._text.append(text)
        if section == "reasoning":
            yield self._sse(ResponseReasoningTextDeltaEvent(type="response.reasoning_text.delta", sequence_number=0, output_index=index,
                                                            item_id=item_id, content_index=0, delta=text))
        else:
            yield self._sse(ResponseTextDeltaEvent(type="response.output_text.delta", sequence_number=0, output_index=index,
                                                   item_id=item_id, content_index=0, delta=text, logprobs=[]))

    def _close(self, status: Literal["completed", "incomplete"]) -> Iterator[str]:
        assert self._open is not None
        (section, item_id), text, index = self._open, "".join(self._text), len(self.output)
        self._open = None
        if section == "reasoning":
            item: Any = _reasoning_item(item_id, text, "completed")
            yield self._sse(ResponseReasoningTextDoneEvent(type="response.reasoning_text.done", sequence_number=0, output_index=index,
                                                           item_id=item_id, content_index=0, text=text))
            part: Any = {"type": "reasoning_text", "text": text}
        else:
            item = _message_item(item_id, text, status)
            yield self._sse(ResponseTextDoneEvent(type="response.output_text.done", sequence_number=0, output_index=index,
                                                  item_id=item_id, content_index=0, text=text, logprobs=[]))
            part = {"type": "output_text", "text": text, "annotations": []}
        yield self._sse(ResponseContentPartDoneEvent.model_validate({
            "type": "response.content_part.done", "sequence_number": 0, "output_index": index, "item_id": item_id, "content_index": 0,
            "part": part}))
        yield self._sse(ResponseOutputItemDoneEvent(type="response.output_item.done", sequence_number=0, output_index=index, item=item))
        self.output.append(item)

    def end(self, finish_reason: str | None, usage: Usage, report: SteeringReport | None) -> Iterator[str]:
        status = status_of(finish_reason)
        if self._open is not None and self._open[0] == "reasoning":
            yield from self._close("completed")
        if self._open is None and not any(item.type == "message" for item in self.output):
            yield from self.delta("answer", "")  # every response has its message, empty or not
        if self._open is not None:
            yield from self._close(status)
        response = self.builder.response(self.output, status, finish_reason, usage, report)
        kind = ResponseCompletedEvent if status == "completed" else ResponseIncompleteEvent
        event_type = "response.completed" if status == "completed" else "response.incomplete"
        yield self._sse(kind.model_validate({"type": event_type, "sequence_number": 0, "response": response}))

    def error(self, error: APIError) -> str:
        return self._sse(ResponseErrorEvent(type="error", sequence_number=0, message=error.message, code=error.code,
                                            param=error.param))

