"""The hf engine when a forward cannot be allocated, in a process of its own with its address space
capped."""

from __future__ import annotations

import asyncio
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from safethink_server.engines.base import EngineError, SamplingParams
from safethink_server.engines.hf import HFEngine
from safethink_server.prompt import RenderedPrompt
from tests.support.hf_engine import CONVERSATION, greedy

pytestmark = pytest.mark.e2e  # a model in a process of its own: `make test` runs it, `make test-fast` does not


def test_forwards_that_run_out_of_memory_kill_the_engine_and_others_do_not(embedded_model_dir):
    """A real allocation failure: the address space is capped a little above what the loaded engine
    uses, so a long prompt's forward cannot be allocated. One request failing so is not fatal; three
    in a row with nothing succeeding between them kill the engine (its /health answers dead). In a
    process of its own: in this one, memory freed by earlier tests would serve the forward."""
    script = f"import sys; from tests.e2e.test_engine_memory import out_of_memory_scenario; out_of_memory_scenario({str(embedded_model_dir)!r})"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[2])
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "alive after one; dead after three: 3 forwards in a row ran out of memory"


def out_of_memory_scenario(model_dir: str) -> None:
    engine = HFEngine(model_dir, "smol", dtype="float32")
    long_prompt = list(range(100, 1900))

    async def fail_once() -> None:
        with pytest.raises(EngineError):
            gen = await engine.start(RenderedPrompt(long_prompt, "reasoning"), SamplingParams(max_tokens=1), CONVERSATION)
            try:
                await gen.next_tokens()
            finally:
                await gen.abort()

    async def scenario() -> str:
        warm, _ = await greedy(engine, [1, 2, 3], 1)  # the worker thread and its allocator arenas exist before the cap
        await warm.abort()
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        used = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
        resource.setrlimit(resource.RLIMIT_AS, (used + (40 << 20), hard))
        try:
            await fail_once()
            after_one = engine.dead_reason()
            await fail_once()
            await fail_once()
        finally:
            resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        return f"{'alive' if after_one is None else 'dead'} after one; dead after three: {engine.dead_reason()}"

    try:
        print(asyncio.run(scenario()))
    finally:
        asyncio.run(engine.close())
