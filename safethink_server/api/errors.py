"""OpenAI-shaped errors: every failure answers {"error": {message, type, param, code}}."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from safethink_server.api.protocol import ErrorResponse
from safethink_server.schema import RequestStatus

logger = logging.getLogger(__name__)

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error", 405: "invalid_request_error",
          413: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable_error"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None, type_: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type_ or _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")

    @property
    def counted_as(self) -> RequestStatus:
        """The status safethink_requests_total counts a request answered with this error under."""
        return counted_as(self.status)

    def body(self) -> ErrorResponse:
        return ErrorResponse.of(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body().model_dump(), status_code=self.status)


def counted_as(http_status: int) -> RequestStatus:
    """The status safethink_requests_total counts an error answer under (a 401 aside: `accounting.py`)."""
    return RequestStatus.INVALID if http_status < 500 else RequestStatus.UNAVAILABLE if http_status == 503 else RequestStatus.ERROR


def validation_error(exc: RequestValidationError) -> APIError:
    """The first problem, in words, with the parameter path; never the raw pydantic dump."""
    errors = exc.errors()
    if not errors:
        return APIError(400, "invalid request")
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return APIError(400, "request body is not valid JSON")
    param = ".".join(loc) or None
    message = first.get("msg", "invalid value").removeprefix("Value error, ")
    if first.get("type") == "missing":
        message = f"'{param}' is a required property" if param else "the request needs a JSON body"
    elif param:
        message = f"invalid value for '{param}': {message}"
    return APIError(400, message, param=param)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = "not found" if exc.status_code == 404 else str(exc.detail)
        return APIError(exc.status_code, message, param=getattr(exc, "param", None)).response()

    @app.exception_handler(Exception)
    async def _unhandled(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error")
        return APIError(500, "internal server error", type_="server_error").response()
