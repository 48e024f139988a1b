"""One request's accounting, done exactly once however it ends: the metrics (active gauge, outcome
by engine and key, time to first token, tokens) and its audit log line."""

from __future__ import annotations

import logging
import time
import uuid
from typing import TYPE_CHECKING, Any

from starlette.requests import Request

from safethink_server.api.audit import AuditChoice, AuditError, AuditRecord
from safethink_server.api.errors import APIError
from safethink_server.api.protocol import Usage
from safethink_server.engines.base import EngineError
from safethink_server.metrics import Metrics
from safethink_server.prompt import PromptError
from safethink_server.schema import RequestStatus

if TYPE_CHECKING:
    from safethink_server.api.state import ServerState
    from safethink_server.steering.session import SteeringSession

logger = logging.getLogger(__name__)

_PROMPT_FIELDS = {"messages", "prompt", "input", "instructions"}


class RequestTracker:
    def __init__(self, state: ServerState, key: str, route: str, body: Any, request: Request) -> None:
        self.metrics, self.engine, self.lifecycle, self.audit = state.metrics, state.engine, state.lifecycle, state.audit
        self.key, self.route, self.body = key, route, body
        self.request_id: str = getattr(request.state, "request_id", None) or uuid.uuid4().hex  # RequestAccounting's
        request.state.tracked = True  # counted and audited here, not by RequestAccounting
        self.arrived_at, self.arrived = time.time(), time.perf_counter()
        self.ttft: float | None = None
        self.status = RequestStatus.ABORTED
        self.error: APIError | None = None
        self.sessions: list[SteeringSession] = []
        self.usage: Usage | None = None
        self.texts: list[list[str]] | None = None
        self.closed = False
        self.admitted = False
        self.metrics.active.inc()

    def admit(self) -> None:
        """503 while the server drains, or once its engine is dead."""
        dead = self.engine.dead_reason()
        if dead is not None:
            raise APIError(503, f"the engine is dead ({dead}); the server is waiting to be restarted", code="engine_dead")
        self.lifecycle.admit()
        self.admitted = True

    def saw(self, text: str, choice: int = 0) -> None:
        if self.ttft is None and text:
            self.ttft = time.perf_counter() - self.arrived
            self.metrics.ttft.observe(self.ttft)
        if self.audit.include_text:
            if self.texts is None:
                self.texts = [[] for _ in range(max(1, len(self.sessions)))]
            self.texts[choice].append(text)

    def failed(self, exc: Exception) -> APIError:
        self.error, self.status = failure(exc, self.metrics)
        return self.error

    def finished(self, sessions: list[SteeringSession], usage: Usage) -> None:
        self.status, self.usage = RequestStatus.SUCCESS, usage
        self.metrics.generated.inc(usage.completion_tokens)
        self.metrics.discarded.inc(sum(session.report.discarded_tokens or 0 for session in sessions))
        self.metrics.withheld.inc(sum(session.report.withheld_tokens or 0 for session in sessions))

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.admitted:
            self.lifecycle.leave()
        self.metrics.active.dec()
        self.metrics.requests.labels(engine=self.engine.name, status=self.status, key=self.key).inc()
        if self.audit.enabled:
            try:
                self.audit.write(self.record())
            except Exception:
                logger.exception("could not write the audit log line of request %s", self.request_id)

    def record(self) -> AuditRecord:
        usage, error, texts = self.usage, self.error, self.texts
        choices = [AuditChoice(finish_reason=s.finish_reason, steps=s.report.steps, interventions=len(s.report.interventions),
                               refusal=s.report.refusal is not None,
                               output="".join(texts[i]) if texts is not None and i < len(texts) else None)
                   for i, s in enumerate(self.sessions)]
        details = usage.completion_tokens_details if usage is not None else None
        return AuditRecord(
            time=self.arrived_at, request_id=self.request_id, key=self.key, route=self.route, model=getattr(self.body, "model", None),
            stream=bool(getattr(self.body, "stream", False)), status=self.status,
            error=AuditError(status=error.status, type=error.type, code=error.code) if error is not None else None,
            choices=choices, prompt_tokens=usage.prompt_tokens if usage else None, completion_tokens=usage.completion_tokens if usage else None,
            reasoning_tokens=details.reasoning_tokens if details else None, ttft_s=self.ttft, duration_s=time.perf_counter() - self.arrived,
            prompt=self.body.model_dump(include=_PROMPT_FIELDS, exclude_none=True) if self.audit.include_text else None)


def failure(exc: Exception, metrics: Metrics) -> tuple[APIError, str]:
    """The API error a failure answers with, and the status it is counted under. Anything unexpected
    is logged with its traceback, on the server only."""
    if isinstance(exc, APIError):
        return exc, exc.counted_as
    if isinstance(exc, PromptError):
        return APIError(400, str(exc), param=exc.param, code=exc.code), RequestStatus.INVALID
    if isinstance(exc, EngineError):
        if exc.kind is not None:
            metrics.upstream_errors.labels(kind=exc.kind).inc()
        if exc.counted_as == RequestStatus.ERROR:
            logger.warning("generation failed: %s", exc)
        return APIError(exc.status, exc.client_message, param=exc.param, code=exc.code, type_=exc.error_type), exc.counted_as
    logger.exception("unexpected error while serving a request")
    return APIError(500, "internal server error", type_="server_error"), "error"
