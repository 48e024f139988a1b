"""The JSON of a request body, read strictly: what parses here can reach a tokenizer, a chat template
or an engine without an error there. Every route reads its body through `CheckedRoute`."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Coroutine
from typing import Any

import anyio.to_thread
from fastapi import Request, Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException

from safethink_server.schema import INT64_MAX, INT64_MIN

MAX_DEPTH = 64  # arrays and objects inside one another (a tool's JSON schema needs a few tens at most)
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


class BadRequestJSON(HTTPException):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(400, message)
        self.param = param


def _number(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise BadRequestJSON(f"numbers must be finite; {text[:40]} is not")
    return value


def _constant(name: str) -> float:
    raise BadRequestJSON(f"{name} is not a JSON number")


def _path(parts: tuple[str | int, ...]) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


def check_tree(value: Any, check_strings: bool) -> None:
    """Depth, integer range and (where the body escaped any surrogate) lone surrogates, walked
    without recursion so that no body can exhaust the stack. Only containers are stacked, with their
    paths; scalars are checked where they stand."""
    if not isinstance(value, dict | list):
        _check_scalar(value, check_strings, ())
        return
    stack: list[tuple[dict[str, Any] | list[Any], int, tuple[str | int, ...]]] = [(value, 0, ())]
    while stack:
        node, depth, path = stack.pop()
        if depth >= MAX_DEPTH:
            raise BadRequestJSON(f"the body nests arrays and objects more than {MAX_DEPTH} levels deep", _path(path) or None)
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for key, child in items:
            if check_strings and isinstance(key, str):
                _check_string(key, path)
            if isinstance(child, dict | list):
                stack.append((child, depth + 1, (*path, key)))
            elif isinstance(child, int):
                if not INT64_MIN <= child <= INT64_MAX:  # (a bool is an int, always within)
                    raise BadRequestJSON("integers must fit in 64 bits", _path((*path, key)))
            elif check_strings and isinstance(child, str):
                _check_string(child, (*path, key))


def _check_scalar(value: Any, check_strings: bool, path: tuple[str | int, ...]) -> None:
    if isinstance(value, int) and not INT64_MIN <= value <= INT64_MAX:
        raise BadRequestJSON("integers must fit in 64 bits", _path(path) or None)
    if check_strings and isinstance(value, str):
        _check_string(value, path)


def _check_string(text: str, path: tuple[str | int, ...]) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequestJSON("strings must be valid Unicode: a lone UTF-16 surrogate (\\ud800-\\udfff) is not",
                             _path(path) or None) from None


def parse_request_json(body: bytes) -> Any:
    """The body's JSON, or a 400 naming what is wrong: invalid UTF-8 or JSON, NaN or infinities,
    integers beyond 64 bits, nesting deeper than MAX_DEPTH, lone surrogates."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequestJSON("the body is not valid UTF-8") from None
    try:
        value = json.loads(text, parse_float=_number, parse_constant=_constant)
    except RecursionError:
        raise BadRequestJSON(f"the body nests arrays and objects more than {MAX_DEPTH} levels deep") from None
    except json.JSONDecodeError as exc:
        raise BadRequestJSON(f"the body is not valid JSON: {exc.msg} at character {exc.pos}") from None
    except ValueError as exc:  # an integer with more digits than Python parses
        raise BadRequestJSON(f"the body is not valid JSON: {str(exc)[:120]}") from None
    check_tree(value, check_strings=_SURROGATE_ESCAPE.search(body) is not None)
    return value


class CheckedJSONRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            # A large body takes tens of milliseconds to read: off the event loop, so streams go on meanwhile.
            self._json = parse_request_json(body) if len(body) < 65536 else await anyio.to_thread.run_sync(parse_request_json, body)
        return self._json


class CheckedRoute(APIRoute):
    """A route whose request body is read by `parse_request_json`."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def checked(request: Request) -> Response:
            return await handler(CheckedJSONRequest(request.scope, request.receive))

        return checked
