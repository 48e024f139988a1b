"""Build a scorer from one pydantic config (shared by the server, `safethink score` and the bench)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from reward_models.base import Scorer

ScorerKind = Literal["probe", "classifier", "guard", "remote"]


class ScorerConfig(BaseModel):
    kind: ScorerKind = "probe"
    model_path: Path | None = Field(default=None, description="classifier/guard: local model folder")
    head_path: Path | None = Field(default=None, description="probe: head weights (default: the shipped head)")
    device: str = Field(default="auto", description="scorer device: auto (a GPU when there is one), cpu, cuda, cuda:N")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto", description="scorer weights dtype (auto: bf16 on a GPU; on CPU float32, but the probe's encoder in bf16 "
        "where the CPU has it natively; a bf16 score moves by up to about 1e-3 with its batch's padding, float32 is exact)")
    unsafe_labels: list[str] | None = Field(default=None, description="classifier: labels (names or indices) that mean unsafe")
    unsafe_token: str = "unsafe"
    safe_token: str = "safe"
    url: str | None = Field(default=None, description="remote scorer: base URL of a vLLM classify server")
    remote_model: str | None = None
    api_key: str | None = None
    unsafe_indices: list[int] = [1]
    timeout_s: float = 10.0
    retries: int = 2


def build_scorer(config: ScorerConfig) -> Scorer:
    device = None if config.device == "auto" else config.device
    dtype = None if config.dtype == "auto" else config.dtype
    if config.kind == "probe":
        from reward_models.probe import ProbeScorer

        return ProbeScorer(head_path=config.head_path, device=device, dtype=dtype)
    if config.kind in ("classifier", "guard") and config.model_path is None:
        raise ValueError(f"the {config.kind} scorer needs a model path")
    if config.kind == "classifier":
        from reward_models.classifier import ClassifierScorer

        return ClassifierScorer(config.model_path, device=device, dtype=dtype, unsafe_labels=config.unsafe_labels)  # type: ignore[arg-type]
    if config.kind == "guard":
        from reward_models.guard import GuardScorer

        return GuardScorer(config.model_path, device=device, dtype=dtype,  # type: ignore[arg-type]
                           unsafe_token=config.unsafe_token, safe_token=config.safe_token)
    if config.url is None:
        raise ValueError("the remote scorer needs a URL")
    from reward_models.remote import RemoteScorer

    return RemoteScorer(config.url, model=config.remote_model, api_key=config.api_key,
                        unsafe_indices=config.unsafe_indices, timeout_s=config.timeout_s, retries=config.retries)
