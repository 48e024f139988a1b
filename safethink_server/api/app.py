"""The FastAPI application: OpenAI-compatible routes over the steering loop."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from reward_models.base import Scorer, StepItem, StepScore
from reward_models.batcher import MicroBatcher
from reward_models.context import conversation_text
from safethink_server.api.audit import AuditLog
from safethink_server.api.auth import Authentication, tenant_of
from safethink_server.api.errors import APIError, install_error_handlers
from safethink_server.api.fields import refuse_message_fields, refused_field
from safethink_server.api.lifecycle import Lifecycle, shutting_down
from safethink_server.api.protocol import (
    AssistantMessage,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    Choice,
    ChoiceLogprobs,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    CompletionTokensDetails,
    DeltaMessage,
    ErrorResponse,
    GenerationRequest,
    ModelCard,
    ModelList,
    StreamChoice,
    TokenLogprobEntry,
    TopLogprob,
    Usage,
    completion_id,
    text_completion_id,
)
from safethink_server.api.request_json import CheckedRoute
from safethink_server.api.responses import (
    RESPONSES_FIELDS,
    ResponseBuilder,
    ResponseEvents,
    ResponsesRequest,
    refused_response_field,
)
from safethink_server.api.tokens import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
    detokenize,
    tokenize,
)
from safethink_server.api.tool_calls import ToolCallStream, tool_call_message
from safethink_server.api.tracker import RequestTracker, failure
from safethink_server.config import ServerSettings
from safethink_server.engines.base import SAMPLING_FIELDS, AnswerFormat, Engine, Generation, SamplingParams, TokenLogprob
from safethink_server.engines.upstream_stream import UpstreamError
from safethink_server.metrics import Metrics
from safethink_server.prompt import (
    Conversation,
    PromptError,
    RenderedPrompt,
    check_context_length,
    raw_conversation,
    scoring_context,
    split_conversation,
    template_kwargs,
)
from safethink_server.schema import PolicyConfig, ReasoningConfig, SamplingFields, seed_plus
from safethink_server.steering.output import Delta
from safethink_server.steering.session import SteeringSession
from safethink_server.tenants import Keyring, Tenant

logger = logging.getLogger(__name__)

# What the OpenAPI schema documents: every error is an ErrorResponse; a stream is text/event-stream.
ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description} for status, description in (
        (400, "invalid request"), (401, "invalid or missing API key"), (404, "unknown model"), (413, "request body too large"),
        (429, "upstream rate limit"), (500, "server error"), (502, "upstream error"), (503, "overloaded, draining, or engine dead"),
        (504, "upstream timeout"))}
GENERATION = {**ERRORS, 200: {"description": "the completion, or its events with stream=true",
                              "content": {"application/json": {}, "text/event-stream": {}}}}
UNAVAILABLE: dict[int | str, dict[str, Any]] = {503: {"description": "not alive, or not ready"}}


@dataclass
class ServerState:
    settings: ServerSettings
    engine: Engine
    scorer: Scorer
    batcher: MicroBatcher
    metrics: Metrics
    lifecycle: Lifecycle
    keyring: Keyring
    audit: AuditLog

    @property
    def max_model_len(self) -> int:
        if self.settings.max_model_len:
            return self.settings.max_model_len
        return int(getattr(self.engine, "max_model_len", None) or self.engine.tokenizer.model_max_length)


class BodySizeLimit:
    """413 for bodies over the limit, whether announced by Content-Length or streamed."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await APIError(413, _too_large(self.max_bytes)).response()(scope, receive, send)
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _BodyTooLarge(self.max_bytes)
            return message

        await self.app(scope, limited, send)


def _too_large(max_bytes: int) -> str:
    return f"request body exceeds {max_bytes} bytes"


class _BodyTooLarge(HTTPException):
    """An HTTPException, so that FastAPI's body reading passes it on (rather than calling it a parse
    error) and the app's handler answers it with an OpenAI-shaped 413."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(413, _too_large(max_bytes))


def create_app(settings: ServerSettings, engine: Engine, scorer: Scorer) -> FastAPI:
    keyring = settings.keyring()
    metrics = Metrics()
    tenants = keyring.tenants()
    metrics.initialise(engine.name, [t.id for t in tenants], max(t.policy.early_steps for t in tenants))
    batcher = MicroBatcher(scorer, settings.scorer_max_batch, settings.scorer_max_wait_ms, observer=metrics.scorer_batch_done,
                           warm_observer=metrics.scorer_warmed)
    state = ServerState(settings, engine, scorer, batcher, metrics, Lifecycle(settings.drain_timeout_s), keyring,
                        AuditLog(settings.audit_log, settings.audit_log_text))

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await engine.open()
        state.lifecycle.handle_sigterm()
        yield
        await batcher.aclose()
        await engine.close()
        scorer.close()
        state.audit.close()

    app = FastAPI(title="safethink-server", lifespan=lifespan)
    app.router.route_class = CheckedRoute
    app.state.safethink = state
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)

    app.add_middleware(Authentication, keyring=keyring, audit=state.audit, refused=metrics.unauthorized.inc)

    async def authenticate(request: Request) -> Tenant:
        return tenant_of(request.state)

    # uvicorn answers nothing before the lifespan has opened the engine: a probe then gets no answer.
    def health_of(details: bool, ready: bool) -> JSONResponse:
        """503 when the engine is dead, and (`ready`) while the server drains; liveness says only dead or ok."""
        dead = engine.dead_reason()
        status = "dead" if dead else "draining" if state.lifecycle.draining and (details or ready) else "ok"
        body: dict[str, object] = {"status": status}
        if details:
            body |= {"engine": engine.name, "model": engine.model_name, **engine.stats()}
        if dead and not ready:
            body["error"] = dead
        return JSONResponse(body, status_code=503 if dead or (ready and status != "ok") else 200)

    @app.get("/health", responses=UNAVAILABLE)
    async def health() -> JSONResponse:
        """Details; 503 when the engine is dead."""
        return health_of(details=True, ready=False)

    @app.get("/health/live", responses=UNAVAILABLE)
    async def live() -> JSONResponse:
        """Liveness: 503 when the engine is dead (restart the pod)."""
        return health_of(details=False, ready=False)

    @app.get("/health/ready", responses=UNAVAILABLE)
    async def ready() -> JSONResponse:
        """Readiness: 200 only while requests are admitted (not draining, not dead)."""
        return health_of(details=False, ready=True)

    if settings.metrics_port is None:  # else served on its own port (cli.py), and a 404 here
        @app.get("/metrics", responses={200: {"description": "Prometheus text format", "content": {"text/plain": {}}}})
        async def prometheus() -> Response:
            return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", responses=ERRORS)
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=model_id) for model_id in engine.model_ids()])

    @app.post("/tokenize", responses=ERRORS)
    async def tokenize_route(body: TokenizeRequest) -> TokenizeResponse:
        try:
            return await tokenize(engine, body, state.max_model_len)
        except (PromptError, UpstreamError) as exc:
            raise failure(exc, metrics)[0] from exc

    @app.post("/detokenize", responses=ERRORS)
    async def detokenize_route(body: DetokenizeRequest) -> DetokenizeResponse:
        try:
            return await detokenize(engine, body, getattr(engine, "vocab_size", None))
        except (PromptError, UpstreamError) as exc:
            raise failure(exc, metrics)[0] from exc

    @app.post("/v1/chat/completions", response_model=None, responses=GENERATION)
    async def chat(body: ChatCompletionRequest, request: Request, tenant: Tenant = Depends(authenticate)) -> Response:
        async def sessions_for() -> tuple[list[SteeringSession], AnswerFormat | None]:
            return await build_sessions(state, tenant, body)

        return await respond(state, RequestTracker(state, tenant.id, "chat.completions", body), body, request, sessions_for,
                             complete, stream)

    @app.post("/v1/completions", response_model=None, responses=GENERATION)
    async def completions(body: CompletionRequest, request: Request, tenant: Tenant = Depends(authenticate)) -> Response:
        async def sessions_for() -> tuple[list[SteeringSession], AnswerFormat | None]:
            return await build_completion_sessions(state, tenant, body), None

        return await respond(state, RequestTracker(state, tenant.id, "completions", body), body, request, sessions_for,
                             complete_text, stream_text)

    @app.post("/v1/responses", response_model=None, responses=GENERATION)
    async def responses(body: ResponsesRequest, request: Request, tenant: Tenant = Depends(authenticate)) -> Response:
        async def sessions_for() -> tuple[list[SteeringSession], AnswerFormat | None]:
            refused = refused_field(body, RESPONSES_FIELDS) or refused_response_field(body)
            if refused is not None:
                raise APIError(400, f"'{refused}' is not supported by this server's /v1/responses", param=refused,
                               code="unsupported_parameter")
            return await build_sessions(state, tenant, body.as_chat())

        abort_event = ResponseEvents(ResponseBuilder(body, engine.model_name)).error
        return await respond(state, RequestTracker(state, tenant.id, "responses", body), body, request, sessions_for,
                             complete_response, stream_response, abort_event)

    return app


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


Completer = Callable[[ServerState, Any, list[SteeringSession], AnswerFormat | None, "RequestTracker", Request], Awaitable[Response]]
Streamer = Callable[[ServerState, Any, list[SteeringSession], AnswerFormat | None, "RequestTracker"], AsyncIterator[str]]


async def respond(state: ServerState, tracker: RequestTracker, body: GenerationRequest | ResponsesRequest, request: Request,
                  sessions_for: Callable[[], Awaitable[tuple[list[SteeringSession], AnswerFormat | None]]],
                  completer: Completer, streamer: Streamer, abort_event: Callable[[APIError], str] | None = None) -> Response:
    """A completion request of either API: its sessions built and checked, then answered whole or
    streamed. The request is counted once and every slot is freed, however it ends (a drain that
    times out aborts it: `abort_event` is a stream's last event then)."""
    sessions: list[SteeringSession] = []
    streaming = False
    try:
        tracker.admit()
        with state.lifecycle.abortable():  # returns from inside unless a drain past its timeout cancels it
            sessions, answer = await sessions_for()
            tracker.sessions = sessions
            if not body.stream:
                whole = await completer(state, body, sessions, answer, tracker, request)
                whole.headers["x-request-id"] = tracker.request_id
                return whole
            # A full queue answers 503 before the stream begins. The other choices take their slots as
            # they run: with fewer slots than choices, they wait for the first ones to end.
            await sessions[0].start()
            response = SessionStream(sessions, tracker, streamer(state, body, sessions, answer, tracker), state.lifecycle,
                                     abort_event or error_ending)
            streaming = True  # from here the response owns the slots and the count
            response.headers["x-request-id"] = tracker.request_id
            return response
        tracker.status = "aborted"  # the drain timed out
        return shutting_down().response()
    except Exception as exc:
        return tracker.failed(exc).response()
    finally:
        if not streaming:
            try:
                await close_all(sessions)
            finally:
                tracker.close()


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
    sampling = sampling_params(body, max_tokens, getattr(engine, "vocab_size", None))
    sampling.answer_constraint = answer.constraint if answer is not None else None
    template = template_kwargs(body.chat_template_kwargs, body.reasoning_effort)
    conversation = split_conversation(messages, body.continue_final_message, template, body.tools)
    check_scorer_reach(state, policy, conversation, "messages")
    reasoning = engine.reasoning_for(s.reasoning(), conversation)
    prompt = await engine.render(conversation, reasoning, body.model)
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
    sampling = sampling_params(body, max_tokens, getattr(engine, "vocab_size", None))
    if isinstance(raw, str):
        check_scorer_reach(state, policy, raw_conversation(raw), "prompt")
    prompt = await engine.render_raw(raw, reasoning, body.model, body.add_special_tokens)
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

    async def score(item: StepItem) -> StepScore:
        return await state.batcher.score_one(item)

    def session(choice: int) -> SteeringSession:
        detector = s.detector()
        detector.max_step_tokens *= engine.ids_per_token  # the loop's ids may not be tokens (upstream: bytes)
        seeded = sampling if sampling.seed is None or not choice else sampling.model_copy(
            update={"seed": seed_plus(sampling.seed, choice)})  # each choice its own seed
        return SteeringSession(engine, prompt, conversation, seeded, policy, reasoning, detector, score,
                               stop=body.stop_list(), observer=observer, model=body.model,
                               skip_special_tokens=not keep_special_tokens,
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
    for param, ids in (("logit_bias", bias), ("stop_token_ids", body.stop_token_ids or [])):
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


def reasoning_count(generation: Generation, pre: int, reasoning: int) -> int | None:
    """Tokens of the output's ids `pre`..`pre + reasoning`, where the engine knows its counts."""
    if not reasoning:
        return 0
    start, end = generation.token_count_at(pre), generation.token_count_at(pre + reasoning)
    return None if start is None or end is None else end - start


def _counts(session: SteeringSession) -> tuple[int, int, int]:
    """(prompt, completion, reasoning) tokens of one session."""
    counted = session.generation.token_usage() if session.generation is not None else None
    if counted is None:
        return session.prompt_tokens, session.output_tokens, session.reasoning_tokens
    prompt, completion = counted  # the engine's ids are not tokens: take its counts
    # The reasoning is the output's first ids, after a start marker the model wrote and up to its end
    # marker: counted where the engine knows, else its share.
    reasoning = reasoning_count(session.generation, session.output.pre_tokens, session.reasoning_tokens)
    if reasoning is None:
        reasoning = round(completion * session.reasoning_tokens / session.output_tokens) if session.output_tokens else 0
    return prompt, completion, reasoning


def fingerprint(sessions: list[SteeringSession]) -> str | None:
    """The backend's system_fingerprint (an upstream's), as it gave it."""
    generation = sessions[0].generation
    return generation.system_fingerprint if generation is not None else None


def _usage(sessions: list[SteeringSession]) -> Usage:
    """The prompt once, the completions of every choice summed (as OpenAI counts n > 1)."""
    counts = [_counts(session) for session in sessions]
    prompt = counts[0][0]
    completion, reasoning = sum(c[1] for c in counts), sum(c[2] for c in counts)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                 completion_tokens_details=CompletionTokensDetails(reasoning_tokens=reasoning))


async def choice_runs(sessions: list[SteeringSession]) -> AsyncIterator[tuple[int, Delta | None]]:
    """Every choice's deltas tagged with its index as they come, then (index, None) when it ends.
    One choice runs inline; several run as tasks feeding a bounded queue (a slow reader holds them
    back rather than letting text pile up)."""
    if len(sessions) == 1:
        async for delta in sessions[0].run():
            yield 0, delta
        yield 0, None
        return
    queue: asyncio.Queue[tuple[int, Delta | None, BaseException | None]] = asyncio.Queue(maxsize=64)

    async def pump(index: int, session: SteeringSession) -> None:
        try:
            async for delta in session.run():
                await queue.put((index, delta, None))
            await queue.put((index, None, None))
        except Exception as exc:
            await queue.put((index, None, exc))

    tasks = [asyncio.create_task(pump(index, session)) for index, session in enumerate(sessions)]
    try:
        for _ in range(len(sessions)):
            while True:
                index, delta, error = await queue.get()
                if error is not None:
                    raise error
                yield index, delta
                if delta is None:
                    break
    finally:
        for task in tasks:
            task.cancel()
        with anyio.CancelScope(shield=True):
            await asyncio.gather(*tasks, return_exceptions=True)


class LogprobEntries:
    """The wire form of a session's logprob entries (vLLM's: each token decoded on its own)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def _top(self, token: int | str, logprob: float) -> TopLogprob:
        text = token if isinstance(token, str) else self.tokenizer.decode([token])
        return TopLogprob(token=text, logprob=max(logprob, -9999.0), bytes=list(text.encode("utf-8", errors="replace")))

    def __call__(self, entries: list[TokenLogprob]) -> ChoiceLogprobs:
        return ChoiceLogprobs(content=[
            TokenLogprobEntry(**self._top(e.token_id, e.logprob).model_dump(), top_logprobs=[self._top(i, lp) for i, lp in e.top])
            for e in entries])

    def of_text(self, entries: list[TokenLogprob]) -> CompletionLogprobs:
        """The completions API's form of the same entries."""
        sampled = [self._top(e.token_id, e.logprob) for e in entries]
        return CompletionLogprobs(tokens=[t.token for t in sampled], token_logprobs=[t.logprob for t in sampled],
                                  top_logprobs=[{t.token: t.logprob for t in (self._top(i, lp) for i, lp in e.top)} for e in entries])


@dataclass
class Released:
    """One choice's released deltas, in order, for a whole response."""

    deltas: list[Delta] = field(default_factory=list)

    def of(self, *sections: str) -> str:
        return "".join(d.text for d in self.deltas if d.section in sections)

    @property
    def logprobs(self) -> list[TokenLogprob]:
        return [entry for d in self.deltas for entry in d.logprobs]


async def finished(sessions: list[SteeringSession], tracker: RequestTracker, request: Request) -> tuple[list[Released], Usage] | Response:
    """Every choice's released deltas and the usage, once all have ended (the request counted as a
    success); or the response that ends the request early (a client gone, a failure)."""
    parts = [Released() for _ in sessions]

    async def collect() -> None:
        async with contextlib.aclosing(choice_runs(sessions)) as runs:
            async for index, delta in runs:
                if delta is None:
                    continue
                tracker.saw(delta.text, index)
                parts[index].deltas.append(delta)

    task = asyncio.create_task(collect())
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=0.5)
            if not task.done() and await request.is_disconnected():
                return JSONResponse({}, status_code=499)
        task.result()
    except Exception as exc:
        return tracker.failed(exc).response()
    finally:
        if not task.done():
            task.cancel()  # the sessions' own `finally` frees the slots; the route closes them again regardless
            with anyio.CancelScope(shield=True), contextlib.suppress(asyncio.CancelledError):
                await task
    return parts, counted_usage(sessions, tracker)


async def complete(state: ServerState, body: ChatCompletionRequest, sessions: list[SteeringSession], answer: AnswerFormat | None,
                   tracker: RequestTracker, request: Request) -> Response:
    done = await finished(sessions, tracker, request)
    if isinstance(done, Response):
        return done
    parts, usage = done
    logprobs = LogprobEntries(state.engine.tokenizer) if body.logprobs else None
    choices = []
    for index, (session, text) in enumerate(zip(sessions, parts, strict=True)):
        reasoning = text.of("reasoning") or None
        content, calls = text.of("answer"), None
        if answer is not None and answer.tools is not None:
            if session.finish_reason == "content_filter":
                content = answer.tools.plain(content)
            else:
                content, calls = tool_call_message(answer.tools, content)
        choices.append(Choice(index=index, message=AssistantMessage(content=content, reasoning_content=reasoning, reasoning=reasoning,
                                                                    tool_calls=calls),
                              finish_reason=finish_reason(session, answer, bool(calls)), safethink=session.client_report,
                              logprobs=logprobs(text.logprobs) if logprobs else None))
    response = ChatCompletionResponse(model=state.engine.model_name, choices=choices, usage=usage, safethink=sessions[0].client_report,
                                      system_fingerprint=fingerprint(sessions))
    return JSONResponse(response.model_dump(exclude_none=True))


async def complete_text(state: ServerState, body: CompletionRequest, sessions: list[SteeringSession], answer: AnswerFormat | None,
                        tracker: RequestTracker, request: Request) -> Response:
    done = await finished(sessions, tracker, request)
    if isinstance(done, Response):
        return done
    parts, usage = done
    logprobs = LogprobEntries(state.engine.tokenizer) if body.logprobs is not None else None
    choices = []
    for index, (session, text) in enumerate(zip(sessions, parts, strict=True)):
        # The session's raw text holds the reasoning markers as the model (or the server) wrote them.
        choices.append(CompletionChoice(index=index, text=text.of("reasoning", "answer"), finish_reason=session.finish_reason,
                                        safethink=session.client_report, logprobs=logprobs.of_text(text.logprobs) if logprobs else None))
    response = CompletionResponse(model=state.engine.model_name, choices=choices, usage=usage, safethink=sessions[0].client_report,
                                  system_fingerprint=fingerprint(sessions))
    return JSONResponse(response.model_dump(exclude_none=True))


async def stream_text(state: ServerState, body: CompletionRequest, sessions: list[SteeringSession], answer: AnswerFormat | None,
                      tracker: RequestTracker) -> AsyncIterator[str]:
    """`/v1/completions` streamed: each delta a `text_completion` chunk, its text as the model wrote it."""
    chunk_id, created, model = text_completion_id(), int(time.time()), state.engine.model_name

    def chunk(*choices: CompletionChoice, usage: Usage | None = None, fingerprint: str | None = None) -> str:
        payload = CompletionResponse(id=chunk_id, created=created, model=model, choices=list(choices), usage=usage,
                                     system_fingerprint=fingerprint)
        return f"data: {payload.model_dump_json(exclude_none=True)}\n\n"

    logprobs = LogprobEntries(state.engine.tokenizer) if body.logprobs is not None else None
    try:
        async with contextlib.aclosing(choice_runs(sessions)) as runs:
            async for index, delta in runs:
                session = sessions[index]
                if delta is None:
                    yield chunk(CompletionChoice(index=index, text="", finish_reason=session.finish_reason, safethink=session.client_report),
                                fingerprint=fingerprint([session]))
                    continue
                tracker.saw(delta.text, index)
                yield chunk(CompletionChoice(index=index, text=delta.text, logprobs=logprobs.of_text(delta.logprobs) if logprobs else None))
    except Exception as exc:
        for event in failed_stream(tracker, exc):
            yield event
        return
    for event in stream_tail(body, sessions, tracker, lambda usage: chunk(usage=usage)):
        yield event


async def complete_response(state: ServerState, body: ResponsesRequest, sessions: list[SteeringSession], answer: AnswerFormat | None,
                            tracker: RequestTracker, request: Request) -> Response:
    done = await finished(sessions, tracker, request)
    if isinstance(done, Response):
        return done
    parts, usage = done
    session, text = sessions[0], parts[0]
    whole = ResponseBuilder(body, state.engine.model_name).whole(text.of("reasoning") or None, text.of("answer"),
                                                                session.finish_reason, usage, session.client_report)
    return JSONResponse(whole)


async def stream_response(state: ServerState, body: ResponsesRequest, sessions: list[SteeringSession], answer: AnswerFormat | None,
                          tracker: RequestTracker) -> AsyncIterator[str]:
    """`/v1/responses` streamed: the Responses API's events, each text delta as it is released."""
    events = ResponseEvents(ResponseBuilder(body, state.engine.model_name))
    for event in events.start():
        yield event
    try:
        async with contextlib.aclosing(choice_runs(sessions)) as runs:
            async for _, delta in runs:
                if delta is None or not delta.text:
                    continue
                tracker.saw(delta.text)
                for event in events.delta(delta.section, delta.text):
                    yield event
        usage = _usage(sessions)
        ending = list(events.end(sessions[0].finish_reason, usage, sessions[0].client_report))
    except Exception as exc:
        yield events.error(tracker.failed(exc))
        return
    tracker.finished(sessions, usage)
    for event in ending:
        yield event


class SessionStream(StreamingResponse):
    """A streamed response that owns its sessions' engine slots and its request count: both are
    released when the response ends, however it ends (finished, failed, cancelled, or a client
    that left before the first chunk, when the body iterator never even starts)."""

    def __init__(self, sessions: list[SteeringSession], tracker: RequestTracker, content: AsyncIterator[str], lifecycle: Lifecycle,
                 abort_event: Callable[[APIError], str]) -> None:
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.sessions = sessions
        self.tracker = tracker
        self.content = content
        self.lifecycle = lifecycle
        self.abort_event = abort_event

    async def stream_response(self, send: Send) -> None:
        """Starlette's, in a scope that a drain past its timeout cancels: the stream then ends with an
        error event and [DONE]."""
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        ended = False
        with self.lifecycle.abortable() as scope:
            async for chunk in self.body_iterator:
                await send({"type": "http.response.body", "body": chunk.encode("utf-8"), "more_body": True})
            ended = True
        if scope.cancelled_caught and not ended and self.tracker.status == "aborted":  # (no outcome, no error event yet)
            await send({"type": "http.response.body", "body": self.abort_event(shutting_down()).encode("utf-8"), "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                with anyio.CancelScope(shield=True):
                    try:
                        await self.content.aclose()  # type: ignore[attr-defined]
                    finally:
                        await close_all(self.sessions)
            finally:
                self.tracker.close()


def counted_usage(sessions: list[SteeringSession], tracker: RequestTracker) -> Usage:
    """The usage of a request whose choices all ended, counted as a success."""
    usage = _usage(sessions)
    tracker.finished(sessions, usage)
    return usage


def stream_tail(body: GenerationRequest, sessions: list[SteeringSession], tracker: RequestTracker,
                usage_event: Callable[[Usage], str]) -> Iterator[str]:
    """A finished stream's last events: the usage where the client asked for it, then [DONE]."""
    usage = counted_usage(sessions, tracker)
    if body.stream_options is not None and body.stream_options.include_usage:
        yield usage_event(usage)
    yield "data: [DONE]\n\n"


def failed_stream(tracker: RequestTracker, exc: Exception) -> Iterator[str]:
    """A stream that failed after it began: the error as an event, then [DONE]."""
    yield error_ending(tracker.failed(exc))


def error_ending(error: APIError) -> str:
    return _sse(error.body()) + "data: [DONE]\n\n"


def _sse(payload: ChatCompletionChunk | ErrorResponse) -> str:
    # An error keeps its null `param` and `code`, as OpenAI's do.
    return f"data: {payload.model_dump_json(exclude_none=not isinstance(payload, ErrorResponse))}\n\n"


class DeltaEvents:
    """The SSE events of text deltas, from templates of the chunk model dumped once per stream and
    choice with a mark where the text goes: a delta then costs one JSON string encoding, not a model dump."""

    _MARK = "\x00"

    def __init__(self, chunk: Callable[..., ChatCompletionChunk], choices: int) -> None:
        mark = json.dumps(self._MARK)
        self._templates = [{
            "reasoning": _sse(chunk(DeltaMessage(reasoning_content=self._MARK, reasoning=self._MARK), index=index)).split(mark),
            "answer": _sse(chunk(DeltaMessage(content=self._MARK), index=index)).split(mark),
        } for index in range(choices)]

    def __call__(self, delta: Delta, index: int = 0) -> str:
        return json.dumps(delta.text, ensure_ascii=False).join(self._templates[index][delta.section])


def _delta_message(delta: Delta) -> DeltaMessage:
    if delta.section == "reasoning":
        return DeltaMessage(reasoning_content=delta.text, reasoning=delta.text)
    return DeltaMessage(content=delta.text)


def finish_reason(session: SteeringSession, answer: AnswerFormat | None, called: bool) -> str | None:
    if called and session.finish_reason == "stop" and answer is not None and answer.finish_with_tool_calls:
        return "tool_calls"
    return session.finish_reason


async def stream(state: ServerState, body: ChatCompletionRequest, sessions: list[SteeringSession], answer: AnswerFormat | None,
                 tracker: RequestTracker) -> AsyncIterator[str]:
    chunk_id, created, model = completion_id(), int(time.time()), state.engine.model_name

    def chunk(delta: DeltaMessage, finish: str | None = None, index: int = 0, logprobs: ChoiceLogprobs | None = None,
              **extra: object) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=chunk_id, created=created, model=model,
                                   choices=[StreamChoice(index=index, delta=delta, finish_reason=finish, logprobs=logprobs)], **extra)

    event = DeltaEvents(chunk, len(sessions))
    logprobs = LogprobEntries(state.engine.tokenizer) if body.logprobs else None
    tools = [ToolCallStream(answer.tools) for _ in sessions] if answer is not None and answer.tools is not None else None
    try:
        for index in range(len(sessions)):
            yield _sse(chunk(DeltaMessage(role="assistant", content=""), index=index))
        async with contextlib.aclosing(choice_runs(sessions)) as runs:
            async for index, delta in runs:
                session = sessions[index]
                if delta is None:
                    for message in tools[index].end() if tools else []:
                        yield _sse(chunk(message, index=index))
                    called = tools is not None and tools[index].called
                    yield _sse(chunk(DeltaMessage(), finish_reason(session, answer, called), index=index,
                                     safethink=session.client_report, system_fingerprint=fingerprint([session])))
                    continue
                tracker.saw(delta.text, index)
                entries = logprobs(delta.logprobs) if logprobs is not None and delta.logprobs else None
                if tools is not None and delta.section == "answer":
                    messages = tools[index].server_text(delta.text) if delta.server else tools[index].answer(delta.text)
                    for message in messages or ([DeltaMessage()] if entries else []):
                        yield _sse(chunk(message, index=index, logprobs=entries))
                        entries = None  # the delta's entries go out once, with its first message
                elif entries is None:
                    if delta.text:
                        yield event(delta, index)
                else:
                    yield _sse(chunk(_delta_message(delta), index=index, logprobs=entries))
    except Exception as exc:
        for event in failed_stream(tracker, exc):
            yield event
        return
    for event in stream_tail(body, sessions, tracker,
                             lambda usage: _sse(ChatCompletionChunk(id=chunk_id, created=created, model=model, choices=[], usage=usage))):
        yield event
