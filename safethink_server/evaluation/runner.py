"""Drives an OpenAI-compatible server over a suite: bounded concurrency, streaming (for time to first
token), reasoning split out as vLLM does, and this server's `safethink` report when there is one.
A failed request is recorded with its status and message, never raised."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
from pydantic import BaseModel, Field
from tqdm import tqdm

from safethink_server.engines.upstream.errors import UpstreamError
from safethink_server.engines.upstream.stream import sse_events
from safethink_server.evaluation.suites import EvalPrompt, PromptKind
from safethink_server.schema import ReasoningConfig
from safethink_server.steering.text import SectionSplitter


class Arm(BaseModel):
    """One way of serving the suite: a server, and the `safethink` overrides sent with each request."""

    name: str
    base_url: str = Field(description="the API base, as the openai client takes it (ends in /v1)")
    api_key: str | None = None
    overrides: dict[str, Any] | None = Field(default=None, description="sent as the request's `safethink` object")


class GenerationSettings(BaseModel):
    model: str | None = Field(default=None, description="default: the server's first model")
    max_tokens: int = Field(default=256, ge=1)
    temperature: float = Field(default=0.0, ge=0.0)
    seed: int | None = 0
    concurrency: int = Field(default=4, ge=1)
    request_timeout_s: float = Field(default=600.0, gt=0)


class StepTrace(BaseModel):
    index: int
    p_unsafe: float | None = None  # absent where the server hides scores
    action: str


class InterventionTrace(BaseModel):
    step: int
    p_unsafe: float | None = None  # absent where the server hides scores
    prefix: str = ""


class InsertedTrace(BaseModel):
    """One server-inserted text as a server reports it; plain strings, so that a server with other
    kinds of text is still evaluated (the server's own model is `schema.InsertedText`)."""

    kind: str
    section: str
    text: str
    at: int | None = None  # its character offset in its section's text, where the server gives it


class Completion(BaseModel):
    """What one request produced (or how it failed), before judging."""

    prompt_id: str
    set: str
    kind: PromptKind
    arm: str
    wrap: str | None = Field(default=None, description="how the prompt was wrapped; None: as written")
    reasoning: str = ""
    answer: str = ""
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    ttft_s: float | None = None
    duration_s: float | None = None
    steered: bool = Field(default=False, description="the server reported steering (a `safethink` object)")
    steps: list[StepTrace] = []
    interventions: list[InterventionTrace] = []
    inserted: list[InsertedTrace] = Field(default=[], description="the server's own texts in the output, as listed by it")
    error: str | None = None
    error_status: int | None = None

    @property
    def refused(self) -> bool:
        """The server ended the response with its refusal."""
        return self.finish_reason == "content_filter"

    @property
    def tokens_per_s(self) -> float | None:
        """Completion tokens over the whole request. Not decode speed after the first token: a steered
        server holds each watched step back until it is scored, then releases it at once, which would
        make that figure look faster than it is."""
        if not self.completion_tokens or not self.duration_s:
            return None
        return self.completion_tokens / self.duration_s


def split_inline_reasoning(content: str) -> tuple[str, str]:
    """(reasoning, answer) of a server that leaves `<think>...</think>` inside the content."""
    markers = ReasoningConfig()
    if markers.start_marker not in content:
        return "", content
    segments = SectionSplitter(markers.start_marker, markers.end_marker, "pre").feed(content, final=True)
    reasoning = "".join(s.text for s in segments if s.section == "reasoning")
    answer = "".join(s.text for s in segments if s.section != "reasoning")
    return reasoning.strip(), answer.strip()


def _headers(arm: Arm) -> dict[str, str]:
    return {"Authorization": f"Bearer {arm.api_key}"} if arm.api_key else {}


async def first_model(client: httpx.AsyncClient, arm: Arm) -> str:
    response = await client.get(f"{arm.base_url.rstrip('/')}/models", headers=_headers(arm))
    response.raise_for_status()
    return response.json()["data"][0]["id"]


def _error_message(response: httpx.Response, body: bytes) -> str:
    """`error.message` of an OpenAI-style error body, else the start of the body."""
    try:
        error = json.loads(body)["error"]
        return str(error.get("message", error)) if isinstance(error, dict) else str(error)
    except (ValueError, KeyError, TypeError):
        return body.decode("utf-8", "replace")[:200] or response.reason_phrase


async def complete(client: httpx.AsyncClient, arm: Arm, prompt: EvalPrompt, settings: GenerationSettings,
                   model: str) -> Completion:
    result = Completion(prompt_id=prompt.id, set=prompt.set, kind=prompt.kind, arm=arm.name, wrap=prompt.wrap)
    body: dict[str, Any] = {
        "model": model, "messages": prompt.conversation(), "max_tokens": settings.max_tokens,
        "temperature": settings.temperature, "stream": True, "stream_options": {"include_usage": True},
    }
    if settings.seed is not None:
        body["seed"] = settings.seed
    if arm.overrides:
        body["safethink"] = arm.overrides
    reasoning: list[str] = []
    answer: list[str] = []
    started = time.perf_counter()
    try:
        async with client.stream("POST", f"{arm.base_url.rstrip('/')}/chat/completions", json=body,
                                 headers=_headers(arm), timeout=settings.request_timeout_s) as response:
            if response.status_code != 200:
                result.error_status = response.status_code
                result.error = _error_message(response, await response.aread())
                return result
            async for event in sse_events(response.aiter_bytes(), settings.request_timeout_s, settings.request_timeout_s):
                for choice in event.get("choices") or []:
                    delta = choice.get("delta") or {}
                    piece_r = delta.get("reasoning_content") or delta.get("reasoning") or ""
                    piece_a = delta.get("content") or ""
                    if (piece_r or piece_a) and result.ttft_s is None:
                        result.ttft_s = time.perf_counter() - started
                    reasoning.append(piece_r)
                    answer.append(piece_a)
                    if choice.get("finish_reason"):
                        result.finish_reason = choice["finish_reason"]
                if event.get("usage"):
                    result.prompt_tokens = event["usage"].get("prompt_tokens")
                    result.completion_tokens = event["usage"].get("completion_tokens")
                if event.get("safethink"):
                    report = event["safethink"]
                    result.steered = True
                    result.steps = [StepTrace.model_validate(s) for s in report.get("steps", [])]
                    result.interventions = [InterventionTrace.model_validate(i) for i in report.get("interventions", [])]
                    result.inserted = [InsertedTrace.model_validate(i) for i in report.get("inserted", [])]
    except UpstreamError as exc:
        result.error, result.error_status = str(exc), exc.status
    except httpx.HTTPError as exc:
        result.error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    result.duration_s = time.perf_counter() - started
    result.reasoning, result.answer = "".join(reasoning), "".join(answer)
    if not result.reasoning:
        result.reasoning, result.answer = split_inline_reasoning(result.answer)
    return result


async def run_jobs(jobs: list[tuple[Arm, EvalPrompt]], settings: GenerationSettings, progress: bool = True) -> list[Completion]:
    """Every (arm, prompt) job, at most `concurrency` requests in flight in all; results in job order."""
    limits = httpx.Limits(max_connections=settings.concurrency * 2)
    async with httpx.AsyncClient(limits=limits, timeout=settings.request_timeout_s) as client:
        models: dict[str, str | Exception] = {}
        for arm in {arm.base_url: arm for arm, _ in jobs}.values():
            try:
                models[arm.base_url] = settings.model or await first_model(client, arm)
            except (httpx.HTTPError, KeyError, IndexError, ValueError) as exc:
                models[arm.base_url] = exc  # every request of this server is recorded as failed
        gate = asyncio.Semaphore(settings.concurrency)
        bar = tqdm(total=len(jobs), desc="requests", unit="req", disable=not progress)

        async def one(arm: Arm, prompt: EvalPrompt) -> Completion:
            model = models[arm.base_url]
            if isinstance(model, Exception):
                completion = Completion(prompt_id=prompt.id, set=prompt.set, kind=prompt.kind, arm=arm.name, wrap=prompt.wrap,
                                        error=f"could not list the server's models: {type(model).__name__}: {model}")
            else:
                async with gate:
                    completion = await complete(client, arm, prompt, settings, model)
            bar.update()
            if completion.error:
                bar.set_postfix_str(f"last error: {completion.error[:60]}")
            return completion

        try:
            return list(await asyncio.gather(*(one(arm, p) for arm, p in jobs)))
        finally:
            bar.close()


async def run_arms(arms: list[Arm], prompts: list[EvalPrompt], settings: GenerationSettings,
                   progress: bool = True) -> list[Completion]:
    """Every prompt through every arm. Arms are interleaved prompt by prompt so that load drifts on a
    shared machine hit them alike."""
    return await run_jobs([(arm, p) for p in prompts for arm in arms], settings, progress)
