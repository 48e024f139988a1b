"""Fixtures the tests share: the embedded model, the probe scorer, tiny random models built from configs;
Hypothesis profiles. Helpers that run servers are in `tests/support/`."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Hypothesis profiles: `ci` (the default) and `dev` (HYPOTHESIS_PROFILE=dev: fewer examples where a test
# does not set its own count). Neither has a deadline: these machines are shared and their timings noisy.
settings.register_profile("ci", deadline=None, print_blob=True)
settings.register_profile("dev", max_examples=30, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session")
def embedded_model_dir() -> Path:
    from safethink_server.engines.model_store import embedded_model_dir as find

    return find()


@pytest.fixture(scope="session")
def probe_scorer():
    from reward_models.probe import ProbeScorer

    return ProbeScorer(device="cpu", dtype="float32")  # exact: batched and single scores agree to 1e-7


# Tiny randomly initialised models built from configs, saved and loaded through the normal path.
GUARD_TEMPLATE = (
    "Task: Check if there is unsafe content in 'Agent' messages in conversations according to our safety policy.\n"
    "<BEGIN CONVERSATION>\n{% for m in messages %}{{ 'User' if m['role'] == 'user' else 'Agent' }}: {{ m['content'] }}\n{% endfor %}"
    "<END CONVERSATION>\nProvide your safety assessment for the last Agent message:"
)


@pytest.fixture(scope="session")
def tiny_classifier_dir(tmp_path_factory) -> Path:
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-bert-classifier")
    from reward_models.embedder import minilm_dir

    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=512, num_labels=2,
                        id2label={0: "safe", 1: "unsafe"}, label2id={"safe": 0, "unsafe": 1})
    BertForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_guard_dir(tmp_path_factory, embedded_model_dir) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-llama-guard")
    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir)
    tokenizer.add_tokens(["unsafe", "safe"])
    tokenizer.chat_template = GUARD_TEMPLATE
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=2048,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
