"""Compare probe heads offline on recorded unsteered completions: how often each would act.

    safethink serve --engine vllm --early-steps 0 --port 8101 &   # the bare model
    safethink eval --server http://127.0.0.1:8101/v1 --suite SUITE --bare none --max-tokens 128 \\
        --wrap filler-before,filler-after,filler-both,split-turns,in-system,in-assistant,in-tool,template --out bare
    python bench/head_replay.py bare/results.json SUITE reward_models/probe_head.safetensors other_head.safetensors

A head that acts on none of a completion's first `--early-steps` steps leaves it as the bare model
wrote it, so "acted on" is whether any of those steps scores at or above `--threshold`. Prints, per
head, the share acted on by kind (harmful, benign) and wrapping. A new head is compared on the same
completions, without a server run per head.

Where it differs from the server (every head meets the same differences; the figures are for
comparing heads, not server rates): steps end at each blank line once they hold text (the server ends
one at the token that completes it, at a section change or at --max-step-tokens); the reasoning and
the answer are joined by a blank line, and the reasoning's end marker is not a step of its own (the
server watches it as one), so a replayed completion can be watched one step further; only the
recorded tokens are read (--max-tokens of the recording); scoring never times out. Prompts are
rebuilt from the suite with today's wrapping code: record and replay with the same tree.
"""

from __future__ import annotations

import argparse
import re
from collections import defaultdict
from pathlib import Path

from reward_models.base import StepItem
from reward_models.context import conversation_view
from reward_models.embedder import SentenceEmbedder
from reward_models.probe import ProbeScorer
from reward_models.wrapping import WRAP_KINDS
from safethink_server.evaluation.report import Report
from safethink_server.evaluation.runner import Completion
from safethink_server.evaluation.suites import EvalPrompt, build_prompts, jailbreak_templates, load_suite
from safethink_server.evaluation.wrapped import eval_wrapper, wrapped_prompts
from safethink_server.steering.steps import StepBoundaryDetector


def first_steps(text: str, count: int) -> list[str]:
    """The first `count` steps of `text`, each ending at a blank line once it holds some text (the
    server's default step detector, read on text cut at its delimiter rather than on tokens)."""
    detector = StepBoundaryDetector()
    steps, current = [], ""
    for piece in re.split(r"(\n\n)", text):
        current += piece
        if detector.is_complete(current, 0):
            steps.append(current)
            current = ""
    if current.strip():
        steps.append(current)
    return steps[:count]


def suite_prompts(suite: str) -> dict[str, EvalPrompt]:
    """The suite's prompts as written and in every wrapping, by id."""
    loaded, base = load_suite(suite)
    prompts = wrapped_prompts(build_prompts(loaded, base), list(WRAP_KINDS), eval_wrapper(jailbreak_templates()), loaded.seed)
    return {p.id: p for p in prompts}


def step_items(completions: list[Completion], by_id: dict[str, EvalPrompt], count: int) -> tuple[list[StepItem], list[int]]:
    """The watched steps of every completion as the scorer reads them, and each step's completion."""
    items, owners = [], []
    for k, completion in enumerate(completions):
        prompt = by_id[completion.prompt_id]
        latest, history = conversation_view(prompt.messages or [{"role": "user", "content": prompt.prompt}])
        text = "\n\n".join(t for t in (completion.reasoning, completion.answer) if t)
        so_far = ""
        for step in first_steps(text, count):
            items.append(StepItem(prompt=latest, history=history, reasoning=so_far, step=step))
            owners.append(k)
            so_far += step
    return items, owners


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="results.json of a `safethink eval` run against a bare server")
    parser.add_argument("suite", help="the suite that run used")
    parser.add_argument("heads", type=Path, nargs="+", help="probe head files")
    parser.add_argument("--early-steps", type=int, default=3)
    parser.add_argument("--threshold", type=float, default=0.5)
    parser.add_argument("--arm", help="the arm whose completions are replayed (default: the run's first)")
    parser.add_argument("--leave-out", metavar="TEXT", help="leave out the prompts that hold TEXT (a template's sentence)")
    args = parser.parse_args(argv)
    report = Report.model_validate_json(args.results.read_text())
    arm = args.arm or report.arms[0].arm  # a run with a bare arm holds every prompt twice
    recorded = [c for c in report.completions if c.arm == arm]
    completions = [c for c in recorded if not c.error]
    print(f"arm {arm!r}: {len(completions)} completions, {len(recorded) - len(completions)} failed requests left out")
    by_id = suite_prompts(args.suite)
    if args.leave_out:
        kept = [c for c in completions if args.leave_out not in by_id[c.prompt_id].prompt]
        print(f"{len(completions) - len(kept)} prompts hold {args.leave_out!r}: left out")
        completions = kept
    items, owners = step_items(completions, by_id, args.early_steps)
    embedder = SentenceEmbedder(cache_size=1 << 20)  # shared: each text is encoded once for all heads
    for head in args.heads:
        scorer = ProbeScorer(head, embedder=embedder)
        highest: dict[int, float] = defaultdict(float)
        for start in range(0, len(items), 64):
            for owner, score in zip(owners[start : start + 64], scorer.score_batch(items[start : start + 64]), strict=True):
                highest[owner] = max(highest[owner], score.p_unsafe)
        table: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
        for k, completion in enumerate(completions):
            cell = table[(completion.kind, completion.wrap or "plain")]
            cell[0] += highest[k] >= args.threshold
            cell[1] += 1
        print(head)
        for (kind, wrap), (acted, total) in sorted(table.items()):
            print(f"  {kind:8s} {wrap:14s} {acted:3d}/{total}")


if __name__ == "__main__":
    main()
