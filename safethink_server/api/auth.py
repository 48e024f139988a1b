"""Authentication, before anything else reads the request: a client without a valid key gets its 401
before its body is read or parsed (`accounting.py` counts and audits it without a key id)."""

from __future__ import annotations

from collections.abc import Callable

from starlette.types import ASGIApp, Receive, Scope, Send

from safethink_server.api.errors import APIError
from safethink_server.tenants import Keyring, Tenant

PUBLIC_PATHS = frozenset({"/health", "/health/live", "/health/ready", "/metrics", "/openapi.json", "/docs", "/docs/oauth2-redirect",
                          "/redoc"})


class Authentication:
    def __init__(self, app: ASGIApp, keyring: Keyring, refused: Callable[[], None]) -> None:
        self.app, self.keyring, self.refused = app, keyring, refused

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in PUBLIC_PATHS:  # (no websocket routes exist)
            return await self.app(scope, receive, send)
        header = next((value for name, value in scope["headers"] if name == b"authorization"), b"")
        tenant = self.keyring.tenant(header.decode("latin-1"))
        if tenant is None:
            self.refused()
            scope.setdefault("state", {})["error_code"] = "invalid_api_key"  # counted and audited by RequestAccounting
            return await APIError(401, "invalid or missing API key", code="invalid_api_key").response()(scope, receive, send)
        scope.setdefault("state", {})["tenant"] = tenant
        await self.app(scope, receive, send)


def tenant_of(scope_state: object) -> Tenant:
    tenant = getattr(scope_state, "tenant", None)
    if not isinstance(tenant, Tenant):
        raise RuntimeError("the Authentication middleware runs before every protected route")
    return tenant
