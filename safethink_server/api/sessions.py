"""A completion request checked and turned into steering sessions, one per choice, before an engine slot is taken."""

from __future__ import annotations

from reward_models.base import StepItem, StepScore
from reward_models.context import conversation_text
from safethink_server.api.errors import APIError
from safethink_server.api.fields import refuse_message_fields, refused_field
from safethink_server.api.protocol import ChatCompletionRequest, CompletionRequest, GenerationRequest
from safethink_server.api.state import ServerState
from safethink_server.engines.base import SAMPLING_FIELDS, AnswerFormat, SamplingParams
from safethink_server.prompt import (
    Conversation,
    PromptError,
    RenderedPrompt,
    check_context_length,
    raw_conversation,
    scoring_context,
    split_conversation,
    template_kwargs,
    truncated,
)
from safethink_server.schema import PolicyConfig, ReasoningConfig, SamplingFields, seed_plus
from safethink_server.steering.session import SteeringSession
from safethink_server.tenants import Tenant


def checked_policy(state: ServerState, tenant: Tenant, body: GenerationRequest, honoured: frozenset[str]) -> PolicyConfig:
    """The checks both completion APIs make before anything else, and the request's steering policy."""
    engine = state.engine
    if not engine.accepts_model(body.model):
        raise APIError(404, f"the model '{body.model}' does not exist; this server serves {', '.join(engine.model_ids())}",
                       param="model", code="model_not_found")
    refused = refused_field(body, honoured)
    if refused is not None:
        raise APIError(400, f"'{refused}' is not supported by this server's {engine.name} engine", param=refused,
                       code="unsupported_parameter")
    if body.stream_options is not None and not body.stream:
        raise APIError(400, "stream_options is only taken with stream=true", param="stream_options")
    policy = tenant.policy
    if body.safethink is not None:
        if not tenant.allow_client_overrides:
            raise APIError(400, "per-request steering overrides are disabled on this server", param="safethink")
        policy = policy.model_copy(update=body.safethink.model_dump(exclude_none=True))
    return policy


async def build_sessions(state: ServerState, tenant: Tenant, body: ChatCompletionRequest) -> tuple[list[SteeringSession], AnswerFormat | None]:
    """One session per choice, and what the answer must be (tools, structured output). Everything about
    the request is checked here, before an engine slot is taken."""
    s, engine = state.settings, state.engine
    policy = checked_policy(state, tenant, body, engine.honoured_fields)
    refuse_message_fields(body.messages)
    if body.continue_final_message == body.add_generation_prompt and "add_generation_prompt" in body.model_fields_set:
        raise APIError(400, "add_generation_prompt is false exactly when continue_final_message is true", param="add_generation_prompt")
    if body.continue_final_message and not tenant.allow_assistant_prefill:
        raise APIError(400, "an assistant prefill (continue_final_message) is not allowed on this server", param="continue_final_message")
    if body.continue_final_message:
        continued = body.messages[-1]
        extra = next((f for f in ("name", "tool_calls", "reasoning", "reasoning_content") if getattr(continued, f)), None)
        if extra is not None:  # the prefill is the turn's text; these would not be rendered
            param = f"messages[{len(body.messages) - 1}].{extra}"
            raise APIError(400, f"'{param}' cannot be set on a continued assistant message", param=param, code="unsupported_parameter")
    messages = [m.for_template() for m in body.messages]
    max_tokens = body.max_completion_tokens or body.max_tokens or s.default_max_tokens
    answer = engine.answer_format(body.model_dump(exclude_unset=True))
    sampling = sampling_params(body, max_tokens, engine.vocab_size)
    sampling.answer_constraint = answer.constraint if answer is not None else None
    template = template_kwargs(body.chat_template_kwargs, body.reasoning_effort)
    conversation = split_conversation(messages, body.continue_final_message, template, body.tools)
    check_scorer_reach(state, policy, conversation, "messages")
    reasoning = engine.reasoning_for(s.reasoning(), conversation)
    prompt = truncated(await engine.render(conversation, reasoning, body.model), body.truncate_prompt_tokens, max_tokens,
                       state.max_model_len)
    sessions = choice_sessions(state, tenant, body, prompt, conversation, sampling, policy, reasoning,
                               keep_special_tokens=answer is not None and answer.keep_special_tokens)
    return sessions, answer


# Fields of /v1/completions the server reads; the engine's sampling fields come on top.
COMPLETION_FIELDS = frozenset({"model", "prompt", "max_tokens", "temperature", "top_p", "seed", "stop", "n", "stream",
                               "stream_options", "safethink", "add_special_tokens"})


async def build_completion_sessions(state: ServerState, tenant: Tenant, body: CompletionRequest) -> list[SteeringSession]:
    """`/v1/completions`: one session per choice over the raw prompt, steered where the model reasons."""
    s, engine = state.settings, state.engine
    policy = checked_policy(state, tenant, body, COMPLETION_FIELDS | (engine.honoured_fields & (SAMPLING_FIELDS | {"logprobs"})))
    if not tenant.allow_assistant_prefill:
        raise APIError(400, "a raw prompt can write the assistant turn itself, so /v1/completions needs the assistant-prefill "
                       "permission (--allow-assistant-prefill, or the key's allow_assistant_prefill)", param="prompt",
                       code="raw_prompt_not_allowed")
    try:
        raw = body.one_prompt()
    except ValueError as exc:
        raise APIError(400, str(exc), param="prompt") from exc
    max_tokens = body.max_tokens or s.default_max_tokens
    reasoning = engine.reasoning_for(s.reasoning())
    sampling = sampling_params(body, max_tokens, engine.vocab_size)
    if isinstance(raw, str):
        check_scorer_reach(state, policy, raw_conversation(raw), "prompt")
    prompt = truncated(await engine.render_raw(raw, reasoning, body.model, body.add_special_tokens), body.truncate_prompt_tokens,
                       max_tokens, state.max_model_len)
    if not isinstance(raw, str):  # token ids: their text is known once decoded
        check_scorer_reach(state, policy, raw_conversation(prompt.raw_text), "prompt")
    return choice_sessions(state, tenant, body, prompt, raw_conversation(prompt.raw_text), sampling, policy, reasoning, keep_special_tokens=False,
                           raw_text=True)


def check_scorer_reach(state: ServerState, policy: PolicyConfig, conversation: Conversation, param: str) -> None:
    """A steered request's conversation must be within what the scorer reads (its cost grows with it);
    checked before anything is rendered or a slot is taken."""
    limit = state.settings.scorer_max_context_chars
    if policy.early_steps and (read := len(conversation_text(*scoring_context(conversation)))) > limit:
        raise APIError(400, f"the conversation is {read} characters as the safety scorer reads it; this server's scorer reads "
                       f"at most {limit} (--scorer-max-context-chars)", param=param, code="context_length_exceeded")


def choice_sessions(state: ServerState, tenant: Tenant, body: GenerationRequest, prompt: RenderedPrompt, conversation: Conversation,
                    sampling: SamplingParams, policy: PolicyConfig, reasoning: ReasoningConfig,
                    keep_special_tokens: bool, raw_text: bool = False) -> list[SteeringSession]:
    """One session per choice (each its own seed), once the prompt fits the context. `raw_text`: the
    answer goes out as written, its leading whitespace kept (a completion continues its prompt)."""
    s, engine = state.settings, state.engine
    observer = state.metrics.of_key(tenant.id)
    if engine.counts_tokens:
        check_context_length(len(prompt.ids), sampling.max_tokens, state.max_model_len)

    async def score(item: StepItem, first: bool) -> StepScore:
        return await state.batcher.score_one(item, first)

    def session(choice: int) -> SteeringSession:
        detector = s.detector()
        detector.max_step_tokens *= engine.ids_per_token  # the loop's ids may not be tokens (upstream: bytes)
        seeded = sampling if sampling.seed is None or not choice else sampling.model_copy(
            update={"seed": seed_plus(sampling.seed, choice)})  # each choice its own seed
        return SteeringSession(engine, prompt, conversation, seeded, policy, reasoning, detector, score,
                               stop=body.stop_list(), observer=observer, model=body.model,
                               skip_special_tokens=body.skip_special_tokens and not keep_special_tokens,
                               stream_interval=s.stream_interval, warm=state.batcher.prefetch if s.scorer_warm and state.scorer.warms else None,
                               raw_text=raw_text, report_detail=tenant.report)

    return [session(choice) for choice in range(body.n)]


def sampling_params(body: GenerationRequest, max_tokens: int, vocab_size: int | None) -> SamplingParams:
    if body.min_tokens > max_tokens:
        raise APIError(400, f"min_tokens ({body.min_tokens}) is more than max_tokens ({max_tokens})", param="min_tokens")
    try:
        bias = body.logit_bias_ids()
    except ValueError as exc:
        raise PromptError(str(exc), param="logit_bias") from exc
    for param, ids in (("logit_bias", bias), ("stop_token_ids", body.stop_token_ids or []), ("allowed_token_ids", body.allowed_token_ids or [])):
        if vocab_size is not None and any(token >= vocab_size for token in ids):
            raise PromptError(f"{param} names a token id beyond the vocabulary ({vocab_size} tokens)", param=param)
    return SamplingParams(
        **body.model_dump(include=set(SamplingFields.model_fields)), max_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature, top_p=1.0 if body.top_p is None else body.top_p,
        seed=body.seed, logprobs=asked_logprobs(body))


def asked_logprobs(body: GenerationRequest) -> int | None:
    """None: no logprobs; else the sampled token's and this many alternatives (the two APIs ask differently)."""
    if isinstance(body, ChatCompletionRequest):
        return (body.top_logprobs or 0) if body.logprobs else None
    return body.logprobs if isinstance(body, CompletionRequest) else None


async def close_all(sessions: list[SteeringSession]) -> None:
    """Free every session's slot, even when one abort fails."""
    errors = []
    for session in sessions:
        try:
            await session.close()
        except Exception as exc:
            errors.append(exc)
    if errors:
        raise errors[0]
