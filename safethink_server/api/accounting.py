"""Every request accounted for, however early it is refused: each response carries an `x-request-id`;
a request that no route's tracker counted (refused with a 401 before its body was read, a 413, a
body the request schema refuses, a wrong method, or a route without a tracker such as /tokenize) is
written to the audit log here, and, to a generation route, counted in safethink_requests_total with
its status."""

from __future__ import annotations

import logging
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from safethink_server.api.audit import AuditError, AuditLog, AuditRecord
from safethink_server.api.auth import PUBLIC_PATHS
from safethink_server.api.errors import APIError, counted_as
from safethink_server.metrics import Metrics
from safethink_server.schema import RequestStatus

logger = logging.getLogger(__name__)

GENERATION_ROUTES = {"/v1/chat/completions": "chat.completions", "/v1/completions": "completions", "/v1/responses": "responses"}
ROUTES = {**GENERATION_ROUTES, "/tokenize": "tokenize", "/detokenize": "detokenize", "/v1/models": "models"}  # else "unknown"
UNAUTHENTICATED = "unauthenticated"  # the key label of a request refused before its key was known
UNAUTHORIZED = "unauthorized"


class RequestAccounting:
    def __init__(self, app: ASGIApp, metrics: Metrics, audit: AuditLog, engine_name: str) -> None:
        self.app, self.metrics, self.audit, self.engine_name = app, metrics, audit, engine_name

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request_id = uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        arrived_at, arrived = time.time(), time.perf_counter()
        status = 500  # what an exception that escapes the app becomes
        started = disconnected = False

        async def receive_noting_disconnect() -> Message:
            nonlocal disconnected
            message = await receive()
            disconnected = disconnected or message["type"] == "http.disconnect"
            return message

        async def send_with_id(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
                headers = list(message.get("headers") or [])
                if not any(name.lower() == b"x-request-id" for name, _ in headers):
                    headers.append((b"x-request-id", request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive_noting_disconnect, send_with_id)
        except Exception:
            if started:
                raise
            # (answered here rather than by the app's outer error handler, so that it carries the id)
            logger.exception("unhandled error")
            await APIError(500, "internal server error", type_="server_error").response()(scope, receive, send_with_id)
        finally:
            if not state.get("tracked") and scope["path"] not in PUBLIC_PATHS:
                counted = self._status(status, disconnected)
                self._account(state, scope["path"], status, counted, arrived_at, time.perf_counter() - arrived)

    @staticmethod
    def _status(status: int, disconnected: bool) -> RequestStatus | str:
        if disconnected and status == 400:  # the client left while its body was read
            return RequestStatus.ABORTED
        return RequestStatus.SUCCESS if status < 400 else UNAUTHORIZED if status == 401 else counted_as(status)

    def _account(self, state: dict, path: str, status: int, counted: RequestStatus | str, arrived_at: float, duration_s: float) -> None:
        """A request no tracker counted: to a generation route it is counted; to any route but the public
        ones, audited."""
        tenant = state.get("tenant")
        key = tenant.id if tenant is not None else UNAUTHENTICATED
        if path in GENERATION_ROUTES:
            self.metrics.requests.labels(engine=self.engine_name, status=counted, key=key).inc()
        if not self.audit.enabled:
            return
        error = AuditError(status=status, type=APIError(status, "").type, code=state.get("error_code")) if status >= 400 else None
        try:
            self.audit.write(AuditRecord(time=arrived_at, request_id=state["request_id"], key=key, route=ROUTES.get(path, "unknown"), model=None,
                                         stream=False, status=counted, duration_s=duration_s, error=error))  # type: ignore[arg-type]
        except Exception:
            logger.exception("could not write the audit log line of request %s", state["request_id"])
