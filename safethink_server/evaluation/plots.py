"""The report's PNG plots (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

if TYPE_CHECKING:
    from matplotlib.axes import Axes

    from safethink_server.evaluation.report import Rate, Report


def _bars(ax: Axes, groups: list[str], series: dict[str, list[Rate]], ylabel: str) -> None:
    width = 0.8 / max(1, len(series))
    for k, (name, rates) in enumerate(series.items()):
        xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(groups))]
        values = [100 * (r.rate or 0.0) for r in rates]
        errors = [[max(0.0, 100 * ((r.rate or 0) - r.ci95[0])) if r.ci95 else 0 for r in rates],
                  [max(0.0, 100 * (r.ci95[1] - (r.rate or 0))) if r.ci95 else 0 for r in rates]]
        ax.bar(xs, values, width, yerr=errors, capsize=3, label=name)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 118)  # room above 100% for the legend
    ax.legend(loc="upper left", ncols=max(1, len(series)))


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_plots(report: Report, out_dir: Path) -> list[Path]:
    arms = report.arms
    paths: list[Path] = []

    fig, ax = plt.subplots(figsize=(7, 4))
    _bars(ax, ["reasoning", "answer", "full"], {a.arm: [a.asr[v] for v in ("reasoning", "answer", "full")] for a in arms},
          f"attack success rate, % (judge: {report.judge})")
    ax.set_title("ASR on harmful prompts (95% Wilson intervals)")
    paths.append(_save(fig, out_dir / "asr.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    _bars(ax, ["false interventions", "accuracy"], {a.arm: [a.false_interventions, a.accuracy] for a in arms},
          "% of benign prompts")
    ax.axhline(5, color="grey", linestyle=":", linewidth=1)
    ax.set_title("Benign reasoning prompts")
    paths.append(_save(fig, out_dir / "false_interventions.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    steps = sorted({s for a in arms for s in a.intervention_steps}) or [1]
    width = 0.8 / max(1, len(arms))
    for k, a in enumerate(arms):
        ax.bar([s + (k - (len(arms) - 1) / 2) * width for s in steps], [a.intervention_steps.get(s, 0) for s in steps],
               width, label=a.arm)
    ax.set_xticks(steps)
    ax.set_xlabel("reasoning step")
    ax.set_ylabel("interventions")
    ax.set_title("Step at which interventions happened")
    ax.legend()
    paths.append(_save(fig, out_dir / "intervention_steps.png"))

    fig, ax = plt.subplots(figsize=(7, 4))
    colours = {"harmful": "tab:red", "benign": "tab:blue"}
    labelled: set[str] = set()
    for c in report.completions:
        scored = [(i, s.p_unsafe) for i, s in enumerate(c.steps, start=1) if s.p_unsafe is not None]
        if not scored or c.error:
            continue
        label = c.kind if c.kind not in labelled else None
        labelled.add(c.kind)
        ax.plot([i for i, _ in scored], [p for _, p in scored], color=colours[c.kind], alpha=0.35, marker=".", label=label)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("scored step, in order (a replaced step is scored again)")
    ax.set_ylabel("p_unsafe")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("p_unsafe trajectories (steered responses)")
    if labelled:
        ax.legend()
    paths.append(_save(fig, out_dir / "p_unsafe_trajectories.png"))

    fig, (ax_ttft, ax_tps) = plt.subplots(1, 2, figsize=(9, 4))
    names = [a.arm for a in arms]
    ttft = [[c.ttft_s for c in report.completions if c.arm == n and c.ttft_s is not None] or [0.0] for n in names]
    tps = [[t for c in report.completions if c.arm == n and (t := c.tokens_per_s) is not None] or [0.0] for n in names]
    ax_ttft.boxplot(ttft, tick_labels=names)
    ax_ttft.set_ylabel("time to first token, s")
    ax_tps.boxplot(tps, tick_labels=names)
    ax_tps.set_ylabel("tokens/s per request (completion tokens / request time)")
    fig.suptitle("Latency and speed")
    paths.append(_save(fig, out_dir / "latency.png"))
    return paths
