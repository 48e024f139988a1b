from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

EMBEDDED_MODEL = "SmolLM2-135M-Instruct"
LOG_DIR = Path(os.environ.get("PYTEST_TMPDIR", "/tmp"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_process(command: list[str], health_url: str, log: Path, env: dict[str, str] | None = None,
                    timeout_s: float = 240.0) -> Iterator[None]:
    """A real server subprocess, up once `health_url` answers 200; stopped afterwards."""
    with log.open("w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{command[2:4]} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(health_url, timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{command[2:4]} did not start in {timeout_s}s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


@contextmanager
def running_server(*flags: str, env: dict[str, str] | None = None, timeout_s: float = 240.0) -> Iterator[str]:
    """`safethink serve` as a real subprocess on a free port; yields its base URL."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "safethink_server.cli", "serve", "--port", str(port), "--log-level", "warning", *flags]
    with running_process(command, url + "/health", LOG_DIR / f"safethink-serve-{port}.log", env, timeout_s):
        yield url


def server_log(url: str) -> str:
    """What a server that `running_server` started has written to its stdout and stderr so far."""
    return (LOG_DIR / f"safethink-serve-{urlsplit(url).port}.log").read_text(errors="replace")


def series(url: str, name: str, **labels: str) -> float:
    """A metric on a server's /metrics, summed over the label sets that have `labels`."""
    total = 0.0
    for match in re.finditer(rf"^{name}(?:{{([^}}]*)}})? (\S+)$", httpx.get(url + "/metrics").text, re.M):
        have = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(match.group(2))
    return total


@dataclass
class Streamed:
    """What the official client read from one streamed chat completion."""

    reasoning: str = ""
    answer: str = ""
    finish: str | None = None
    usage: object = None
    info: dict | None = None  # the `safethink` report


def read_stream(stream) -> Streamed:  # type: ignore[no-untyped-def]
    out = Streamed()
    for chunk in stream:
        out.usage = chunk.usage if chunk.usage is not None else out.usage
        out.info = chunk.model_extra.get("safethink") or out.info
        for choice in chunk.choices:
            out.reasoning += getattr(choice.delta, "reasoning_content", None) or ""
            out.answer += choice.delta.content or ""
            out.finish = choice.finish_reason or out.finish
    return out


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
