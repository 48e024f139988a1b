"""Assemble the app from settings: engine, scorer, routes."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from fastapi import FastAPI

from reward_models.registry import build_scorer
from safethink_server.api.app import create_app
from safethink_server.config import ServerSettings
from safethink_server.engines.base import Engine
from safethink_server.memory import bound_native_memory

logger = logging.getLogger(__name__)

SETTINGS_ENV = "SAFETHINK_WORKER_SETTINGS"  # `serve --workers N`: the file with the settings, as JSON, for each worker


def build_engine(settings: ServerSettings) -> Engine:
    if settings.engine == "upstream":
        from safethink_server.engines.upstream.engine import UpstreamEngine

        return UpstreamEngine(settings.upstream_config(), settings.served_model_name, max_queued_requests=settings.max_queued_requests)
    from safethink_server.engines.model_store import EMBEDDED_MODEL_NAME, embedded_model_dir

    path = settings.model or embedded_model_dir()
    name = settings.served_model_name or (EMBEDDED_MODEL_NAME if settings.model is None else path.name)
    if settings.engine == "vllm":
        from safethink_server.engines.vllm import VLLMEngine

        return VLLMEngine(path, name, settings.vllm_engine_args(), max_queued_requests=settings.max_queued_requests,
                          tool_call_parser=settings.tool_call_parser if settings.enable_auto_tool_choice else None)
    from safethink_server.engines.hf import HFEngine

    return HFEngine(path, name, dtype="bfloat16" if settings.dtype == "auto" else settings.dtype,
                    max_concurrent_sequences=settings.max_concurrent_sequences or 1,
                    max_queued_requests=settings.max_queued_requests)


def build_app(settings: ServerSettings) -> FastAPI:
    bound_native_memory()
    engine = build_engine(settings)
    scorer = build_scorer(settings.scorer_config())
    logger.info("serving %s with engine %s and scorer %s", engine.model_name, engine.name, scorer.name)
    return create_app(settings, engine, scorer)


def app_from_environment() -> FastAPI:
    """The app of one worker process of `serve --workers N`; the workers split the cores between
    their scorers' forwards."""
    import torch

    settings = ServerSettings.model_validate_json(Path(os.environ[SETTINGS_ENV]).read_text())
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // settings.workers))
    return build_app(settings)
