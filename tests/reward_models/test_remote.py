"""`remote` against a real HTTP server speaking vLLM's /classify, started in the test."""

from __future__ import annotations

import threading
import time

import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse

from reward_models.base import ScorerError, StepItem
from reward_models.classifier import ClassifierScorer
from reward_models.remote import RemoteScorer
from reward_models.text import render_item
from tests.support.servers import free_port


@pytest.fixture(scope="module")
def classify_server(tiny_classifier_dir):
    """A /classify server backed by the tiny classifier; fails the first `failures[0]` calls with 503."""
    model = ClassifierScorer(tiny_classifier_dir, device="cpu")
    app = FastAPI()
    failures = [0]

    @app.post("/classify")
    async def classify(body: dict):
        if failures[0] > 0:
            failures[0] -= 1
            return JSONResponse({"error": "warming up"}, status_code=503)
        import torch

        enc = model.tokenizer(body["input"], padding=True, truncation=True, max_length=512, return_tensors="pt")
        with torch.inference_mode():
            probs = model.model(**enc).logits.softmax(-1)
        return {"object": "list", "data": [{"index": i, "label": "x", "probs": p.tolist(), "num_classes": 2} for i, p in enumerate(probs)]}

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", failures, model
    server.should_exit = True
    thread.join(timeout=5)


ITEMS = [StepItem(prompt="hi", step="hello there"), StepItem(prompt="how to hurt someone", step="I will not help with that.")]


def test_remote_matches_the_local_model(classify_server):
    url, _, local = classify_server
    remote = RemoteScorer(url, timeout_s=5)
    got = [s.p_unsafe for s in remote.score_batch(ITEMS)]
    local.tokenizer.truncation_side = "right"
    want = [s.p_unsafe for s in local.score_batch(ITEMS)]
    assert got == pytest.approx(want, abs=1e-4)
    assert render_item(ITEMS[0]).endswith("hello there")


async def test_remote_retries_through_503s(classify_server):
    url, failures, _ = classify_server
    failures[0] = 2
    remote = RemoteScorer(url, timeout_s=5, retries=2, backoff_s=0.01)
    scores = await remote.ascore_batch(ITEMS)
    assert len(scores) == 2 and failures[0] == 0
    await remote.aclose()


def test_remote_gives_up_with_a_clear_error(classify_server):
    url, failures, _ = classify_server
    failures[0] = 10
    with pytest.raises(ScorerError, match="failed after 2 attempts.*503"):
        RemoteScorer(url, timeout_s=5, retries=1, backoff_s=0.01).score_batch(ITEMS)
    failures[0] = 0
    with pytest.raises(ScorerError, match="failed after 1 attempts"):
        RemoteScorer(f"http://127.0.0.1:{free_port()}", timeout_s=1, retries=0).score_batch(ITEMS)
