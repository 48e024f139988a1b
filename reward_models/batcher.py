"""Micro-batching: merge steps from concurrent callers into one scorer forward pass, the steps that
hold up a response's first byte first."""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from reward_models.base import Scorer, StepItem, StepScore

logger = logging.getLogger(__name__)

LATER_STEP_DELAY_MS = 200.0  # how long first steps may hold a later step back (the ageing bound)

BatchObserver = Callable[[int, float, BaseException | None], None]
"""Called after each forward with (batch size, seconds, error or None); metrics hook in here."""


@dataclass(order=True)
class _Pending:
    rank: float  # when it is served: its arrival, later for a step whose response already sent text
    order: int  # arrival order among equal ranks
    items: list[StepItem] = field(compare=False)
    future: asyncio.Future[list[StepScore]] = field(compare=False)
    arrived: float = field(compare=False)


class MicroBatcher:
    """Collects requests for up to `max_wait_ms` (or until `max_batch_size` items are waiting),
    then scores them in one `ascore_batch` call and hands each caller its own slice back.

    While a forward runs, new requests queue up and form the next batch, so under load batches fill
    without waiting. A caller's request is never split across two forwards.

    Order: a first step (its response has sent nothing yet: the client waits for its first byte) goes
    before later steps, whose clients already read text; among equals the oldest goes first. A later
    step is ranked as if it had arrived `later_step_delay_ms` after it did, so it waits for first
    steps for at most that long plus the scoring of those ranked before it: none waits forever.
    Batches are formed in that order (the embedder then groups texts of like length into forwards).

    `prefetch` hands over an item whose step is still being written, for the scorer to prepare what
    does not depend on the step (`Scorer.warm_batch`): that runs only while no scoring is waiting,
    a few items at a time, so that a step that comes meanwhile waits for little.

    Each score comes back with the time its step waited before its forward (`queue_ms`) and the
    forward's time (`forward_ms`).
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
        later_step_delay_ms: float = LATER_STEP_DELAY_MS,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        self.scorer = scorer
        self.max_batch_size = max_batch_size
        self.max_wait_s = max(0.0, max_wait_ms) / 1000.0
        self.observer = observer
        self.warm_observer = warm_observer  # seconds of each warming forward
        self.later_step_delay_s = max(0.0, later_step_delay_ms) / 1000.0
        self._waiting: list[_Pending] = []  # a heap, by rank
        self._in_flight: list[_Pending] = []  # the batch in its forward
        self._arrivals = itertools.count()
        self._wakeup: asyncio.Event | None = None  # set when a step or an item to warm comes
        self._worker: asyncio.Task[None] | None = None
        self._to_warm: list[tuple[StepItem, int]] = []  # newest last, with the warming calls it has had
        self._closed = False

    async def score(self, items: Sequence[StepItem], first: bool = False) -> list[StepScore]:
        """Scores of `items`; `first`: a first step, whose response has sent nothing yet."""
        if not items:
            return []
        if self._closed:
            raise RuntimeError("the scorer's micro-batcher is closed")
        self._ensure_worker()
        assert self._wakeup is not None
        future: asyncio.Future[list[StepScore]] = asyncio.get_running_loop().create_future()
        now = time.monotonic()
        rank = now if first else now + self.later_step_delay_s
        heapq.heappush(self._waiting, _Pending(rank, next(self._arrivals), list(items), future, now))
        self._wakeup.set()
        return await future

    async def score_one(self, item: StepItem, first: bool = False) -> StepScore:
        return (await self.score([item], first))[0]

    def prefetch(self, item: StepItem) -> None:
        """Warm the scorer for `item` when it has time (nothing if the scorer does not warm)."""
        if not self.scorer.warms or self._closed:
            return
        self._ensure_worker()
        assert self._wakeup is not None
        self._to_warm = [*self._to_warm[-(self.WARM_BACKLOG - 1) :], (item, 0)]
        self._wakeup.set()  # the worker may be waiting for a step

    def _ensure_worker(self) -> None:
        if self._worker is None or self._worker.done():
            if self._worker is not None:
                _retrieve(self._worker)
            self._wakeup = asyncio.Event()
            self._worker = asyncio.create_task(self._run(), name="scorer-micro-batcher")

    def _waiting_items(self) -> int:
        return sum(len(p.items) for p in self._waiting if not p.future.done())

    def _next_live(self) -> _Pending | None:
        """The best-ranked waiting caller still waiting (callers that gave up are dropped)."""
        while self._waiting and self._waiting[0].future.done():
            heapq.heappop(self._waiting)
        return self._waiting[0] if self._waiting else None

    async def _run(self) -> None:
        try:
            await self._serve()
        except asyncio.CancelledError:  # closing: `aclose` fails what waits
            raise
        except BaseException as exc:  # the worker goes down with it: whoever waits hears now, not at their timeout
            logger.error("the scorer's micro-batcher stopped", exc_info=exc)
            self._fail_pending(RuntimeError(f"the scorer was interrupted ({type(exc).__name__})"))
            raise

    async def _serve(self) -> None:
        assert self._wakeup is not None
        wakeup = self._wakeup
        while True:
            if self._next_live() is None:
                if self._to_warm:
                    entries, self._to_warm = self._to_warm[-self.WARM_BATCH :], self._to_warm[: -self.WARM_BATCH]
                    await self._warm(entries)
                    continue
                wakeup.clear()
                await wakeup.wait()
                continue
            deadline = time.monotonic() + self.max_wait_s  # a short wait for more steps to join the batch
            while self._waiting_items() < self.max_batch_size and (timeout := deadline - time.monotonic()) > 0:
                wakeup.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timeout):  # not wait_for, which can swallow a cancellation (3.11)
                        await wakeup.wait()
            if self._next_live() is None:  # every caller gave up while the batch filled
                continue
            batch = [heapq.heappop(self._waiting)]  # one caller's items are never split, however many
            size = len(batch[0].items)
            while (nxt := self._next_live()) is not None and size + len(nxt.items) <= self.max_batch_size:
                batch.append(heapq.heappop(self._waiting))
                size += len(nxt.items)
            self._in_flight = batch
            await self._forward(batch)
            self._in_flight = []

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
        began = time.monotonic()
        started = time.perf_counter()
        error: BaseException | None = None
        try:
            scores = await self.scorer.ascore_batch(flat)
            if len(scores) != len(flat):
                raise RuntimeError(f"scorer returned {len(scores)} scores for {len(flat)} items")
        except Exception as exc:  # every caller of this batch gets the failure
            error = exc
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # counted, then the worker goes down with it (`_run`)
            self._observe(self.observer, len(flat), time.perf_counter() - started, exc)
            raise
        forward_s = time.perf_counter() - started
        self._observe(self.observer, len(flat), forward_s, error)
        offset = 0
        for p in live:
            if p.future.done():
                offset += len(p.items)
                continue
            if error is not None:
                p.future.set_exception(error)
            else:
                timing = {"queue_ms": round((began - p.arrived) * 1000, 3), "forward_ms": round(forward_s * 1000, 3)}
                p.future.set_result([score.model_copy(update=timing) for score in scores[offset : offset + len(p.items)]])
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
        """Stop the worker and fail whatever waits; later calls to `score` fail at once."""
        self._closed = True
        self._to_warm = []
        worker, self._worker = self._worker, None
        if worker is not None:
            worker.cancel()
            await asyncio.wait({worker})
            _retrieve(worker)
        self._fail_pending(RuntimeError("the scorer's micro-batcher is closed"))

    def _fail_pending(self, error: Exception) -> None:
        """Fail every caller waiting or in a forward: nobody will score them now."""
        for pending in [*self._in_flight, *self._waiting]:
            if not pending.future.done():
                pending.future.set_exception(error)
        self._in_flight, self._waiting = [], []


def _retrieve(worker: asyncio.Task[None]) -> None:
    """Take a finished worker's exception (`_run` logged it and failed its callers when it stopped)."""
    if not worker.cancelled():
        worker.exception()

