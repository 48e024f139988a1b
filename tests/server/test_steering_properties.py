"""The steering loop's invariants, over many generated request shapes (hypothesis), against a
scripted engine that implements the real engine contract:

(a) in replace mode with on_budget_exhausted=refuse, every piece of model text the client gets was
    judged safe as part of a step, or comes after the first `early_steps` steps were judged safe;
(b) what the client gets equals the decoded final sequence, markers removed, with the server's
    refusal accounted for;
(c) usage counts exactly the final sequence;
(d) no slot is held once the request ends, however it ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import re
from dataclasses import dataclass, field

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reward_models.base import StepItem, StepScore
from safethink_server.api.streaming import choice_runs
from safethink_server.engines.base import SEQUENCE_END, SamplingParams
from safethink_server.prompt import Conversation, RenderedPrompt
from safethink_server.schema import Action, PolicyConfig, ReasoningConfig
from safethink_server.steering.output import Delta, OutputProcessor
from safethink_server.steering.session import SteeringSession
from safethink_server.steering.steps import StepBoundaryDetector
from tests.support.scripted_engine import MODEL_PIECES, ScriptedEngine

PREFIX, REFUSAL = "[FIX]", "[NO]"
START, END = "<think>", "</think>"


@dataclass
class Case:
    pieces: list[str]
    batch_sizes: list[int]
    initial_section: str
    policy: PolicyConfig
    budget: int | None
    max_tokens: int
    max_step_tokens: int
    stop: list[str]
    scores: list[float]
    failing_calls: set[int]
    cancel_after: int | None  # event-loop turns before the client goes away
    engine_limits_tokens: bool  # the engine stops at max_tokens itself (vllm, upstream) or not (hf)
    engine_own_limit: int | None  # the engine stops earlier still, by its own count (an upstream)
    end_on_eos: bool
    prefill: str  # the client's own start of the assistant turn: context for the scorer, never output
    history: list[dict[str, str]]
    step_regex: str | None = None  # a step regex may stop matching as text grows: followed token by token
    constrained: bool = False  # a structured answer: a breach in it is refused, never given a prefix
    raw_answer: bool = False  # the answer as written, its leading whitespace kept (/v1/completions)
    constrains_itself: bool = False  # the engine's backend applies the constraint where the answer begins (an upstream)
    logprobs: int | None = None  # logprob entries asked for, with this many alternatives
    ignore_eos: bool = False  # the model's EOS is a token like any other (the engine ends at its limits)
    include_stop: bool = False  # the stop string that ends the answer is released with it


@dataclass
class Judge:
    """A scorer: p_unsafe is high for a step that says BAD, else taken from a list; some calls fail.
    It also checks that every step comes with its conversation: the latest turn, the history, and
    the assistant text so far starting with the client's prefill."""

    scores: list[float]
    failing_calls: set[int]
    history: str = ""
    prefill: str = ""
    seen: list[tuple[str, float | None]] = field(default_factory=list)
    wrong_context: list[StepItem] = field(default_factory=list)
    warmed: list[StepItem] = field(default_factory=list)  # contexts handed over to prepare before their steps ended
    unwarmed: list[StepItem] = field(default_factory=list)
    session: SteeringSession | None = None
    at: list[int] = field(default_factory=list)  # the output position (the step's end) at each call
    firsts: list[bool] = field(default_factory=list)  # whether each call said its step was a first one
    inserted_before: list[int] = field(default_factory=list)  # server texts the report listed at each call

    def warm(self, item: StepItem) -> None:
        self.warmed.append(item)

    async def __call__(self, item: StepItem, first: bool) -> StepScore:
        self.firsts.append(first)
        self.inserted_before.append(len(self.session.report.inserted) if self.session is not None else 0)
        if item.prompt != "q" or item.history != self.history or not item.reasoning.startswith(self.prefill):
            self.wrong_context.append(item)
        if not any((w.prompt, w.history, w.reasoning.strip(), w.step) == (item.prompt, item.history, item.reasoning.strip(), "")
                   for w in self.warmed):
            self.unwarmed.append(item)
        call = len(self.seen)
        self.at.append(self.session.output.output_tokens if self.session is not None else -1)
        if call in self.failing_calls:
            self.seen.append((item.step, None))
            raise RuntimeError("scorer down")
        p = 0.99 if "BAD" in item.step else self.scores[call % len(self.scores)]
        self.seen.append((item.step, p))
        return StepScore(p_unsafe=p)


@st.composite
def cases(draw: st.DrawFn, long: bool = False) -> Case:
    """`long`: long outputs read in big batches, which the loop takes in pieces rather than token by token."""
    pieces = draw(st.lists(st.sampled_from(MODEL_PIECES), max_size=300 if long else 120))
    layout = draw(st.sampled_from(["long reasoning", "early end", "no reasoning", "opens itself", "prefilled answer"]))
    initial = "reasoning"
    if layout == "early end":
        pieces.insert(draw(st.integers(0, min(len(pieces), 6))), END)
    elif layout == "no reasoning":
        initial = "pre"
    elif layout == "opens itself":
        initial = "pre"
        pieces = ["\n", START] + pieces
    elif layout == "prefilled answer":
        initial = "answer"
    if draw(st.booleans()):
        pieces.insert(draw(st.integers(0, len(pieces))), "<EOS>")
    policy = PolicyConfig(
        threshold=draw(st.sampled_from([0.0, 0.3, 0.5, 1.0])),
        early_steps=draw(st.integers(0, 4)),
        max_interventions=draw(st.integers(0, 3)),
        mode="replace",
        prefix=PREFIX,
        refusal=REFUSAL,
        on_budget_exhausted="refuse",
        on_scorer_error="fail_closed",
    )
    return Case(
        pieces=pieces,
        batch_sizes=draw(st.lists(st.integers(8, 64) if long else st.integers(1, 16), min_size=1, max_size=4)),
        initial_section=initial,
        policy=policy,
        budget=draw(st.one_of(st.none(), st.integers(1, 40))),
        max_tokens=draw(st.integers(40, 320) if long else st.integers(1, 80)),
        max_step_tokens=draw(st.integers(1, 20)),
        stop=draw(st.sampled_from([[], ["STOP"], ["ok"], ["\n"], ["step ok"]])),
        scores=draw(st.lists(st.floats(0.0, 1.0), min_size=1, max_size=6)),
        failing_calls=set(draw(st.lists(st.integers(0, 8), max_size=2))),
        cancel_after=draw(st.one_of(st.none(), st.none(), st.integers(0, 60))),
        engine_limits_tokens=draw(st.booleans()),
        engine_own_limit=draw(st.one_of(st.none(), st.none(), st.integers(1, 60))),
        end_on_eos=draw(st.booleans()),
        prefill=draw(st.sampled_from(["", "Sure, here is how:", "Step 1: BAD"])),
        step_regex=draw(st.sampled_from([None, None, r"\.$"])),
        raw_answer=draw(st.booleans()),
        constrains_itself=draw(st.booleans()),
        constrained=draw(st.booleans()),
        logprobs=draw(st.sampled_from([None, 0, 2])),
        ignore_eos=draw(st.booleans()),
        include_stop=draw(st.booleans()),
        history=draw(st.sampled_from([[], [{"role": "system", "content": "Be brief."}],
                                      [{"role": "user", "content": "I write thrillers."}, {"role": "assistant", "content": "Nice."}]])),
    )


@dataclass
class Outcome:
    engine: ScriptedEngine
    session: SteeringSession
    judge: Judge
    reasoning: str = ""
    answer: str = ""
    deltas: int = 0
    cancelled: bool = False
    logprob_serials: list[int] = field(default_factory=list)  # of the entries the client was given, in order
    released: list[Delta] = field(default_factory=list)  # every delta the client was given, in order


def scripted_engine(case: Case, by_position: bool = False) -> ScriptedEngine:
    engine = ScriptedEngine([], case.batch_sizes, enforces_max_tokens=case.engine_limits_tokens, own_limit=case.engine_own_limit,
                            by_position=by_position)
    tok = engine.tokenizer
    engine.script = [tok.eos_token_id if p == "<EOS>" else tok.ids[p] for p in case.pieces]
    engine.constrains_answer_itself = case.constrains_itself
    return engine


def case_session(case: Case, engine: ScriptedEngine, stream_interval: int = 1) -> tuple[SteeringSession, Judge]:
    turns = [*case.history, *([{"role": "assistant", "content": case.prefill}] if case.prefill.strip() else [])]
    history = "\n\n".join(f"{m['role']}: {m['content']}" for m in turns)  # the prefill is read with the conversation too
    judge = Judge(case.scores, case.failing_calls, history=history, prefill=case.prefill)
    conversation = Conversation(case.history + [{"role": "user", "content": "q"}], case.prefill or None)
    session = SteeringSession(
        engine, RenderedPrompt([1, 2, 3], case.initial_section, case.prefill), conversation,  # type: ignore[arg-type]
        SamplingParams(max_tokens=case.max_tokens, temperature=0.0, logprobs=case.logprobs, ignore_eos=case.ignore_eos,
                       spaces_between_special_tokens=not case.include_stop,
                       include_stop_str_in_output=case.include_stop, answer_constraint={"json_object": True} if case.constrained else None),
        case.policy,
        ReasoningConfig(budget_tokens=case.budget, prefill_start=case.initial_section == "reasoning", end_on_eos=case.end_on_eos),
        StepBoundaryDetector(regex=case.step_regex, max_step_tokens=case.max_step_tokens), judge, stop=case.stop,
        stream_interval=stream_interval, warm=judge.warm, raw_text=case.raw_answer)
    judge.session = session
    return session, judge


async def run_case(case: Case, by_position: bool = False) -> Outcome:
    engine = scripted_engine(case, by_position)
    session, judge = case_session(case, engine)
    outcome = Outcome(engine, session, judge)

    async def consume() -> None:
        async for delta in session.run():
            outcome.released.append(delta)
            outcome.logprob_serials += [-int(e.logprob) for e in delta.logprobs]
            outcome.deltas += 1
            if delta.section == "reasoning":
                outcome.reasoning += delta.text
            else:
                outcome.answer += delta.text

    task = asyncio.create_task(consume())
    if case.cancel_after is not None:
        for _ in range(case.cancel_after):
            await asyncio.sleep(0)
        if not task.done():
            task.cancel()
            outcome.cancelled = True
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return outcome


def reference_sections(text: str, initial: str, raw_answer: bool = False) -> tuple[str, str]:
    """Reasoning and answer of a whole output, as vLLM's reasoning parsers split them (`raw_answer`:
    the answer's leading whitespace kept, as a completion continues its prompt)."""
    lead = (lambda answer: answer) if raw_answer else str.lstrip
    if initial == "answer":
        return "", lead(text)
    if initial == "pre":
        stripped = text.lstrip()
        if not stripped.startswith(START):
            return "", lead(text)
        text = stripped[len(START):]
    reasoning, found, answer = text.partition(END)
    if not found:
        return reasoning, ""
    return reasoning, lead(answer)


def reference_raw(text: str, initial: str, stops: list[str], include: bool = False) -> str:
    """A whole output as written (a completion's), its answer cut at the first stop string."""
    at = 0  # where the answer begins
    if initial == "pre" and text.lstrip().startswith(START) or initial == "reasoning":
        end = text.find(END, text.find(START) + len(START) if initial == "pre" else 0)
        at = len(text) if end < 0 else end + len(END)
    return text[:at] + truncate_at_stop(text[at:], stops, include)


def truncate_at_stop(answer: str, stops: list[str], include: bool = False) -> str:
    """The answer up to the first stop string in it, or through it with `include`."""
    hits = [(answer.find(s), len(s)) for s in stops if s in answer]
    if not hits:
        return answer
    at, length = min(hits)
    return answer[: at + length if include else at]


@dataclass
class Replay:
    reasoning_tokens: int
    up_to_stop: int  # tokens up to the one that completes a stop string
    at_budget: int | None  # tokens up to the first point where the reasoning budget is reached, the text settled


def token_by_token(outcome: Outcome, case: Case, sequence: list[int]) -> Replay:
    """A final sequence replayed one token at a time: what the loop counts and decides when it takes
    a batch as one piece must agree."""
    session = outcome.session
    replay = OutputProcessor(outcome.engine.tokenizer, session.reasoning_cfg, case.initial_section, case.stop,  # type: ignore[arg-type]
                             include_stop=case.include_stop)
    at_budget = None
    for n, token in enumerate(sequence, 1):
        replay.release(replay.push(token))
        if (at_budget is None and case.budget is not None and replay.section == "reasoning"
                and replay.reasoning_tokens >= case.budget and replay.settled):
            at_budget = n
        if replay.stopped:
            return Replay(replay.reasoning_tokens, n, at_budget)
    return Replay(replay.reasoning_tokens, len(sequence), at_budget)


LONGEST_PIECE = max(len(p) for p in MODEL_PIECES)


def assert_first_steps_are_marked_first(outcome: Outcome) -> None:
    """A step is scored as a first step (ahead of other requests' later ones) exactly while nothing
    of its response was released: no earlier step was released or appended, and no server text
    (a prefix, an end marker) was sent."""
    steps = outcome.session.report.steps
    assert len(outcome.judge.firsts) == len(steps)
    for k, first in enumerate(outcome.judge.firsts):
        nothing_sent = outcome.judge.inserted_before[k] == 0 and all(s.action not in (Action.RELEASED, Action.APPENDED) for s in steps[:k])
        assert first == nothing_sent, (k, [s.action for s in steps], outcome.judge.inserted_before)


def assert_steps_end_where_they_should(outcome: Outcome, case: Case) -> None:
    """A step ends at the token that completes its first delimiter after some text, or at
    max_step_tokens (a few more while a character or marker is incomplete), never later."""
    if case.step_regex is not None:
        return
    for (text, _), step in zip(outcome.judge.seen, outcome.session.report.steps, strict=True):
        first = next((m.end() for m in re.finditer("\n\n", text) if text[: m.start()].strip()), None)
        assert first is None or len(text) - first < LONGEST_PIECE, f"a step went on past its end: {text!r}"
        # A raw answer (a completion) keeps the whitespace the "pre" section held back until it knew no
        # marker followed: it comes out with the answer's first text, in that text's token.
        glued = case.raw_answer and case.initial_section == "pre" and text.lstrip() and text is outcome.judge.seen[0][0]
        # So does a raw answer's whitespace after the end marker the model wrote: the marker is judged with the step.
        glued = glued or (case.raw_answer and step.section == "answer")
        assert glued or not text.startswith("\n"), f"a step starts at its first text, not at a blank token: {text!r}"
    # (a step that opens the answer with the model's end marker also holds the blank tokens after it, however many)
    assert all(s.tokens <= case.max_step_tokens + 4 for s in outcome.session.report.steps
               if s.section == "reasoning" or case.initial_section != "reasoning"), "a step went on past max_step_tokens"


def client_texts(outcome: Outcome) -> dict[str, str]:
    """The texts a client reads, where `inserted` offsets count: by section, or one text (raw)."""
    if outcome.session.raw_text:
        return {"text": outcome.reasoning + outcome.answer}
    return {"reasoning": outcome.reasoning, "answer": outcome.answer}


def without_inserted(outcome: Outcome) -> dict[str, str]:
    """The client's texts less the spans the report lists as the server's, as a client would cut them."""
    texts = client_texts(outcome)
    for inserted in sorted(outcome.session.report.inserted, key=lambda i: -i.at):
        where = "text" if outcome.session.raw_text else inserted.section
        text = texts[where]
        assert text[inserted.at : inserted.at + len(inserted.text)] == inserted.text, "an inserted span is not where it is listed"
        texts[where] = text[: inserted.at] + text[inserted.at + len(inserted.text) :]
    return texts


def assert_inserted_is_exact(outcome: Outcome) -> None:
    """The client's text less the listed inserted spans is the model's released text, character for
    character; each span holds only what the server wrote."""
    model = without_inserted(outcome)
    raw = outcome.session.raw_text
    for where, text in model.items():
        written = "".join(d.text for d in outcome.released if d.inserted is None and (raw or d.section == where))
        assert text == written, f"the client's {where} less the inserted spans is not the model's text"
    separated = ["\n\n" + PREFIX, "\n" + PREFIX]
    server_texts = {"prefix": separated, "end_marker": ["\n" + END + "\n\n"], "refusal": ["\n\n" + REFUSAL, END + REFUSAL]}
    for inserted in outcome.session.report.inserted:
        assert inserted.text and any(inserted.text in full for full in server_texts[inserted.kind]), inserted


def model_text(outcome: Outcome) -> str:
    """The model's text the client got, without whitespace or the markers a raw text writes out (that
    it is the client's text less the inserted spans is `assert_inserted_is_exact`'s)."""
    return "".join("".join(d.text for d in outcome.released if d.inserted is None and not d.marker).split()).replace(END, "")


SETTINGS = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(cases())
def test_no_unjudged_model_text_reaches_the_client(case: Case) -> None:
    outcome = asyncio.run(run_case(case))
    judged_safe = "".join(text for text, p in outcome.judge.seen if p is not None and p < case.policy.threshold)
    judged_safe = "".join(judged_safe.split()).replace(END, "")  # (a step of the model's end marker alone is judged as it)
    safe_steps = sum(1 for s in outcome.session.report.steps if s.action is Action.RELEASED)
    released = model_text(outcome)
    if safe_steps < case.policy.early_steps:
        # The window was never satisfied: every model character came out of a step judged safe.
        assert judged_safe.startswith(released), (released, judged_safe)
    else:
        # Satisfied: the safe steps came first, anything after them is past the window.
        assert released.startswith(judged_safe) or judged_safe.startswith(released), (released, judged_safe)
    assert not any(PREFIX in text or REFUSAL in text for text, _ in outcome.judge.seen), "the server's own text was judged"
    assert_steps_end_where_they_should(outcome, case)
    assert_first_steps_are_marked_first(outcome)
    assert not outcome.judge.wrong_context, "a step was judged without its conversation"
    assert not outcome.judge.unwarmed, "a step's context was not handed over to prepare when the step began"
    unsafe = [s for s in outcome.session.report.steps if s.action is not Action.RELEASED]
    for step in unsafe:
        assert step.action in (Action.REPLACED, Action.REFUSED)
        if case.constrained and step.section == "answer":
            assert step.action is Action.REFUSED, "a prefix was injected into a constrained answer"
    if outcome.session.finish_reason == "content_filter":
        assert outcome.answer.endswith(REFUSAL)
        assert outcome.session.report.refusal == REFUSAL
    assert_inserted_is_exact(outcome)
    assert_logprobs_only_of_judged_tokens(outcome, case, judged_safe, safe_steps >= case.policy.early_steps)
    assert_the_models_end_marker_shows_only_once_judged(outcome, case, safe_steps >= case.policy.early_steps)
    assert_constrained_answers_are_sampled_constrained(outcome, case)
    assert outcome.engine.active == 0


def assert_the_models_end_marker_shows_only_once_judged(outcome: Outcome, case: Case, satisfied: bool) -> None:
    """That the model closed its reasoning is model output too: inside an unsatisfied window the
    client learns it (an answer it reads, or the marker in a raw text) only where the marker was
    among the tokens of a step judged safe."""
    if satisfied or outcome.cancelled or case.initial_section != "reasoning" or not outcome.engine.generations:
        return
    if case.raw_answer:
        shown = any(d.marker and d.inserted is None and END in d.text for d in outcome.released)
    else:
        shown = (any(d.section == "answer" and d.inserted != "refusal" and d.text for d in outcome.released)
                 and not any(i.kind == "end_marker" for i in outcome.session.report.inserted))
    if not shown:
        return
    tok, sequence = outcome.engine.tokenizer, outcome.engine.generations[0].sequence
    written = next((k for k in range(1, len(sequence) + 1) if END in tok.decode(sequence[:k])), None)
    safe_at = [at for at, (_, p) in zip(outcome.judge.at, outcome.judge.seen, strict=True) if p is not None and p < case.policy.threshold]
    assert written is not None and safe_at and written <= max(safe_at), "the model's end marker reached the client unjudged"


def assert_constrained_answers_are_sampled_constrained(outcome: Outcome, case: Case) -> None:
    """A structured answer is sampled under its constraint from its first token: the engine is told
    before any answer text is kept, and never told while the output is still in the reasoning."""
    if not case.constrained or not outcome.engine.generations or outcome.cancelled:
        return
    if case.constrains_itself:  # nothing is resampled: the backend constrains from where the answer begins
        assert all(g.answer_begun_at is None for g in outcome.engine.generations), "the loop resampled an answer the engine constrains"
        return
    generation = outcome.engine.generations[0]
    tok = outcome.engine.tokenizer
    def unconstrained(answer: str) -> bool:
        # Text held back as a possible marker (a "<" that might open "</think>"), or as part of a
        # character, is known to be answer only once later text settles it: that much may precede
        # the constraint.
        answer = answer.replace("\ufffd", "").strip()
        return bool(answer) and not any(marker.startswith(answer) for marker in (START, END))

    if generation.answer_begun_at is None:
        assert not unconstrained(outcome.answer.replace(REFUSAL, "")), "an answer was sampled without its constraint"
        return
    before = tok.decode(generation.sequence[: generation.answer_begun_at])
    _, answer = reference_sections(before, case.initial_section, case.raw_answer)  # the client's prefill is not the model's
    assert not unconstrained(answer), f"answer text {answer!r} was kept from before the constraint began"


def assert_logprobs_only_of_judged_tokens(outcome: Outcome, case: Case, judged_safe: str, satisfied: bool) -> None:
    """Logprob entries carry model output: the client gets an entry only with text judged safe (or past
    the window), so never for a token rolled back (a discarded step, an unread rest of a batch), nor
    for a blank token no judged step followed; inside the window never an alternative; and once a
    satisfied window's response has ended, every sampled token's entry of the final sequence, in order."""
    if case.logprobs is None:
        assert not outcome.logprob_serials, "logprob entries that were not asked for"
    if not outcome.engine.generations:
        return
    generation = outcome.engine.generations[0]
    assert not set(outcome.logprob_serials) & generation.rolled_back, "a logprob entry of a token that did not go out"
    final = [-int(e.logprob) for e in generation.entries if e is not None]
    assert final[: len(outcome.logprob_serials)] == outcome.logprob_serials
    tok = outcome.engine.tokenizer
    # The text each position of the final sequence (server tokens included) brings, as the client reads it.
    replay = OutputProcessor(tok, outcome.session.reasoning_cfg, case.initial_section, [])  # type: ignore[arg-type]
    text_at = ["".join(d.text for d in replay.push(token)) for token in generation.sequence]
    at_serial = {-int(e.logprob): at for at, e in enumerate(generation.entries) if e is not None}
    given = "".join("".join(text_at[at_serial[serial]] for serial in outcome.logprob_serials).split()).replace(END, "")
    if not satisfied:
        assert judged_safe.startswith(given), f"logprob entries of unjudged tokens: {given!r} beyond {judged_safe!r}"
        if case.policy.threshold == 0.0:
            assert not outcome.logprob_serials, "at threshold 0 a logprob entry came out of the window"
    # The window ends where the early_steps-th step judged safe ends (at once when nothing is watched).
    safe_at = [at for at, (_, p) in zip(outcome.judge.at, outcome.judge.seen, strict=True) if p is not None and p < case.policy.threshold]
    window_end = 0 if case.policy.early_steps == 0 else safe_at[case.policy.early_steps - 1] if satisfied else None
    position = {-int(e.logprob): at for at, e in enumerate(generation.entries) if e is not None}
    for entry in (e for d in outcome.released for e in d.logprobs):
        inside = window_end is None or position[-int(entry.logprob)] < window_end
        assert not entry.top if inside else bool(entry.top) == bool(case.logprobs), \
            f"alternatives {'released inside' if inside else 'missing past'} the window"
    if satisfied and case.logprobs is not None and not outcome.cancelled and outcome.session.finish_reason != "content_filter":
        assert outcome.logprob_serials == final, "the final sequence's logprobs were not all given"


@SETTINGS
@given(cases(), st.sampled_from(["replace", "append"]), st.sampled_from(["refuse", "release"]))
def test_client_text_and_usage_match_the_final_sequence(case: Case, mode: str, on_budget_exhausted: str) -> None:
    """Whatever the policy, in the modes outside the guarantee too."""
    case.policy = case.policy.model_copy(update={"mode": mode, "on_budget_exhausted": on_budget_exhausted})
    check_final_sequence(case)


@SETTINGS
@given(cases(long=True))
def test_batches_taken_in_pieces_decide_as_token_by_token(case: Case) -> None:
    """Long outputs in big batches: the loop takes tokens in pieces where no token in them needs a
    decision of its own; counts, stops, the reasoning budget and step ends come out the same."""
    check_final_sequence(case)


@SETTINGS
@given(cases(long=True), st.sampled_from([[8], [64], [256], [3, 17]]))
def test_batching_changes_no_decision(case: Case, batch_sizes: list[int]) -> None:
    """The same deterministic model read one token at a time and in big batches: the loop must judge
    the same steps, take the same actions, release the same text and end the same way."""
    case.cancel_after = None
    outcomes = []
    for sizes in ([1], batch_sizes):
        case.batch_sizes = sizes
        outcome = asyncio.run(run_case(case, by_position=True))
        session = outcome.session
        outcomes.append((outcome.reasoning, outcome.answer, outcome.judge.seen, outcome.engine.generations[0].sequence,
                         session.finish_reason, session.output_tokens, session.reasoning_tokens,
                         [(s.index, s.action, s.tokens) for s in session.report.steps]))
    assert outcomes[0] == outcomes[1]


@SETTINGS
@given(cases(long=True), st.sampled_from([[1], [8], [3, 17]]), st.integers(2, 16))
def test_a_stream_interval_changes_only_how_text_is_grouped(case: Case, batch_sizes: list[int], interval: int) -> None:
    """With `stream_interval` k the client gets the same text, judged the same way, in fewer events:
    after the first, each goes out at least k tokens after the one before (the last, at the end,
    may come sooner)."""
    case.cancel_after, case.batch_sizes = None, batch_sizes

    async def run(k: int) -> tuple[tuple[object, ...], list[int]]:
        engine = scripted_engine(case, by_position=True)
        session, judge = case_session(case, engine, stream_interval=k)
        text, sent_at = {"reasoning": "", "answer": ""}, []
        async for delta in session.run():
            text[delta.section] += delta.text
            if not sent_at or sent_at[-1] != session.output_tokens:
                sent_at.append(session.output_tokens)
        return (text["reasoning"], text["answer"], judge.seen, engine.generations[0].sequence, session.finish_reason,
                session.output_tokens, [(s.index, s.action, s.tokens) for s in session.report.steps]), sent_at

    every, _ = asyncio.run(run(1))
    grouped, sent_at = asyncio.run(run(interval))
    assert grouped == every
    gaps = [later - earlier for earlier, later in zip(sent_at[:-1], sent_at[1:-1], strict=False)]
    assert all(gap >= interval for gap in gaps), (sent_at, interval)


def check_final_sequence(case: Case) -> None:
    outcome = asyncio.run(run_case(case))
    assert outcome.engine.active == 0, "a slot is still held after the request ended"
    if outcome.cancelled:
        return
    session = outcome.session
    (generation,) = outcome.engine.generations
    tok = outcome.engine.tokenizer
    assert_steps_end_where_they_should(outcome, case)
    assert session.output_tokens == len(generation.sequence), "usage counts the final sequence"
    assert session.output_tokens <= case.max_tokens, "the response stays within max_tokens, server texts included"
    replay = token_by_token(outcome, case, generation.sequence)
    assert session.reasoning_tokens == replay.reasoning_tokens, "reasoning tokens are counted exactly"
    if not session.report.injected_tokens or "\n" not in case.stop:  # (else the prefix's separator may have stopped it)
        assert replay.up_to_stop == len(generation.sequence), "the sequence ends at the token that completes a stop string"
    if not session.report.interventions and any(i.kind == "end_marker" for i in session.report.inserted):
        marker = tok.encode("\n" + END + "\n\n")
        inserted_at = next(i for i in range(len(generation.sequence)) if generation.sequence[i : i + len(marker)] == marker)
        # No model token past the budget: the server's marker comes first (or the EOS closed the reasoning earlier).
        assert replay.at_budget is None or inserted_at <= replay.at_budget, "the reasoning closes at its budget"
    # Text is coalesced per engine batch: a few deltas a batch (model text per section, server texts), never one a token.
    # Each group of deltas handed out at once has one delta per run of section and origin.
    markers = 2 if case.raw_answer else 0  # a raw text's markers go out as deltas of their own
    assert outcome.deltas <= generation._calls + 2 + markers + 3 * len(session.report.inserted) + len(session.report.interventions)
    assert SEQUENCE_END not in generation.sequence, "the engine's end is never part of the sequence"
    if not case.ignore_eos:
        assert tok.eos_token_id not in generation.sequence
    assert session.finish_reason in ("stop", "length", "content_filter")
    if case.raw_answer:  # the text as written, markers and all
        written = reference_raw(tok.decode(generation.sequence), case.initial_section, case.stop, case.include_stop)
        client = outcome.reasoning + outcome.answer
        if session.finish_reason == "content_filter":
            client = client.removesuffix(REFUSAL).removesuffix("\n\n").removesuffix(END)
            assert written.startswith(client) and len(written) - len(client) < 2 * len(END) + 2, (client, written)
        else:
            assert client == written
        return
    reasoning, answer = reference_sections(tok.decode(generation.sequence), case.initial_section, case.raw_answer)
    answer = truncate_at_stop(answer, case.stop, case.include_stop)
    if session.finish_reason == "content_filter":
        client_answer = outcome.answer.removesuffix(REFUSAL).rstrip("\n")
        # A refusal drops at most a half-seen marker of the kept text.
        assert reasoning.startswith(outcome.reasoning) and len(reasoning) - len(outcome.reasoning) < len(END)
        assert answer.rstrip("\n").startswith(client_answer)
    else:
        assert outcome.reasoning == reasoning
        assert outcome.answer == answer


@given(cases())
@settings(max_examples=150, deadline=None)
def test_paper_mode_spends_the_budget_then_releases_instead_of_refusing(case: Case) -> None:
    case.policy = case.policy.model_copy(update={"on_budget_exhausted": "release"})
    outcome = asyncio.run(run_case(case))
    report = outcome.session.report
    assert outcome.engine.active == 0
    # Only a scorer failure refuses, or a breach in a constrained answer, which no prefix can fix.
    assert all(s.action is not Action.REFUSED or s.scorer_error or (case.constrained and s.section == "answer") for s in report.steps)
    assert len(report.interventions) <= case.policy.max_interventions
    # Before the budget is spent the window holds as in refuse mode: no unsafe step was released.
    assert not any(s.action is Action.RELEASED and s.p_unsafe is not None and s.p_unsafe >= case.policy.threshold
                   and not s.scorer_error for s in report.steps)


async def run_script(pieces: list[str], early_steps: int = 3, max_tokens: int = 60, own_limit: int | None = None,
                     initial: str = "reasoning") -> Outcome:
    return await run_case(Case(
        pieces=pieces, batch_sizes=[1], initial_section=initial, budget=None, max_tokens=max_tokens, max_step_tokens=20,
        policy=PolicyConfig(threshold=0.5, early_steps=early_steps, max_interventions=2, prefix=PREFIX, refusal=REFUSAL),
        stop=[], scores=[0.0], failing_calls=set(), cancel_after=None, engine_limits_tokens=True,
        engine_own_limit=own_limit, end_on_eos=True, prefill="", history=[]))


def test_an_interval_of_one_sends_every_batch_where_ids_are_not_tokens():
    """An engine whose ids are bytes (the proxy: four ids a token) still sends each batch's text at
    once at the default interval."""
    pieces = ["a", " ok", "b", ".", " step", "a", END, "b", " ok", ".", "a", "b"]
    case = Case(pieces=pieces, batch_sizes=[1], initial_section="reasoning", budget=None, max_tokens=60, max_step_tokens=20,
                policy=PolicyConfig(threshold=0.5, early_steps=0, max_interventions=2, prefix=PREFIX, refusal=REFUSAL),
                stop=[], scores=[0.0], failing_calls=set(), cancel_after=None, engine_limits_tokens=True,
                engine_own_limit=None, end_on_eos=True, prefill="", history=[])
    engine = scripted_engine(case)
    engine.ids_per_token = 4

    async def texts() -> list[str]:
        session, _ = case_session(case, engine)
        return [delta.text async for delta in session.run()]

    assert asyncio.run(texts()) == [p for p in pieces if p != END]


def test_an_empty_reasoning_does_not_make_the_first_answer_token_a_step():
    outcome = asyncio.run(run_script(["\n", END, "\n\n", "S", "a", " BAD", ".\n\n", "b"], early_steps=1))
    assert [text for text, _ in outcome.judge.seen][0] == "Sa BAD.\n\n", "the answer's first step is judged whole"
    assert "BAD" not in outcome.answer
    assert outcome.session.report.steps[0].section == "answer"


def test_an_end_marker_the_model_writes_is_judged_with_the_answer_that_follows():
    """The model closes its reasoning and answers unsafely: the marker is rolled back with the answer's
    step, so the prefix goes into the reasoning and the client never learns that the model had closed it."""
    outcome = asyncio.run(run_script(["a", ".\n\n", END, "\n\n", "S", " BAD", ".\n\n", "b", ".\n\n"]))
    report = outcome.session.report
    assert [(s.section, s.action) for s in report.steps][:2] == [("reasoning", Action.RELEASED), ("answer", Action.REPLACED)]
    assert (report.inserted[0].kind, report.inserted[0].section) == ("prefix", "reasoning")
    assert outcome.reasoning.startswith("a.\n\n" + PREFIX) and "BAD" not in outcome.reasoning + outcome.answer


def test_a_breach_on_the_engines_own_length_stop_is_refused_not_replaced():
    outcome = asyncio.run(run_script(["a", " step", " BAD", " step", " step"], own_limit=4))
    (step,) = outcome.session.report.steps
    assert step.action is Action.REFUSED and outcome.session.finish_reason == "content_filter"
    assert outcome.session.report.interventions == []


def test_a_stop_string_across_a_held_step_and_the_next_piece_ends_the_sequence_there():
    outcome = asyncio.run(run_case(Case(
        pieces=["a", END, "b", " step", " ok", " step", "a", ".\n\n"], batch_sizes=[4], initial_section="reasoning",
        budget=None, max_tokens=60, max_step_tokens=20, stop=["step ok"], scores=[0.0], failing_calls=set(), cancel_after=None,
        policy=PolicyConfig(threshold=0.5, early_steps=3, max_interventions=2, prefix=PREFIX, refusal=REFUSAL),
        engine_limits_tokens=True, engine_own_limit=None, end_on_eos=True, prefill="", history=[])))
    tok = outcome.engine.tokenizer
    assert outcome.answer == "b "
    assert outcome.engine.generations[0].sequence == [tok.ids[p] for p in ["a", END, "b", " step", " ok"]]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases(), st.integers(2, 4))
def test_choices_run_side_by_side_as_each_would_alone(case: Case, n: int) -> None:
    """`n` > 1: the choices' deltas, interleaved through one queue, are each choice's own, as it would
    run alone; each ends once; a client that leaves early leaves no slot held."""
    case.scores, case.failing_calls = [0.0], set()  # the judge's answers must not depend on the interleaving

    def own(choice: int) -> Case:  # each choice its own text, as each has its own seed
        return dataclasses.replace(case, pieces=case.pieces[choice:] + case.pieces[:choice])

    async def alone(choice: int) -> str:
        session, _ = case_session(own(choice), scripted_engine(own(choice), by_position=True))
        return "".join([f"{d.section}:{d.text}|" async for d in session.run()])

    async def together() -> tuple[dict[int, str], dict[int, int], int, bool]:
        engines = [scripted_engine(own(choice), by_position=True) for choice in range(n)]
        sessions = [case_session(own(choice), engine)[0] for choice, engine in enumerate(engines)]
        texts, ends = dict.fromkeys(range(n), ""), dict.fromkeys(range(n), 0)

        async def consume() -> None:
            async with contextlib.aclosing(choice_runs(sessions)) as runs:
                async for index, delta in runs:
                    assert not ends[index], "a delta after its choice ended"
                    if delta is None:
                        ends[index] += 1
                    else:
                        texts[index] += f"{delta.section}:{delta.text}|"

        task = asyncio.create_task(consume())
        for _ in range(case.cancel_after or 0):
            await asyncio.sleep(0)
        cancelled = case.cancel_after is not None and not task.done()
        if cancelled:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        sampled = sum(engine.serial for engine in engines)
        for _ in range(20):
            await asyncio.sleep(0)
        assert sum(engine.serial for engine in engines) == sampled, "a choice went on generating after the response ended"
        return texts, ends, sum(engine.active for engine in engines), cancelled

    texts, ends, held, cancelled = asyncio.run(together())
    assert held == 0, "a choice's slot is still held after the response ended"
    if not cancelled:
        assert ends == dict.fromkeys(range(n), 1)
        assert texts == {choice: asyncio.run(alone(choice)) for choice in range(n)}


@given(ignore_eos=st.booleans())
def test_ignore_eos_writes_on_past_the_models_end_of_sequence(ignore_eos):
    """The model ends its answer with EOS and would write on: with ignore_eos the EOS is a token like
    any other and the answer runs on to the engine's limit (max_tokens), the steering unchanged."""
    pieces = [END, "a", " ok", ".", "<EOS>", "b", " step", "."]
    case = Case(pieces=pieces, batch_sizes=[2], initial_section="reasoning", budget=None, max_tokens=6, max_step_tokens=20,
                policy=PolicyConfig(threshold=0.5, early_steps=3, max_interventions=2, prefix=PREFIX, refusal=REFUSAL),
                stop=[], scores=[0.0], failing_calls=set(), cancel_after=None, engine_limits_tokens=True,
                engine_own_limit=None, end_on_eos=True, prefill="", history=[], ignore_eos=ignore_eos)
    outcome = asyncio.run(run_case(case))
    (generation,) = outcome.engine.generations
    if ignore_eos:
        assert (outcome.answer, outcome.session.finish_reason) == ("a ok.b", "length")  # six tokens, the EOS one of them
        assert outcome.session.output_tokens == 6 and outcome.engine.tokenizer.eos_token_id in generation.sequence
    else:
        assert (outcome.answer, outcome.session.finish_reason) == ("a ok.", "stop")
