"""Authentication, before anything else reads the request: a client without a valid key gets its 401
before its body is read or parsed, and is counted and audited without a key id."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable

from starlette.types import ASGIApp, Receive, Scope, Send

from safethink_server.api.audit import AuditError, AuditLog, AuditRecord
from safethink_server.api.errors import APIError
from safethink_server.tenants import Keyring, Tenant

logger = logging.getLogger(__name__)

PUBLIC_PATHS = frozenset({"/health", "/health/live", "/health/ready", "/metrics", "/openapi.json", "/docs", "/docs/oauth2-redirect",
                          "/redoc"})
UNAUTHENTICATED = "unauthenticated"


class Authentication:
    def __init__(self, app: ASGIApp, keyring: Keyring, audit: AuditLog, refused: Callable[[], None]) -> None:
        self.app, self.keyring, self.audit, self.refused = app, keyring, audit, refused

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in PUBLIC_PATHS:  # (no websocket routes exist)
            return await self.app(scope, receive, send)
        header = next((value for name, value in scope["headers"] if name == b"authorization"), b"")
        tenant = self.keyring.tenant(header.decode("latin-1"))
        if tenant is None:
            error = APIError(401, "invalid or missing API key", code="invalid_api_key")
            self.refused()
            if self.audit.enabled:
                try:
                    self.audit.write(AuditRecord(time=time.time(), request_id=uuid.uuid4().hex, key=UNAUTHENTICATED,
                                                 route=scope["path"][:200], model=None, stream=False, status="unauthorized",
                                                 duration_s=0.0, error=AuditError(status=401, type=error.type, code=error.code)))
                except Exception:
                    logger.exception("could not write the audit log line of a refused request")
            return await error.response()(scope, receive, send)
        scope.setdefault("state", {})["tenant"] = tenant
        await self.app(scope, receive, send)


def tenant_of(scope_state: object) -> Tenant:
    tenant = getattr(scope_state, "tenant", None)
    if not isinstance(tenant, Tenant):
        raise RuntimeError("the Authentication middleware runs before every protected route")
    return tenant
