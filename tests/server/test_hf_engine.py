"""KV-cache steering is exact: rollback + inject continues as a fresh run over the same ids."""

import pytest

from safethink_server.engines.base import SamplingParams
from safethink_server.engines.hf import HFEngine
from safethink_server.prompt import PromptError, RenderedPrompt
from safethink_server.schema import TokenizeOptions
from tests.support.hf_engine import CONVERSATION, greedy


@pytest.fixture(scope="module")
def engine(embedded_model_dir):
    return HFEngine(embedded_model_dir, "smol", dtype="float32")


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
