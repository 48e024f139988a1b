"""The audit log: one JSON line per request, to stdout or appended to a file, for the platform to
collect. It names the key by its id, never the key; text only where the operator asks for it."""

from __future__ import annotations

import os
from typing import Literal

from pydantic import BaseModel, Field

from safethink_server.schema import RequestStatus, StepRecord

STDOUT = 1


class AuditChoice(BaseModel):
    finish_reason: str | None
    steps: list[StepRecord] = Field(description="every judged step: index, section, p_unsafe, action, scorer error")
    interventions: int
    refusal: bool
    output: str | None = Field(default=None, description="the released text (with --audit-log-text)")


class AuditError(BaseModel):
    status: int
    type: str
    code: str | None


class AuditRecord(BaseModel):
    time: float = Field(description="arrival, Unix seconds")
    request_id: str
    key: str = Field(description="the API key's id")
    route: str
    model: str | None
    stream: bool
    status: RequestStatus | Literal["unauthorized"] = Field(
        description="as safethink_requests_total counts it; unauthorized: refused before the body was read "
                    "(counted in safethink_unauthorized_total)")
    error: AuditError | None = None
    choices: list[AuditChoice] = []
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    reasoning_tokens: int | None = None
    ttft_s: float | None = Field(default=None, description="arrival to the first released text")
    duration_s: float
    prompt: object | None = Field(default=None, description="the request's messages, prompt or input (with --audit-log-text)")


class AuditLog:
    """Each record is one write of one line: appends from several worker processes do not interleave."""

    def __init__(self, destination: str | Literal["stdout", "off"], include_text: bool) -> None:
        self.include_text = include_text
        self._fd: int | None = None
        self.enabled = destination != "off"
        if destination == "stdout":
            self._fd = STDOUT
        elif self.enabled:
            self._fd = os.open(destination, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def write(self, record: AuditRecord) -> None:
        if self._fd is None:
            return
        line = memoryview((record.model_dump_json(exclude_none=True) + "\n").encode("utf-8"))
        while line:
            line = line[os.write(self._fd, line):]

    def close(self) -> None:
        if self._fd is not None and self._fd != STDOUT:
            os.close(self._fd)
        self._fd = None
