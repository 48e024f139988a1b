"""`safethink`: serve, score, train-probe."""

from __future__ import annotations

import argparse
import json
import sys
import types
import typing
from pathlib import Path

from pydantic import ValidationError


def _serve_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per server setting, generated from the settings model so they never drift apart."""
    from safethink_server.config import ServerSettings

    parser.add_argument("--config", type=Path, help="YAML file with settings (same names as the flags, with underscores)")
    for name, field in ServerSettings.model_fields.items():
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
            print(f"error: --{'-'.join(str(p) for p in err['loc']).replace('_', '-')}: {err['msg']}", file=sys.stderr)
        raise SystemExit(2) from None
    app = build_app(settings)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level, timeout_graceful_shutdown=5)


def score(args: argparse.Namespace) -> None:
    from reward_models.registry import ScorerConfig, build_scorer
    from reward_models.score_file import InputError, read_items, score_file

    try:
        read_items(args.input)  # fail on a bad line before loading any model
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    config = ScorerConfig(kind=args.scorer, model_path=args.model, head_path=args.head, device=args.device,
                          unsafe_labels=args.unsafe_labels, unsafe_token=args.unsafe_token, safe_token=args.safe_token,
                          url=args.url, remote_model=args.remote_model)
    scorer = build_scorer(config)
    n = score_file(scorer, args.input, args.output, batch_size=args.batch_size)
    print(f"scored {n} steps -> {args.output}", file=sys.stderr)


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
    p_score.add_argument("--unsafe-labels", nargs="+", help="classifier: labels meaning unsafe")
    p_score.add_argument("--unsafe-token", default="unsafe")
    p_score.add_argument("--safe-token", default="safe")
    p_score.add_argument("--url", help="remote: base URL of a vLLM classify server")
    p_score.add_argument("--remote-model")
    p_score.add_argument("--batch-size", type=int, default=64)
    p_score.set_defaults(func=score)

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
