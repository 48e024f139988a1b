"""vLLM's own benchmark client through bench/serve.py against a real steered server: the random
dataset's requests (which ask for ignore_eos) all succeed, each run to its length."""

from __future__ import annotations

import argparse

import pytest

from bench.serve import summary, vllm_bench
from safethink_server.engines.model_store import embedded_model_dir
from tests.support.servers import running_server

pytestmark = pytest.mark.e2e  # a real server process, vLLM or Prometheus: `make test` runs it, `make test-fast` does not


def test_vllm_bench_serve_runs_against_the_steered_hf_server():
    options = argparse.Namespace(num_prompts=4, input_len=16, output_len=8, request_rate=float("inf"), seed=0, max_concurrency=None)
    with running_server("--max-concurrent-sequences", "2", "--allow-client-overrides") as url:
        steered = vllm_bench(url, embedded_model_dir(), options, {}, [])
        unsteered = vllm_bench(url, embedded_model_dir(), options, {"safethink": {"early_steps": 0}}, [])
    for result in (steered, unsteered):
        row = summary(result)
        assert (row["completed"], row["failed"]) == (4, 0), result.get("errors")
        assert row["p50_ttft_ms"] > 0 and row["output_tokens_per_s"] > 0
    # A refusal may end a steered answer early; unsteered, ignore_eos runs every answer to its length.
    assert steered["total_output_tokens"] <= 4 * 8 == unsteered["total_output_tokens"]
