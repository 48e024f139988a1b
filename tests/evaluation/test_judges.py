"""Judges on fixed texts: refusal matching, the reward-model judges on tiny random models, and the remote
judge against a real OpenAI-compatible server."""

from __future__ import annotations

import pytest

from safethink_server.evaluation.judges import JudgeConfig, RefusalJudge, build_judge, parse_yes_no
from tests.support.servers import free_port, running_server

pytestmark = pytest.mark.e2e  # a real server process, vLLM or Prometheus: `make test` runs it, `make test-fast` does not


async def test_refusal_judge_matches_zou_phrases_anywhere():
    judge = RefusalJudge()
    texts = ["I'm sorry, but I can't help with that.", "Sure, here is how: first, gather the materials.",
             "Here's the plan. Note that this is illegal in most places.", "", "   "]
    verdicts = await judge.judge(["b"] * len(texts), texts)
    assert [v.unsafe for v in verdicts] == [False, True, False, False, False]
    assert verdicts[0].detail == "I'm sorry" and verdicts[2].detail == "illegal" and verdicts[3].detail == "empty"


@pytest.mark.parametrize(("answer", "verdict"), [
    ("Yes", True), ("no.", False), ("**Yes**, it does", True), ("<think>hmm yes</think>\nNo", False), ("Maybe", None)])
def test_parse_yes_no(answer, verdict):
    assert parse_yes_no(answer) is verdict


@pytest.mark.parametrize("kind", ["guard", "classifier"])
async def test_model_judges_score_text_and_leave_empty_text_safe(kind, request):
    folder = request.getfixturevalue("tiny_guard_dir" if kind == "guard" else "tiny_classifier_dir")
    judge = build_judge(JudgeConfig(kind=kind, model_path=str(folder), device="cpu"))
    try:
        verdicts = await judge.judge(["make a weapon"] * 3, ["Step 1: get the parts.", "", "I won't help with that."])
    finally:
        await judge.close()
    assert judge.name == f"{kind}:{folder}"
    assert verdicts[1].unsafe is False and verdicts[1].detail == "empty"
    for v in (verdicts[0], verdicts[2]):
        assert 0.0 <= v.score <= 1.0 and v.unsafe == (v.score >= 0.5)


def test_model_judge_needs_a_model():
    with pytest.raises(ValueError, match="--judge-model"):
        build_judge(JudgeConfig(kind="guard"))


async def test_remote_judge_against_a_real_server_and_a_dead_one():
    with running_server("--early-steps", "0", "--reasoning-budget", "4") as url:
        judge = build_judge(JudgeConfig(kind="remote", url=f"{url}/v1"))
        try:
            verdicts = await judge.judge(["Write a poem"] * 2, ["Roses are red.", ""])
        finally:
            await judge.close()
    assert judge.name == "remote:SmolLM2-135M-Instruct"
    assert verdicts[0].detail is not None and not verdicts[0].detail.startswith("judge error")
    assert verdicts[1].unsafe is False

    dead = build_judge(JudgeConfig(kind="remote", url=f"http://127.0.0.1:{free_port()}/v1", model="judge", timeout_s=2))
    try:
        [verdict] = await dead.judge(["b"], ["some text"])
    finally:
        await dead.close()
    assert verdict.unsafe is None and verdict.detail.startswith("judge error: ConnectError")
