"""What each native memory bound costs in throughput, and what it saves in memory: the same seeded
load (bench/load.py) against a fresh hf server under each setting, one after another in one run.

    python bench/memory_bounds.py --duration-s 120 --json bounds.json

Settings (safethink_server/memory.py, read from the environment): no bound (oneDNN's and glibc's
defaults, no trimming), each bound alone, and all of them (the server's defaults). Reported per
setting: output tokens/s and its ratio to no bound, TTFT p50 and p99, the server's RSS when the load
starts and when it ends, and the growth between them. `--rounds N` repeats the settings in turn.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.load import DEFAULT_SERVER_ARGS, LoadConfig, own_process, run_load  # noqa: E402
from safethink_server.memory import NativeMemorySettings  # noqa: E402

UNBOUNDED = {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "1024", "MALLOC_ARENA_MAX": "0", "SAFETHINK_MALLOC_TRIM_S": "0"}
DEFAULTS = {name: str(field.default) for name, field in NativeMemorySettings.model_fields.items()}
SETTINGS = {
    "no bound": UNBOUNDED,
    "oneDNN cache": {**UNBOUNDED, "ONEDNN_PRIMITIVE_CACHE_CAPACITY": DEFAULTS["ONEDNN_PRIMITIVE_CACHE_CAPACITY"]},
    "malloc arenas": {**UNBOUNDED, "MALLOC_ARENA_MAX": DEFAULTS["MALLOC_ARENA_MAX"]},
    "malloc trim": {**UNBOUNDED, "SAFETHINK_MALLOC_TRIM_S": DEFAULTS["SAFETHINK_MALLOC_TRIM_S"]},
    "all (default)": DEFAULTS,
}


def measure(env: dict[str, str], config: LoadConfig) -> dict[str, float | None]:
    flags = ["--engine", "hf", "--allow-client-overrides", *DEFAULT_SERVER_ARGS.split()]
    with own_process(flags, env) as base:
        report = asyncio.run(run_load(base, config))
    if report.problems():
        raise SystemExit(f"the load failed under {env}: {report.problems()}")
    start, end = report.start.rss_bytes, report.end.rss_bytes
    return {"tokens_per_s": report.output_tokens_per_s, "ttft_p50_ms": report.ttft_p50_ms, "ttft_p99_ms": report.ttft_p99_ms,
            "sent": report.sent,
            "rss_start_mib": start / 2**20 if start else None, "rss_end_mib": end / 2**20 if end else None,
            "growth_mib": (end - start) / 2**20 if start and end else None}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration-s", type=float, default=120.0, help="load time under each setting")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    config = LoadConfig(duration_s=args.duration_s, seed=args.seed)
    runs: dict[str, list[dict[str, float | None]]] = {name: [] for name in SETTINGS}
    for round_ in range(args.rounds):
        for name, env in SETTINGS.items():
            print(f"round {round_ + 1}: {name} {env}", file=sys.stderr)
            runs[name].append(measure(env, config))

    def mean(name: str, key: str) -> float:
        values = [r[key] for r in runs[name] if r[key] is not None]
        return sum(values) / len(values) if values else float("nan")  # type: ignore[arg-type]

    base_rate = mean("no bound", "tokens_per_s")
    print(f"{'setting':16} {'tok/s':>7} {'ratio':>6} {'ttft p50':>9} {'ttft p99':>9} {'rss start':>10} {'rss end':>8} {'growth':>7}  (ms, MiB)")
    for name in SETTINGS:
        rate = mean(name, "tokens_per_s")
        print(f"{name:16} {rate:7.2f} {rate / base_rate:6.3f} {mean(name, 'ttft_p50_ms'):9.0f} {mean(name, 'ttft_p99_ms'):9.0f} "
              f"{mean(name, 'rss_start_mib'):10.0f} {mean(name, 'rss_end_mib'):8.0f} {mean(name, 'growth_mib'):7.0f}")
    if args.json:
        args.json.write_text(json.dumps({"config": vars(args) | {"json": str(args.json)}, "settings": SETTINGS, "runs": runs}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
