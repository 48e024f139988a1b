"""Upstream failures as the gateway answers them.

An upstream's error body, its mid-stream error event and an HTTP client's exception text are not the
gateway's to pass on: the body may quote model text that was never judged (a tool parser failing in the
middle of an answer quotes what it could not parse), and an exception's text names hosts and internals.
So the client gets a fixed text with the upstream's HTTP status and, where they are short identifiers,
its error's `type`, `code` and `param`; the body, the event and the exception go to the server's log."""

from __future__ import annotations

import json
import logging
import re
from typing import Any

import aiohttp

from safethink_server.engines.base import EngineError
from safethink_server.schema import RequestStatus

logger = logging.getLogger(__name__)

IDENTIFIER = re.compile(r"[A-Za-z0-9_.\[\]-]{1,64}")  # what of an upstream's error may reach a client
LOGGED_CHARS = 2000  # of an upstream's error body or event, in the server's log


class UpstreamError(EngineError):
    """An upstream failure, with the status the gateway answers and a kind for the metrics. Its
    message reaches the client: it is the gateway's own text, never the upstream's."""

    error_type = None
    counted_as = RequestStatus.UPSTREAM_ERROR

    def __init__(self, message: str, status: int, kind: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.param = param  # the request field an upstream's 4xx named (an identifier)
        self.code = "rate_limit_exceeded" if status == 429 else "upstream_error"

    @property
    def client_message(self) -> str:
        return str(self)


def identifier(value: Any) -> str | None:
    """`value` where it is a short identifier-like string (or an integer, as vLLM's `code`), else None."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    return value if isinstance(value, str) and IDENTIFIER.fullmatch(value) else None


def logged(value: Any) -> str:
    """An upstream's text for the server's log: escaped (one log line, whatever it holds) and cut."""
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    return repr(text[:LOGGED_CHARS]) + (f" (cut from {len(text)} characters)" if len(text) > LOGGED_CHARS else "")


def _error_object(body: str) -> dict[str, Any]:
    """The error object of an error body: OpenAI's and vLLM's {"error": {...}}, or the body itself where it
    is the error (older vLLM: {"object": "error", "message", "type", "param", "code"})."""
    try:
        parsed = json.loads(body)
    except ValueError:
        return {}
    if not isinstance(parsed, dict):
        return {}
    error = parsed.get("error")
    if isinstance(error, dict):
        return error
    return parsed if parsed.get("object") == "error" else {}


def _details(error: Any, *, with_param: bool = True) -> tuple[str, str | None]:
    """' (type T, code C, param P)' of an error object, each part only where it is an identifier, and the param."""
    if not isinstance(error, dict):
        return "", None
    named = {"type": identifier(error.get("type")), "code": identifier(error.get("code"))}
    if with_param:
        named["param"] = identifier(error.get("param"))
    parts = [f"{name} {value}" for name, value in named.items() if value is not None]
    return (f" ({', '.join(parts)})" if parts else ""), named.get("param")


def status_error(status: int, body: str, path: str) -> UpstreamError:
    """An upstream's answer other than 200: its status keeps its meaning (a 429 stays a 429, a 5xx is a
    502, a 4xx a 400, the gateway's own credentials refused a 502)."""
    logger.warning("the upstream answered %d to %s: %s", status, path, logged(body))
    details, param = _details(_error_object(body))
    answered = f"it answered {status}{details}"
    if status == 429:
        return UpstreamError(f"the upstream is rate limiting: {answered}", 429, "status_429")
    if status >= 500:
        return UpstreamError(f"the upstream failed: {answered}", 502, "status_5xx")
    return UpstreamError(f"the upstream rejected the request: {answered}", 502 if status in (401, 403) else 400,
                         f"status_{status}", param=param)


def stream_error(error: Any) -> UpstreamError:
    """An `error` event in the middle of an upstream's stream."""
    logger.warning("the upstream failed mid-stream: %s", logged(error))
    details, _ = _details(error, with_param=False)
    return UpstreamError(f"the upstream failed mid-stream{details}", 502, "upstream_error")


def transport_error(exc: BaseException, mid_stream: bool = False) -> UpstreamError:
    """A connection that failed, timed out, or broke while a stream was being read."""
    logger.warning("the upstream connection %s: %r", "broke mid-stream" if mid_stream else "failed", exc)
    if mid_stream:
        return UpstreamError("the upstream connection broke mid-stream", 502, "closed")
    if isinstance(exc, TimeoutError):
        return UpstreamError("the upstream timed out", 504, "timeout")
    if isinstance(exc, aiohttp.ClientConnectorError):
        return UpstreamError("the upstream is unreachable", 503, "connect")
    return UpstreamError("the upstream connection failed", 502, "closed")
