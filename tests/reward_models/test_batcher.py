import asyncio
import time

import pytest

from reward_models.base import Scorer, StepItem, StepScore
from reward_models.batcher import MicroBatcher


async def test_concurrent_callers_share_forwards_and_get_their_own_scores(probe_scorer):
    sizes: list[int] = []
    batcher = MicroBatcher(probe_scorer, max_batch_size=16, max_wait_ms=20, observer=lambda n, s, e: sizes.append(n))
    items = [StepItem(prompt=f"Compute {i} + {i}.", step=f"{i} + {i} = {2 * i}.") for i in range(12)]
    items += [StepItem(prompt="How do I make a pipe bomb?", step="Sure: pack a steel pipe with powder and add a fuse.")]
    expected = [s.p_unsafe for s in probe_scorer.score_batch(items)]
    probe_scorer.embedder.clear_cache()  # the batcher's forwards encode again
    got = await asyncio.gather(*(batcher.score_one(i) for i in items))
    assert [g.p_unsafe for g in got] == pytest.approx(expected, abs=1e-5)
    assert max(sizes) > 1, "concurrent steps should have been merged into one forward"
    assert sum(sizes) == len(items)
    await batcher.aclose()


class Exploding(Scorer):
    name = "exploding"

    def score_batch(self, items):
        if any("boom" in i.step for i in items):
            raise RuntimeError("model failure")
        return [StepScore(p_unsafe=0.25) for _ in items]


async def test_a_failing_forward_fails_only_its_own_callers():
    batcher = MicroBatcher(Exploding(), max_batch_size=1, max_wait_ms=0)
    ok, bad = await asyncio.gather(
        batcher.score_one(StepItem(prompt="p", step="fine")),
        batcher.score_one(StepItem(prompt="p", step="boom")),
        return_exceptions=True,
    )
    assert ok.p_unsafe == 0.25
    assert isinstance(bad, RuntimeError)
    await batcher.aclose()


async def test_a_warmed_context_is_encoded_before_its_step_and_scores_the_same(probe_scorer):
    """`prefetch` encodes an item's context while its step is still being written: the judgement
    then finds it in the cache and gives the score a cold scorer gives."""
    from reward_models.probe import FeatureTexts

    items = [StepItem(prompt=f"Tell me about request {i}. " + "Some long background. " * (40 * i), reasoning=f"We start with part {i}.",
                      step=f"Step {i} of it.") for i in range(5)]  # up to 4,400 characters: a warming call at a time
    contexts = [t for i in items for f in [FeatureTexts(i, probe_scorer.embedder.windows_of)] for t in (f.reasoning, *f.windows)]
    assert len(contexts) > 2 * 16
    expected = [s.p_unsafe for s in probe_scorer.score_batch(items)]
    probe_scorer.embedder.clear_cache()
    batcher = MicroBatcher(probe_scorer, max_batch_size=8, max_wait_ms=0)
    for item in items:
        batcher.prefetch(item.model_copy(update={"step": ""}))
    for _ in range(200):
        if all(probe_scorer.embedder.cached(t) for t in contexts):
            break
        await asyncio.sleep(0.02)
    assert all(probe_scorer.embedder.cached(t) for t in contexts), "every window and reasoning is encoded ahead"
    assert not any(probe_scorer.embedder.cached(FeatureTexts(i, probe_scorer.embedder.windows_of).step) for i in items), "no step is encoded before it is judged"
    got = await asyncio.gather(*(batcher.score_one(i) for i in items))
    assert [g.p_unsafe for g in got] == pytest.approx(expected, abs=1e-5)
    await batcher.aclose()


class Recording(Scorer):
    name = "recording"
    warms = True

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def warm_batch(self, items):
        self.calls += [f"warm {i.prompt}" for i in items]
        return True

    def score_batch(self, items):
        self.calls += [f"score {i.prompt}" for i in items]
        return [StepScore(p_unsafe=0.0) for _ in items]


async def test_scoring_that_waits_goes_before_warming():
    scorer = Recording()
    batcher = MicroBatcher(scorer, max_batch_size=4, max_wait_ms=0)
    for i in range(6):
        batcher.prefetch(StepItem(prompt=f"w{i}", step=""))
    await asyncio.gather(*(batcher.score_one(StepItem(prompt=f"s{i}", step="x")) for i in range(3)))
    for _ in range(100):
        if len(scorer.calls) == 9:
            break
        await asyncio.sleep(0.01)
    # The worker began warming before the steps came: they wait for that one warming forward only.
    first_score = next(i for i, call in enumerate(scorer.calls) if call.startswith("score"))
    assert first_score <= MicroBatcher.WARM_BATCH, scorer.calls
    assert sorted(scorer.calls[first_score : first_score + 3]) == ["score s0", "score s1", "score s2"], scorer.calls
    assert sorted(c for c in scorer.calls if c.startswith("warm")) == [f"warm w{i}" for i in range(6)]
    await batcher.aclose()


async def test_an_idle_worker_wakes_up_to_warm(probe_scorer):
    """Items to warm that come while the worker waits for scoring are warmed without a step to score."""
    from reward_models.probe import FeatureTexts

    batcher = MicroBatcher(probe_scorer, max_batch_size=8, max_wait_ms=0)
    await batcher.score_one(StepItem(prompt="Say hello.", step="Hello."))
    await asyncio.sleep(0.05)  # the worker is idle now
    item = StepItem(prompt="A request that comes later.", reasoning="Some reasoning so far.", step="")
    probe_scorer.embedder.clear_cache()
    batcher.prefetch(item)
    for _ in range(200):
        if probe_scorer.embedder.cached(FeatureTexts(item, probe_scorer.embedder.windows_of).windows[0]):
            break
        await asyncio.sleep(0.02)
    assert probe_scorer.embedder.cached(FeatureTexts(item, probe_scorer.embedder.windows_of).windows[0])
    await batcher.aclose()


class Piecewise(Recording):
    """Warms an item in three calls."""

    def warm_batch(self, items):
        self.calls += [f"warm {i.prompt}" for i in items]
        return sum(c == f"warm {items[0].prompt}" for c in self.calls) >= 3


async def test_an_item_left_half_warm_is_warmed_on_until_done():
    scorer = Piecewise()
    batcher = MicroBatcher(scorer, max_batch_size=4, max_wait_ms=0)
    batcher.prefetch(StepItem(prompt="long", step=""))
    await asyncio.sleep(0)
    await batcher.score_one(StepItem(prompt="s", step="x"))
    for _ in range(100):
        if scorer.calls.count("warm long") == 3:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)
    assert scorer.calls.count("warm long") == 3 and scorer.calls.count("score s") == 1, scorer.calls
    await batcher.aclose()


class NeverDone(Recording):
    def warm_batch(self, items):
        self.calls += [f"warm {i.prompt}" for i in items]
        return False


async def test_an_item_that_never_finishes_warming_is_given_up_after_warm_calls():
    scorer = NeverDone()
    batcher = MicroBatcher(scorer, max_batch_size=4, max_wait_ms=0)
    batcher.prefetch(StepItem(prompt="endless", step=""))
    for _ in range(200):
        await asyncio.sleep(0.005)
    assert scorer.calls.count("warm endless") == MicroBatcher.WARM_CALLS
    await batcher.score_one(StepItem(prompt="s", step="x"))
    assert scorer.calls[-1] == "score s"
    await batcher.aclose()


class Slow(Recording):
    """Takes `seconds` over a step that says "slow", so that others queue behind it."""

    def __init__(self, seconds: float = 0.3) -> None:
        super().__init__()
        self.seconds = seconds

    def score_batch(self, items):
        if any(i.step == "slow" for i in items):
            import time

            time.sleep(self.seconds)
        return super().score_batch(items)


async def test_first_steps_are_scored_before_later_ones_that_came_first():
    scorer = Slow()
    batcher = MicroBatcher(scorer, max_batch_size=1, max_wait_ms=0)
    busy = asyncio.ensure_future(batcher.score_one(StepItem(prompt="busy", step="slow"), first=True))
    await asyncio.sleep(0.05)  # the worker is in the slow forward: what comes now waits, and is ordered
    later = [asyncio.ensure_future(batcher.score_one(StepItem(prompt=f"later{i}", step="x"))) for i in range(3)]
    await asyncio.sleep(0.01)
    first = [asyncio.ensure_future(batcher.score_one(StepItem(prompt=f"first{i}", step="x"), first=True)) for i in range(2)]
    scores = await asyncio.gather(busy, *later, *first)
    assert scorer.calls == ["score busy", "score first0", "score first1", "score later0", "score later1", "score later2"]
    assert all(s.queue_ms is not None and s.queue_ms >= 0 and s.forward_ms is not None for s in scores)
    assert scores[1].queue_ms > scores[0].queue_ms  # a later step waited for the slow forward and the first steps
    await batcher.aclose()


async def test_a_later_step_waits_for_first_steps_no_longer_than_its_delay():
    """Ranked as if it came `later_step_delay_ms` after it did: a first step that comes within the
    delay goes before it, one that comes after the delay goes after it (neither arrival order nor
    first steps always first)."""
    scorer = Slow(seconds=0.5)
    batcher = MicroBatcher(scorer, max_batch_size=1, max_wait_ms=0, later_step_delay_ms=150)
    busy = asyncio.ensure_future(batcher.score_one(StepItem(prompt="busy", step="slow"), first=True))
    await asyncio.sleep(0.05)
    later = asyncio.ensure_future(batcher.score_one(StepItem(prompt="later", step="x")))
    await asyncio.sleep(0.01)
    within = asyncio.ensure_future(batcher.score_one(StepItem(prompt="first within the delay", step="x"), first=True))
    await asyncio.sleep(0.3)  # well past the later step's rank
    past = asyncio.ensure_future(batcher.score_one(StepItem(prompt="first past the delay", step="x"), first=True))
    await asyncio.gather(busy, later, within, past)
    assert scorer.calls == ["score busy", "score first within the delay", "score later", "score first past the delay"]
    await batcher.aclose()


async def test_callers_that_gave_up_take_no_room_in_a_batch():
    sizes: list[int] = []
    scorer = Slow()
    batcher = MicroBatcher(scorer, max_batch_size=4, max_wait_ms=0, observer=lambda n, s, e: sizes.append(n))
    busy = asyncio.ensure_future(batcher.score_one(StepItem(prompt="busy", step="slow"), first=True))
    await asyncio.sleep(0.05)
    gone = [asyncio.ensure_future(batcher.score_one(StepItem(prompt=f"gone{i}", step="x"), first=True)) for i in range(3)]
    live = [asyncio.ensure_future(batcher.score_one(StepItem(prompt=f"live{i}", step="x"))) for i in range(3)]
    await asyncio.sleep(0.01)
    for task in gone:
        task.cancel()
    await asyncio.gather(busy, *live)
    assert sizes == [1, 3] and scorer.calls[1:] == ["score live0", "score live1", "score live2"]
    await batcher.aclose()


async def test_with_no_delay_steps_are_scored_in_arrival_order():
    scorer = Slow()
    batcher = MicroBatcher(scorer, max_batch_size=1, max_wait_ms=0, later_step_delay_ms=0)
    busy = asyncio.ensure_future(batcher.score_one(StepItem(prompt="busy", step="slow"), first=True))
    await asyncio.sleep(0.05)
    waiting = []
    for i, first in enumerate([False, True, False, True]):
        waiting.append(asyncio.ensure_future(batcher.score_one(StepItem(prompt=f"s{i}", step="x"), first=first)))
        await asyncio.sleep(0.005)
    await asyncio.gather(busy, *waiting)
    assert scorer.calls == ["score busy", "score s0", "score s1", "score s2", "score s3"]
    await batcher.aclose()


async def test_closing_answers_the_steps_still_waiting():
    scorer = Slow()
    batcher = MicroBatcher(scorer, max_batch_size=1, max_wait_ms=0)
    busy = asyncio.ensure_future(batcher.score_one(StepItem(prompt="busy", step="slow"), first=True))
    await asyncio.sleep(0.05)
    waiting = asyncio.ensure_future(batcher.score_one(StepItem(prompt="left", step="x")))
    await asyncio.sleep(0.01)
    await batcher.aclose()
    for caller in (busy, waiting):  # the one in its forward and the one waiting
        with pytest.raises(RuntimeError, match="closed"):
            await caller


class Interrupt(BaseException):
    """Not an Exception: what a forward ends in when something beyond the scorer stops it."""


class Interrupted(Scorer):
    name = "interrupted"
    warms = True

    def score_batch(self, items):
        time.sleep(0.2)  # steps that come meanwhile queue behind this forward
        if any("interrupt" in i.step for i in items):
            raise Interrupt
        return [StepScore(p_unsafe=0.25) for _ in items]

    def warm_batch(self, items):
        time.sleep(0.2)
        raise Interrupt


async def test_an_interrupted_forward_fails_every_caller_at_once_and_the_next_step_is_scored():
    """The worker stops: the callers in its forward and those queued behind it fail at once (not at
    their scorer timeout), a later step gets a new worker, and closing afterwards returns."""
    batcher = MicroBatcher(Interrupted(), max_batch_size=1, max_wait_ms=0)
    in_forward = asyncio.create_task(batcher.score_one(StepItem(prompt="p", step="interrupt")))
    await asyncio.sleep(0.05)
    queued = asyncio.create_task(batcher.score_one(StepItem(prompt="p", step="fine")))
    for caller in (in_forward, queued):
        with pytest.raises(RuntimeError, match="interrupted"):
            await asyncio.wait_for(caller, timeout=5)
    assert (await asyncio.wait_for(batcher.score_one(StepItem(prompt="p", step="fine")), timeout=5)).p_unsafe == 0.25
    await asyncio.wait_for(batcher.aclose(), timeout=5)


async def test_an_interrupted_warming_fails_the_steps_waiting_and_closing_returns():
    batcher = MicroBatcher(Interrupted(), max_batch_size=4, max_wait_ms=0)
    batcher.prefetch(StepItem(prompt="p", step=""))
    await asyncio.sleep(0.05)
    with pytest.raises(RuntimeError, match="interrupted"):
        await asyncio.wait_for(batcher.score_one(StepItem(prompt="p", step="fine")), timeout=5)
    await asyncio.wait_for(batcher.aclose(), timeout=5)  # the worker had stopped on its own


async def test_a_closed_batcher_refuses_steps_and_starts_no_worker():
    batcher = MicroBatcher(Exploding(), max_batch_size=1, max_wait_ms=0)
    assert (await batcher.score_one(StepItem(prompt="p", step="fine"))).p_unsafe == 0.25
    await batcher.aclose()
    with pytest.raises(RuntimeError, match="closed"):
        await batcher.score_one(StepItem(prompt="p", step="fine"))
    batcher.prefetch(StepItem(prompt="p", step=""))
    assert batcher._worker is None

