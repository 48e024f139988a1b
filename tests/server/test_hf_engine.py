"""KV-cache steering is exact: rollback + inject continues as a fresh run over the same ids."""

import asyncio
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from safethink_server.engines.base import EngineError, SamplingParams
from safethink_server.engines.hf import HFEngine
from safethink_server.prompt import Conversation, PromptError, RenderedPrompt
from safethink_server.schema import TokenizeOptions

CONVERSATION = Conversation([{"role": "user", "content": "x"}])


@pytest.fixture(scope="module")
def engine(embedded_model_dir):
    return HFEngine(embedded_model_dir, "smol", dtype="float32")


async def greedy(engine, prompt_ids, n):
    gen = await engine.start(RenderedPrompt(prompt_ids, "reasoning"), SamplingParams(temperature=0.0, max_tokens=n), CONVERSATION)
    out = []
    for _ in range(n):
        out += await gen.next_tokens()
    return gen, out


async def test_rollback_then_inject_equals_fresh_generation(engine):
    tok = engine.tokenizer
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Count from one to ten."}], tokenize=False,
                                                add_generation_prompt=True), add_special_tokens=False)
    gen, first = await greedy(engine, prompt, 12)
    await gen.rollback(5)
    prefix = tok.encode(" Wait, think safely.", add_special_tokens=False)
    await gen.inject(prefix)
    continued = []
    for _ in range(10):
        continued += await gen.next_tokens()
    prefilled = gen.prefilled_tokens
    await gen.abort()

    fresh_gen, fresh = await greedy(engine, prompt + first[:7] + prefix, 10)
    await fresh_gen.abort()
    assert continued == fresh
    # Only the prompt, the kept tokens, the prefix and the decoded tokens were ever prefilled: no re-prefill.
    assert prefilled == len(prompt) + 7 + len(prefix) + 10 - 1 + 4  # 4 tokens decoded before the rollback were discarded


async def test_bare_rollback_recomputes_the_last_position(engine):
    prompt = engine.tokenizer.encode("The capital of France is", add_special_tokens=False)
    gen, first = await greedy(engine, prompt, 6)
    await gen.rollback(3)
    again = []
    for _ in range(3):
        again += await gen.next_tokens()
    await gen.abort()
    assert again == first[3:6]


async def test_abort_frees_the_slot(engine):
    gen = await engine.start(RenderedPrompt([1, 2, 3], "reasoning"), SamplingParams(max_tokens=4), CONVERSATION)
    assert engine.stats()["running"] == 1
    await gen.abort()
    await gen.abort()
    assert engine.stats()["running"] == 0


def chat_prompt(engine, text):
    tok = engine.tokenizer
    return tok.encode(tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True),
                      add_special_tokens=False)


async def continue_greedy(gen, n):
    out = []
    for _ in range(n):
        out += await gen.next_tokens()
    return out


async def test_a_second_inject_does_not_commit_the_unread_sample(engine):
    prompt = chat_prompt(engine, "Name a colour.")
    first_ids = engine.tokenizer.encode(" Wait,", add_special_tokens=False)
    second_ids = engine.tokenizer.encode(" think safely.", add_special_tokens=False)
    gen, kept = await greedy(engine, prompt, 5)
    await gen.inject(first_ids)
    await gen.inject(second_ids)  # the token sampled after the first injection was never read
    assert gen.sequence == prompt + kept + first_ids + second_ids
    continued = await continue_greedy(gen, 6)
    await gen.abort()
    fresh_gen, fresh = await greedy(engine, prompt + kept + first_ids + second_ids, 6)
    await fresh_gen.abort()
    assert continued == fresh


async def test_a_rollback_right_after_an_inject_removes_exactly_the_injected_tokens(engine):
    prompt = chat_prompt(engine, "Name a colour.")
    prefix = engine.tokenizer.encode(" Wait, think safely.", add_special_tokens=False)
    gen, kept = await greedy(engine, prompt, 5)
    await gen.inject(prefix)
    await gen.rollback(len(prefix))
    assert gen.sequence == prompt + kept
    assert gen.cache.get_seq_length() <= len(prompt + kept)
    continued = await continue_greedy(gen, 6)
    await gen.abort()
    fresh_gen, fresh = await greedy(engine, prompt + kept, 6)
    await fresh_gen.abort()
    assert continued == fresh


def test_a_vanishing_temperature_samples_greedily():
    import torch

    from safethink_server.engines.sampler import TokenSampler

    logits = torch.tensor([0.0, 3.0, 1.0])
    generator = torch.Generator().manual_seed(0)
    assert TokenSampler(SamplingParams(temperature=1e-30), 3, {0}).sample(logits, [2], 1, generator)[0] == 1


async def test_tokenize_and_detokenize_are_the_engines_tokenizer(engine):
    text = "Reasoning models leak harm in their chain of thought."
    plain = await engine.tokenize(text, TokenizeOptions(return_token_strs=True), 2048)
    assert plain.tokens == engine.tokenizer.encode(text) and plain.count == len(plain.tokens) > 5
    assert plain.token_strs == engine.tokenizer.convert_ids_to_tokens(plain.tokens) and plain.max_model_len == 2048
    assert await engine.detokenize(plain.tokens) == text
    chat = await engine.tokenize([{"role": "user", "content": text}], TokenizeOptions(), 2048)
    rendered = await engine.detokenize(chat.tokens)
    assert text in rendered and rendered.rstrip().endswith("assistant") and chat.token_strs is None
    without = await engine.tokenize([{"role": "user", "content": text}], TokenizeOptions(add_generation_prompt=False), 2048)
    assert without.count < chat.count and chat.tokens[: without.count] == without.tokens
    for bad in ([engine.vocab_size], [-1]):
        with pytest.raises(PromptError) as raised:
            await engine.detokenize(bad)
        assert raised.value.param == "tokens"


def test_forwards_that_run_out_of_memory_kill_the_engine_and_others_do_not(embedded_model_dir):
    """A real allocation failure: the address space is capped a little above what the loaded engine
    uses, so a long prompt's forward cannot be allocated. One request failing so is not fatal; three
    in a row with nothing succeeding between them kill the engine (its /health answers dead). In a
    process of its own: in this one, memory freed by earlier tests would serve the forward."""
    script = f"import sys; from tests.server.test_hf_engine import out_of_memory_scenario; out_of_memory_scenario({str(embedded_model_dir)!r})"
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
