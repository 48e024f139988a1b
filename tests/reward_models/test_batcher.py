import asyncio

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
