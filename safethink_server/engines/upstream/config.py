"""The proxy's settings: where the upstream is and how to talk to it."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class UpstreamConfig(BaseModel):
    url: str = Field(description="base URL of the upstream's OpenAI API, ending in /v1")
    api_key: str | None = None
    model: str | None = Field(default=None, description="model name upstream (default: its first listed model)")
    mode: Literal["auto", "token_ids", "chat"] = "auto"
    reasoning_start: str = Field(default="<think>", description="chat mode: reasoning fields are folded back between these markers")
    reasoning_end: str = "</think>"
    connect_timeout_s: float = Field(default=5.0, gt=0)
    first_byte_timeout_s: float = Field(default=60.0, gt=0, description="request sent to first streamed event")
    chunk_timeout_s: float = Field(default=30.0, gt=0, description="longest silence between streamed events")
    max_connections: int = Field(default=256, ge=1)

