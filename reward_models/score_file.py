"""`safethink score`: score a JSONL file of steps. Validates every line before scoring, and writes
the output atomically, so a bad line leaves nothing half-written."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from pydantic import ValidationError

from reward_models.base import Scorer, StepItem


class InputError(ValueError):
    pass


def read_items(path: Path) -> list[tuple[dict[str, object], StepItem]]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{path}:{line_no}: not valid JSON ({exc.msg})") from exc
            if not isinstance(raw, dict):
                raise InputError(f"{path}:{line_no}: expected a JSON object with prompt, reasoning and step")
            try:
                item = StepItem.model_validate({k: raw.get(k) for k in ("prompt", "reasoning", "step") if k in raw})
            except ValidationError as exc:
                first = exc.errors()[0]
                field = ".".join(str(p) for p in first["loc"]) or "line"
                raise InputError(f"{path}:{line_no}: field {field!r}: {first['msg']}") from exc
            rows.append((raw, item))
    return rows


def score_file(scorer: Scorer, input_path: Path, output_path: Path, batch_size: int = 64) -> int:
    rows = read_items(input_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    fd, staging = tempfile.mkstemp(prefix=output_path.name + ".", dir=output_path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            for start in range(0, len(rows), batch_size):
                chunk = rows[start : start + batch_size]
                scores = scorer.score_batch([item for _, item in chunk])
                for (raw, _), score in zip(chunk, scores, strict=True):
                    record = {**raw, "p_unsafe": round(score.p_unsafe, 6)}
                    if score.category is not None:
                        record["category"] = score.category
                    out.write(json.dumps(record, ensure_ascii=False) + "\n")
        os.replace(staging, output_path)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise
    return len(rows)
