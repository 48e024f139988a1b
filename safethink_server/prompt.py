"""The prompt: which part of a request is the conversation and which the client's continued assistant
turn, how the model's chat template renders it (with the reasoning section opened where the server
asks for it), the context-length check, and the conversation context the scorer judges a step in.
Every engine renders through here: the local ones with their tokenizer, the upstream through its
own /tokenize."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any

from reward_models.context import arguments_as_read, conversation_view
from safethink_server.schema import ReasoningConfig, Section, TokenizeOptions


class PromptError(ValueError):
    """The request's messages cannot form a prompt; the API answers 400 naming `param`."""

    def __init__(self, message: str, param: str = "messages", code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


@dataclass(frozen=True)
class Conversation:
    messages: list[dict[str, Any]]  # role/content (and a message's tool fields), the prefill excluded
    prefill: str | None = None  # the client's own start of the assistant turn (continue_final_message)
    template_kwargs: dict[str, Any] = field(default_factory=dict)  # extra variables for the chat template
    tools: list[dict[str, Any]] | None = None  # rendered by the chat template

    @cached_property
    def scoring_view(self) -> tuple[str, str]:
        """`scoring_context`, built once: the length check and each choice's session read the same."""
        return conversation_view(self.messages, self.tools, self.template_kwargs, self.prefill)


# Arguments of `apply_chat_template` a request's template variables may not override.
RESERVED_TEMPLATE_KWARGS = frozenset({"conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
                                      "continue_final_message", "tokenize", "padding", "truncation", "max_length",
                                      "return_tensors", "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs"})


def template_kwargs(chat_template_kwargs: dict[str, Any] | None, reasoning_effort: str | None) -> dict[str, Any]:
    """The request's variables for the chat template (`reasoning_effort` is one, as vLLM passes it)."""
    kwargs = dict(chat_template_kwargs or {})
    for key in kwargs:
        if not key.isidentifier() or key in RESERVED_TEMPLATE_KWARGS:
            raise PromptError(f"chat_template_kwargs may not set {key[:40]!r}", param="chat_template_kwargs")
    if reasoning_effort is not None:
        kwargs["reasoning_effort"] = reasoning_effort
    return kwargs


@dataclass
class RenderedPrompt:
    ids: list[int]  # empty where the engine renders the messages itself (upstream chat mode)
    initial_section: Section  # the section the first generated token falls in
    assistant_text: str = ""  # the prefill as the assistant's text so far, markers removed: scorer context
    opening: str = ""  # the text after the rendered conversation: the reasoning's start marker, or the prefill
    raw_text: str = ""  # a raw prompt's text (/v1/completions), ids decoded: the scorer's view of it


def split_conversation(messages: list[dict[str, Any]], continue_final_message: bool, template: dict[str, Any] | None = None,
                       tools: list[dict[str, Any]] | None = None) -> Conversation:
    template = template or {}
    if not continue_final_message:
        return Conversation(messages, None, template, tools)
    if messages[-1]["role"] != "assistant":
        raise PromptError("continue_final_message needs the last message to be from the assistant")
    if len(messages) < 2:
        raise PromptError("continue_final_message needs a conversation before the assistant message")
    return Conversation(messages[:-1], messages[-1]["content"], template, tools)


def opening(conversation: Conversation, reasoning: ReasoningConfig, template_opens_reasoning: bool) -> tuple[str, Section]:
    """The text appended after the rendered conversation, and the section generation starts in."""
    start, end = reasoning.start_marker, reasoning.end_marker
    prefill = conversation.prefill
    if prefill is None:
        if template_opens_reasoning:
            return "", "reasoning"
        if not reasoning.prefill_start:
            return "", "pre"
        return start + "\n", "reasoning"
    if reasoning.prefill_start and not template_opens_reasoning and start not in prefill and end not in prefill:
        prefill = start + "\n" + prefill  # with the reasoning prefilled, every assistant turn opens with it
    seen = (start if template_opens_reasoning else "") + prefill
    section: Section = "reasoning" if seen.rfind(start) > seen.rfind(end) else "answer"
    return prefill, section


def open_turn(conversation: Conversation, reasoning: ReasoningConfig, template_opens_reasoning: bool) -> RenderedPrompt:
    """The assistant turn's opening, its section and the scorer's view of the prefill; the engine
    fills in the ids of the rendered conversation followed by the opening."""
    text, section = opening(conversation, reasoning, template_opens_reasoning)
    prefill = text.replace(reasoning.start_marker, "").replace(reasoning.end_marker, "").strip()
    return RenderedPrompt([], section, prefill if conversation.prefill is not None else "", text)


def _template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages as local chat templates read them: a tool call's arguments as an object (as vLLM
    gives them to templates), where the wire has a JSON string."""
    return [{**m, "tool_calls": [arguments_as_read(call) for call in m["tool_calls"]]} if m.get("tool_calls") else m
            for m in messages]


def chat_text(tokenizer: Any, messages: list[dict[str, Any]], template: dict[str, Any], tools: list[dict[str, Any]] | None = None,
              add_generation_prompt: bool = True) -> str:
    """The messages rendered with the model's chat template (blocking); PromptError where it cannot."""
    try:
        return str(tokenizer.apply_chat_template(_template_messages(messages), tools=tools, tokenize=False,
                                                 add_generation_prompt=add_generation_prompt, **template))
    except Exception as exc:
        raise PromptError(f"the messages cannot be rendered with the model's chat template: {exc}") from exc


def prompt_ids(tokenizer: Any, prompt: str | list[dict[str, Any]], options: TokenizeOptions) -> list[int]:
    """`/tokenize`: a text, or messages rendered with the model's template, to ids (blocking)."""
    if isinstance(prompt, str):
        return list(tokenizer.encode(prompt, add_special_tokens=options.add_special_tokens))
    text = chat_text(tokenizer, prompt, template_kwargs(options.chat_template_kwargs, None),
                     add_generation_prompt=options.add_generation_prompt)
    return list(tokenizer.encode(text, add_special_tokens=False))


def render_chat(tokenizer: Any, conversation: Conversation, reasoning: ReasoningConfig) -> RenderedPrompt:
    """Render with the model's chat template and encode (blocking: run it off the event loop)."""
    prompt = chat_text(tokenizer, conversation.messages, conversation.template_kwargs, conversation.tools)
    # DeepSeek-R1-style templates open the reasoning themselves.
    rendered = open_turn(conversation, reasoning, prompt.rstrip().endswith(reasoning.start_marker))
    rendered.ids = tokenizer.encode(prompt + rendered.opening, add_special_tokens=False)
    return rendered


def raw_prompt_section(text: str, reasoning: ReasoningConfig) -> Section:
    """Where generation after a raw prompt starts: in the reasoning where the prompt leaves it open."""
    return "reasoning" if text.rfind(reasoning.start_marker) > text.rfind(reasoning.end_marker) else "pre"


def render_raw(tokenizer: Any, prompt: str | list[int], reasoning: ReasoningConfig, add_special_tokens: bool) -> RenderedPrompt:
    """A raw prompt (`/v1/completions`), text or token ids, as it is (blocking: run it off the event loop)."""
    if isinstance(prompt, str):
        ids = list(tokenizer.encode(prompt, add_special_tokens=add_special_tokens))
        return RenderedPrompt(ids, raw_prompt_section(prompt, reasoning), raw_text=prompt)
    vocab = len(tokenizer)
    if any(not 0 <= token < vocab for token in prompt):
        raise PromptError(f"a prompt token id is outside the vocabulary ({vocab} tokens)", param="prompt")
    text = tokenizer.decode(prompt)
    return RenderedPrompt(list(prompt), raw_prompt_section(text, reasoning), raw_text=text)


def raw_conversation(prompt_text: str) -> Conversation:
    """The scorer's view of a raw prompt: the user's turn."""
    return Conversation([{"role": "user", "content": prompt_text}])


def truncated(prompt: RenderedPrompt, keep: int | None, max_tokens: int, limit: int) -> RenderedPrompt:
    """vLLM's `truncate_prompt_tokens`: the prompt's last `keep` token ids (-1: as many as the context
    holds beside max_tokens). The scorer still reads the whole conversation. A prompt rendered by an
    upstream (no ids) is the upstream's to cut."""
    if keep is None or not prompt.ids:
        return prompt
    if keep > limit:
        raise PromptError(f"truncate_prompt_tokens ({keep}) is more than this model's maximum context length ({limit} tokens)",
                          param="truncate_prompt_tokens")
    keep = max(1, limit - max_tokens) if keep == -1 else keep
    return replace(prompt, ids=prompt.ids[-keep:]) if len(prompt.ids) > keep else prompt


def check_context_length(prompt_tokens: int, max_tokens: int, limit: int) -> None:
    if prompt_tokens + max_tokens > limit:
        raise PromptError(f"this model's maximum context length is {limit} tokens; the messages take {prompt_tokens} "
                          f"and max_tokens asks for {max_tokens}", code="context_length_exceeded")


def scoring_context(conversation: Conversation) -> tuple[str, str]:
    """(the latest user turn, the rest of the request as 'role: text' paragraphs in order): all of it,
    tool definitions, template variables, tool calls and the prefill included
    (`reward_models.context.conversation_view`)."""
    return conversation.scoring_view
