"""Micro-batching: merge steps from concurrent callers into one scorer forward pass."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from reward_models.base import Scorer, StepItem, StepScore

logger = logging.getLogger(__name__)

BatchObserver = Callable[[int, float, BaseException | None], None]
"""Called after each forward with (batch size, seconds, error or None); metrics hook in here."""


@dataclass
class _Pending:
    items: list[StepItem]
    future: asyncio.Future[list[StepScore]]


class MicroBatcher:
    """Collects requests for up to `max_wait_ms` (or until `max_batch_size` items are waiting),
    then scores them in one `ascore_batch` call and hands each caller its own slice back.

    While a forward runs, new requests queue up and form the next batch, so under load batches fill
    without waiting. A caller's request is never split across two forwards.

    `prefetch` hands over an item whose step is still being written, for the scorer to prepare what
    does not depend on the step (`Scorer.warm_batch`): that runs only while no scoring is waiting,
    a few items at a time, so that a step that comes meanwhile waits for little.
    """

    WARM_BATCH = 1  # items per warming call (each does a bounded amount): what a step arriving meanwhile may wait for
    WARM_BACKLOG = 64  # items kept to warm; older ones are dropped (their steps may be judged already)
    WARM_CALLS = 64  # most warming calls for one item (each does a bounded amount): a long one gives up

    def __init__(
        self,
        scorer: Scorer,
        max_batch_size: int = 32,
        max_wait_ms: float = 2.0,
        observer: BatchObserver | None = None,
        warm_observer: Callable[[float], None] | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        self.scorer = scorer
        self.max_batch_size = max_batch_size
        self.max_wait_s = max(0.0, max_wait_ms) / 1000.0
        self.observer = observer
        self.warm_observer = warm_observer  # seconds of each warming forward
        self._queue: asyncio.Queue[_Pending | None] | None = None  # None: a wake-up for items to warm
        self._worker: asyncio.Task[None] | None = None
        self._to_warm: list[tuple[StepItem, int]] = []  # newest last, with the warming calls it has had

    async def score(self, items: Sequence[StepItem]) -> list[StepScore]:
        if not items:
            return []
        self._ensure_worker()
        assert self._queue is not None
        future: asyncio.Future[list[StepScore]] = asyncio.get_running_loop().create_future()
        await self._queue.put(_Pending(list(items), future))
        return await future

    async def score_one(self, item: StepItem) -> StepScore:
        return (await self.score([item]))[0]

    def prefetch(self, item: StepItem) -> None:
        """Warm the scorer for `item` when it has time (nothing if the scorer does not warm)."""
        if not self.scorer.warms:
            return
        self._ensure_worker()
        assert self._queue is not None
        if not self._to_warm:  # the worker may be waiting for a step: wake it (it skips the marker)
            self._queue.put_nowait(None)
        self._to_warm = [*self._to_warm[-(self.WARM_BACKLOG - 1) :], (item, 0)]

    def _ensure_worker(self) -> None:
        if self._worker is None or self._worker.done():
            self._queue = asyncio.Queue()
            self._worker = asyncio.create_task(self._run(), name="scorer-micro-batcher")

    async def _run(self) -> None:
        assert self._queue is not None
        queue = self._queue
        carry: _Pending | None = None
        while True:
            if carry is None and queue.empty() and self._to_warm:
                entries, self._to_warm = self._to_warm[-self.WARM_BATCH :], self._to_warm[: -self.WARM_BATCH]
                await self._warm(entries)
                continue
            first = carry or await queue.get()
            if first is None:
                continue
            carry = None
            batch = [first]
            size = len(first.items)
            deadline = time.monotonic() + self.max_wait_s
            while size < self.max_batch_size:
                timeout = deadline - time.monotonic()
                try:
                    nxt = queue.get_nowait() if timeout <= 0 else await asyncio.wait_for(queue.get(), timeout)
                except (asyncio.QueueEmpty, TimeoutError):
                    break
                if nxt is None:
                    continue
                if size + len(nxt.items) > self.max_batch_size:
                    carry = nxt
                    break
                batch.append(nxt)
                size += len(nxt.items)
            await self._forward(batch)

    async def _warm(self, entries: list[tuple[StepItem, int]]) -> None:
        started = time.perf_counter()
        try:
            if await self.scorer.awarm_batch([item for item, _ in entries]) is False:
                # not done: warmed on after the items waiting now, so that one long conversation does not
                # take all the warming
                again = [(item, calls + 1) for item, calls in entries if calls + 1 < self.WARM_CALLS]
                self._to_warm = [*again, *self._to_warm][-self.WARM_BACKLOG :]
        except Exception:  # warming is an optimisation: the judgement encodes what is missing
            logger.debug("warming the scorer failed", exc_info=True)
        self._observe(self.warm_observer, time.perf_counter() - started)

    async def _forward(self, batch: list[_Pending]) -> None:
        live = [p for p in batch if not p.future.done()]  # cancelled callers are dropped
        if not live:
            return
        flat = [item for p in live for item in p.items]
        started = time.perf_counter()
        error: BaseException | None = None
        try:
            scores = await self.scorer.ascore_batch(flat)
            if len(scores) != len(flat):
                raise RuntimeError(f"scorer returned {len(scores)} scores for {len(flat)} items")
        except Exception as exc:  # every caller of this batch gets the failure
            error = exc
        self._observe(self.observer, len(flat), time.perf_counter() - started, error)
        offset = 0
        for p in live:
            if p.future.done():
                offset += len(p.items)
                continue
            if error is not None:
                p.future.set_exception(error)
            else:
                p.future.set_result(scores[offset : offset + len(p.items)])
            offset += len(p.items)

    @staticmethod
    def _observe(observer: Callable[..., None] | None, *args: object) -> None:
        """A metrics hook, which must not take the worker down with it (its callers would wait forever)."""
        if observer is None:
            return
        try:
            observer(*args)
        except Exception:
            logger.exception("a scorer metrics hook failed")

    async def aclose(self) -> None:
        self._to_warm = []
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None
