"""The hf engine's sampler honours vLLM's token restrictions, over any logits: only `allowed_token_ids`
are sampled, a bad word's last token never follows the rest of it, and bad words are encoded as vLLM
encodes them (alone and after a space). The prompt's cut (`truncate_prompt_tokens`) keeps its tail."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from safethink_server.engines.base import SamplingParams
from safethink_server.engines.sampler import TokenSampler, bad_words_token_ids
from safethink_server.prompt import PromptError, RenderedPrompt, check_context_length, truncated

VOCAB = 50


def sample(sampling: SamplingParams, logits: list[float], output: list[int], bad: list[list[int]] | None = None, seed: int = 0) -> int:
    sampler = TokenSampler(sampling, VOCAB, {0}, bad)
    generator = torch.Generator().manual_seed(seed)
    token, _ = sampler.sample(torch.tensor(logits), [7, 8] + output, 2, generator)
    return token


logits_lists = st.lists(st.floats(-20, 20), min_size=VOCAB, max_size=VOCAB)


@settings(max_examples=150, deadline=None)
@given(logits=logits_lists, allowed=st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=5), temperature=st.sampled_from([0.0, 1.0]),
       seed=st.integers(0, 1000))
def test_only_allowed_token_ids_are_sampled(logits, allowed, temperature, seed):
    token = sample(SamplingParams(allowed_token_ids=allowed, temperature=temperature), logits, [], seed=seed)
    assert token in allowed


@settings(max_examples=150, deadline=None)
@given(logits=logits_lists, word=st.lists(st.integers(1, VOCAB - 1), min_size=1, max_size=3), output=st.lists(st.integers(1, VOCAB - 1), max_size=4),
       ends_with_prefix=st.booleans(), seed=st.integers(0, 1000))
def test_a_bad_words_last_token_never_follows_the_rest_of_it(logits, word, output, ends_with_prefix, seed):
    if ends_with_prefix:
        output = output + word[:-1]
    # the bad word's last token is the likeliest by far: only the ban keeps it out
    logits = [*logits]
    logits[word[-1]] = 1e4
    token = sample(SamplingParams(temperature=0.0), logits, output, [word], seed)
    follows = len(word) == 1 or output[len(output) - len(word) + 1 :] == word[:-1]
    assert (token != word[-1]) == follows


def test_bad_words_are_encoded_alone_and_after_a_space(embedded_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir)
    (alone, spaced) = bad_words_token_ids(tokenizer, ["hello"])
    assert alone == tokenizer.encode("hello", add_special_tokens=False)
    assert spaced == tokenizer.encode(" hello", add_special_tokens=False) and spaced != alone


@settings(max_examples=100, deadline=None)
@given(ids=st.lists(st.integers(0, 100), min_size=1, max_size=120), keep=st.one_of(st.integers(1, 60), st.just(-1)),
       max_tokens=st.integers(1, 40), limit=st.integers(60, 80))
def test_truncate_prompt_tokens_keeps_the_prompts_last_tokens(ids, keep, max_tokens, limit):
    prompt = truncated(RenderedPrompt(ids, "reasoning"), keep, max_tokens, limit)
    assert prompt.ids == ids[-(limit - max_tokens if keep == -1 else keep):]
    if keep == -1:
        check_context_length(len(prompt.ids), max_tokens, limit)  # -1: whatever the prompt, it fits beside max_tokens
    assert truncated(RenderedPrompt(ids, "reasoning"), None, max_tokens, limit).ids == ids
    with pytest.raises(PromptError) as caught:
        truncated(RenderedPrompt(ids, "reasoning"), limit + 1, max_tokens, limit)
    assert caught.value.param == "truncate_prompt_tokens"


@settings(max_examples=60, deadline=None)
@given(logits=logits_lists, temperature=st.sampled_from([0.0, 1.0]), seed=st.integers(0, 1000))
def test_bans_that_leave_nothing_fall_back_to_the_allowed_ids(logits, temperature, seed):
    """EOS allowed alone but min_tokens not reached, or every allowed id a bad word: an allowed id is sampled."""
    assert sample(SamplingParams(allowed_token_ids=[0], min_tokens=5, temperature=temperature), logits, [], seed=seed) == 0
    assert sample(SamplingParams(allowed_token_ids=[3, 4], temperature=temperature), logits, [], [[3], [4]], seed) in (3, 4)
