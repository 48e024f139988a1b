"""`remote`: a classifier served by vLLM (`vllm serve MODEL --task classify`), over HTTP.

Uses vLLM's `/classify` endpoint: `{"model", "input": [texts]}` in, `{"data": [{"index", "probs"}]}`
out. Lets the scorer scale out on its own GPUs. Timeouts, retries with exponential backoff on
connection errors, 429 and 5xx, and errors that say what went wrong.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import httpx
from pydantic import BaseModel, ValidationError

from reward_models.base import Scorer, ScorerError, StepItem, StepScore
from reward_models.text import DEFAULT_TEMPLATE, render_item

_RETRYABLE_STATUS = {408, 429, 500, 502, 503, 504}


class ClassifyResult(BaseModel):
    index: int
    probs: list[float]
    label: str | None = None


class ClassifyResponse(BaseModel):
    data: list[ClassifyResult]


class _Retryable(Exception):
    pass


class RemoteScorer(Scorer):
    name = "remote"

    def __init__(
        self,
        url: str,
        model: str | None = None,
        api_key: str | None = None,
        unsafe_indices: Sequence[int] = (1,),
        template: str = DEFAULT_TEMPLATE,
        timeout_s: float = 10.0,
        retries: int = 2,
        backoff_s: float = 0.2,
    ) -> None:
        super().__init__()
        self.endpoint = url.rstrip("/") + "/classify"
        self.model = model
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.unsafe_indices = list(unsafe_indices)
        self.template = template
        self.timeout = httpx.Timeout(timeout_s)
        self.retries = retries
        self.backoff_s = backoff_s
        self._async_client: httpx.AsyncClient | None = None

    def _payload(self, items: Sequence[StepItem]) -> dict[str, object]:
        payload: dict[str, object] = {"input": [render_item(i, self.template) for i in items]}
        if self.model:
            payload["model"] = self.model
        return payload

    def _parse(self, response: httpx.Response, n: int) -> list[StepScore]:
        if response.status_code in _RETRYABLE_STATUS:
            raise _Retryable(f"{self.endpoint} answered {response.status_code}: {response.text[:200]}")
        if response.status_code != 200:
            raise ScorerError(f"{self.endpoint} answered {response.status_code}: {response.text[:200]}")
        try:
            parsed = ClassifyResponse.model_validate_json(response.content)
        except ValidationError as exc:
            raise ScorerError(f"{self.endpoint} sent a response that is not a classify result: {exc.errors()[0]['msg']}") from exc
        rows = sorted(parsed.data, key=lambda r: r.index)
        if len(rows) != n:
            raise ScorerError(f"{self.endpoint} returned {len(rows)} results for {n} inputs")
        out = []
        for row in rows:
            if max(self.unsafe_indices) >= len(row.probs):
                raise ScorerError(f"unsafe class index {max(self.unsafe_indices)} is out of range for {len(row.probs)} classes")
            out.append(StepScore(p_unsafe=min(1.0, max(0.0, sum(row.probs[i] for i in self.unsafe_indices)))))
        return out

    def _delay(self, attempt: int) -> float:
        return self.backoff_s * (2**attempt)

    def score_batch(self, items: Sequence[StepItem]) -> list[StepScore]:
        if not items:
            return []
        last: Exception | None = None
        with httpx.Client(timeout=self.timeout, headers=self.headers) as client:
            for attempt in range(self.retries + 1):
                try:
                    return self._parse(client.post(self.endpoint, json=self._payload(items)), len(items))
                except (httpx.TransportError, _Retryable) as exc:
                    last = exc
                    if attempt < self.retries:
                        time.sleep(self._delay(attempt))
        raise ScorerError(f"remote scorer failed after {self.retries + 1} attempts: {last}")

    async def ascore_batch(self, items: Sequence[StepItem]) -> list[StepScore]:
        if not items:
            return []
        if self._async_client is None:
            self._async_client = httpx.AsyncClient(timeout=self.timeout, headers=self.headers)
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            try:
                response = await self._async_client.post(self.endpoint, json=self._payload(items))
                return self._parse(response, len(items))
            except (httpx.TransportError, _Retryable) as exc:
                last = exc
                if attempt < self.retries:
                    await asyncio.sleep(self._delay(attempt))
        raise ScorerError(f"remote scorer failed after {self.retries + 1} attempts: {last}")

    async def aclose(self) -> None:
        if self._async_client is not None:
            await self._async_client.aclose()
            self._async_client = None
