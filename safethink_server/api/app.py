"""The FastAPI application: OpenAI-compatible routes over the steering loop."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from reward_models.base import Scorer
from reward_models.batcher import MicroBatcher
from safethink_server.api.accounting import RequestAccounting
from safethink_server.api.audit import AuditLog
from safethink_server.api.auth import Authentication, tenant_of
from safethink_server.api.errors import APIError, install_error_handlers
from safethink_server.api.fields import refused_field
from safethink_server.api.lifecycle import Lifecycle
from safethink_server.api.middleware import BodySizeLimit
from safethink_server.api.protocol import ChatCompletionRequest, CompletionRequest, ErrorResponse, ModelCard, ModelList
from safethink_server.api.request_json import CheckedRoute
from safethink_server.api.responses import (
    RESPONSES_FIELDS,
    ResponseBuilder,
    ResponseEvents,
    ResponsesRequest,
    refused_response_field,
)
from safethink_server.api.serving import respond
from safethink_server.api.serving_chat import complete, stream
from safethink_server.api.serving_completions import complete_text, stream_text
from safethink_server.api.serving_responses import complete_response, stream_response
from safethink_server.api.sessions import build_completion_sessions, build_sessions
from safethink_server.api.state import ServerState
from safethink_server.api.tokens import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    detokenize,
    tokenize,
)
from safethink_server.api.tracker import RequestTracker, failure
from safethink_server.config import ServerSettings
from safethink_server.engines.base import AnswerFormat, Engine, EngineError
from safethink_server.metrics import PROCESS_REFRESH_S, Metrics
from safethink_server.prompt import PromptError
from safethink_server.schema import TokenizeResponse
from safethink_server.steering.session import SteeringSession
from safethink_server.tenants import Tenant

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


def create_app(settings: ServerSettings, engine: Engine, scorer: Scorer) -> FastAPI:
    keyring = settings.keyring()
    metrics = Metrics()
    tenants = keyring.tenants()
    metrics.initialise(engine.name, [t.id for t in tenants], max(t.policy.early_steps for t in tenants))
    batcher = MicroBatcher(scorer, settings.scorer_max_batch, settings.scorer_max_wait_ms, observer=metrics.scorer_batch_done,
                           warm_observer=metrics.scorer_warmed)
    state = ServerState(settings, engine, scorer, batcher, metrics, Lifecycle(settings.drain_timeout_s), keyring,
                        AuditLog(settings.audit_log, settings.audit_log_text))

    async def refresh_process_metrics() -> None:
        while True:
            try:
                metrics.refresh_process()
            except Exception:
                logger.exception("could not read this worker's process metrics")
            await asyncio.sleep(PROCESS_REFRESH_S)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await engine.open()
        state.lifecycle.handle_sigterm()
        refresher = asyncio.create_task(refresh_process_metrics()) if metrics.process else None
        yield
        if refresher is not None:
            refresher.cancel()
        await batcher.aclose()
        await engine.close()
        scorer.close()
        state.audit.close()

    app = FastAPI(title="safethink-server", lifespan=lifespan)
    app.router.route_class = CheckedRoute
    app.state.safethink = state
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)

    app.add_middleware(Authentication, keyring=keyring, refused=metrics.unauthorized.inc)
    app.add_middleware(RequestAccounting, metrics=metrics, audit=state.audit, engine_name=engine.name)  # outermost: sees every answer

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
        except (PromptError, EngineError) as exc:
            raise failure(exc, metrics)[0] from exc

    @app.post("/detokenize", responses=ERRORS)
    async def detokenize_route(body: DetokenizeRequest) -> DetokenizeResponse:
        try:
            return await detokenize(engine, body)
        except (PromptError, EngineError) as exc:
            raise failure(exc, metrics)[0] from exc

    @app.post("/v1/chat/completions", response_model=None, responses=GENERATION)
    async def chat(body: ChatCompletionRequest, request: Request, tenant: Tenant = Depends(authenticate)) -> Response:
        async def sessions_for() -> tuple[list[SteeringSession], AnswerFormat | None]:
            return await build_sessions(state, tenant, body)

        return await respond(state, RequestTracker(state, tenant.id, "chat.completions", body, request), body, request, sessions_for,
                             complete, stream)

    @app.post("/v1/completions", response_model=None, responses=GENERATION)
    async def completions(body: CompletionRequest, request: Request, tenant: Tenant = Depends(authenticate)) -> Response:
        async def sessions_for() -> tuple[list[SteeringSession], AnswerFormat | None]:
            return await build_completion_sessions(state, tenant, body), None

        return await respond(state, RequestTracker(state, tenant.id, "completions", body, request), body, request, sessions_for,
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
        return await respond(state, RequestTracker(state, tenant.id, "responses", body, request), body, request, sessions_for,
                             complete_response, stream_response, abort_event)

    return app
