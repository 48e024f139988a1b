"""The proxy's settings: where the upstream is and how to talk to it."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from safethink_server.schema import ReasoningConfig


class UpstreamConfig(BaseModel):
    url: str = Field(description="base URL of an OpenAI-compatible API, ending in /v1")
    api_key: str | None = Field(default=None, description="API key sent to the upstream")
    model: str | None = Field(default=None, description="model name there (default: its first model)")
    mode: Literal["auto", "token_ids", "chat"] = Field(
        default="auto", description="token ids via /tokenize + /v1/completions, or chat with continue_final_message; auto detects")
    connect_timeout_s: float = Field(default=5.0, gt=0, description="connect timeout")
    first_byte_timeout_s: float = Field(default=60.0, gt=0, description="request to first streamed event")
    chunk_timeout_s: float = Field(default=30.0, gt=0, description="longest silence between streamed events")
    max_connections: int = Field(default=256, ge=1, description="connection pool size")
    reasoning: ReasoningConfig = Field(default_factory=ReasoningConfig,
                                       description="chat mode: reasoning fields are folded back between its markers")
