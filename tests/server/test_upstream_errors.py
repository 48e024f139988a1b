"""What of an upstream's failure reaches the client: a fixed text with the status and the error's
identifiers, never its message, body or an exception's text (those go to the server's log)."""

from __future__ import annotations

import asyncio
import json
import logging

import aiohttp
import pytest

from safethink_server.engines.upstream.errors import identifier, status_error, stream_error, transport_error
from safethink_server.engines.upstream.stream import UpstreamError, sse_batches
from tests.support.faulty_upstream import QUOTED


@pytest.mark.parametrize(("value", "kept"), [
    ("invalid_request_error", "invalid_request_error"), ("messages[0].content", "messages[0].content"), (400, "400"),
    ("BadRequestError", "BadRequestError"), ("x" * 64, "x" * 64), ("x" * 65, None), ("", None), (QUOTED, None),
    ("two words", None), ("a\nb", None), ("é", None), (True, None), (None, None), (1.5, None), (["tools"], None),
])
def test_only_short_identifiers_pass(value, kept):
    assert identifier(value) == kept


@pytest.mark.parametrize(("status", "body", "answered", "message", "param"), [
    (400, {"error": {"message": QUOTED, "type": "invalid_request_error", "param": "max_tokens", "code": None}}, 400,
     "the upstream rejected the request: it answered 400 (type invalid_request_error, param max_tokens)", "max_tokens"),
    (400, {"error": {"message": QUOTED, "type": QUOTED, "param": QUOTED, "code": QUOTED}}, 400,
     "the upstream rejected the request: it answered 400", None),
    (400, {"object": "error", "message": QUOTED, "type": "BadRequestError", "param": None, "code": 400}, 400,  # older vLLM
     "the upstream rejected the request: it answered 400 (type BadRequestError, code 400)", None),
    (422, {"detail": [{"msg": QUOTED}]}, 400, "the upstream rejected the request: it answered 422", None),
    (401, {"error": {"message": QUOTED, "type": "authentication_error"}}, 502,
     "the upstream rejected the request: it answered 401 (type authentication_error)", None),
    (429, {"error": {"message": QUOTED, "type": "rate_limit_error", "param": "model"}}, 429,
     "the upstream is rate limiting: it answered 429 (type rate_limit_error, param model)", None),
    (500, {"error": {"message": QUOTED, "type": "server_error", "param": "messages"}}, 502,
     "the upstream failed: it answered 500 (type server_error, param messages)", None),
    (503, QUOTED, 502, "the upstream failed: it answered 503", None),
    (400, [QUOTED], 400, "the upstream rejected the request: it answered 400", None),
])
def test_a_status_error_is_a_fixed_text_and_its_body_is_logged(caplog, status, body, answered, message, param):
    text = body if isinstance(body, str) else json.dumps(body)
    with caplog.at_level(logging.WARNING, logger="safethink_server"):
        error = status_error(status, text, "/v1/chat/completions")
    assert (str(error), error.status, error.param) == (message, answered, param)
    assert QUOTED not in str(error)
    assert QUOTED in caplog.text and "/v1/chat/completions" in caplog.text


def test_a_long_body_is_logged_cut_and_on_one_line(caplog):
    with caplog.at_level(logging.WARNING, logger="safethink_server"):
        status_error(500, f"{QUOTED}\nforged log line\n" + "x" * 10_000, "/v1/completions")
    (record,) = caplog.records
    assert QUOTED in record.getMessage() and "\n" not in record.getMessage() and len(record.getMessage()) < 2300


def read(body: bytes) -> UpstreamError:
    async def chunks():  # type: ignore[no-untyped-def]
        yield body

    async def run() -> UpstreamError:
        with pytest.raises(UpstreamError) as raised:
            async for _ in sse_batches(chunks(), 5, 5):
                pass
        return raised.value

    return asyncio.run(run())


@pytest.mark.parametrize(("error", "message"), [
    ({"object": "error", "message": QUOTED, "type": "BadRequestError", "param": None, "code": 400},
     "the upstream failed mid-stream (type BadRequestError, code 400)"),
    ({"message": QUOTED, "type": QUOTED, "param": "tools", "code": QUOTED}, "the upstream failed mid-stream"),
    (QUOTED, "the upstream failed mid-stream"),
    ([QUOTED], "the upstream failed mid-stream"),
])
def test_a_mid_stream_error_event_is_a_fixed_text_and_its_message_is_logged(caplog, error, message):
    body = b'data: {"choices": []}\n\ndata: ' + json.dumps({"error": error}).encode() + b"\n\n"
    with caplog.at_level(logging.WARNING, logger="safethink_server"):
        raised = read(body)
    assert (str(raised), raised.status, raised.kind, raised.param) == (message, 502, "upstream_error", None)
    assert QUOTED in caplog.text


def test_a_transport_error_quotes_no_exception():
    key = aiohttp.client_reqrep.ConnectionKey("upstream.internal", 8000, False, True, None, None, None)
    refused = aiohttp.ClientConnectorError(key, OSError(111, f"Connect call failed {QUOTED}"))
    assert (str(transport_error(refused)), transport_error(refused).status) == ("the upstream is unreachable", 503)
    assert (str(transport_error(TimeoutError(QUOTED))), transport_error(TimeoutError()).status) == ("the upstream timed out", 504)
    broken = aiohttp.ClientPayloadError(QUOTED)
    assert str(transport_error(broken)) == "the upstream connection failed"
    assert str(transport_error(broken, mid_stream=True)) == "the upstream connection broke mid-stream"
    assert str(stream_error(None)) == "the upstream failed mid-stream"
