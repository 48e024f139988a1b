"""One request's steering: the watched window, hold-back, the policy's decisions, interventions and
the refusal. Output processing (text, sections, stops, counts) is `OutputProcessor`'s; which engine
or scorer runs is not known here.

The guarantee, in replace mode with `on_budget_exhausted=refuse` (the defaults): every piece of
model text released to the client was judged safe as part of a step, or comes after the first
`early_steps` steps of the output were judged safe. A watched step is held back until judged; a
breach rolls the step back and injects the prefix, or, with no intervention left (or a scorer
failure under fail_closed), ends the response with the refusal (`content_filter`). The server's
own texts are context for the scorer, never the judged step, and are listed in the report.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import anyio

from reward_models.base import StepItem, StepScore
from safethink_server.engines.base import Engine, Generation, SamplingParams, SequenceCursor
from safethink_server.prompt import Conversation, RenderedPrompt, scoring_context
from safethink_server.schema import (
    Action,
    InsertedKind,
    InterventionRecord,
    PolicyConfig,
    ReasoningConfig,
    ReportDetail,
    SteeringReport,
    StepRecord,
)
from safethink_server.steering.held import HeldStep
from safethink_server.steering.hooks import ScoreFn, SteeringObserver
from safethink_server.steering.outbox import Outbox
from safethink_server.steering.output import Delta, OutputProcessor
from safethink_server.steering.policy import decide, is_watching
from safethink_server.steering.steps import StepBoundaryDetector

__all__ = ["Delta", "ReasoningConfig", "ScoreFn", "SteeringObserver", "SteeringSession"]


class SteeringSession:
    def __init__(
        self,
        engine: Engine,
        prompt: RenderedPrompt,
        conversation: Conversation,
        sampling: SamplingParams,
        policy: PolicyConfig,
        reasoning: ReasoningConfig,
        detector: StepBoundaryDetector,
        score: ScoreFn,
        stop: list[str] | None = None,
        observer: SteeringObserver | None = None,
        model: str | None = None,
        skip_special_tokens: bool = True,
        stream_interval: int = 1,
        warm: Callable[[StepItem], None] | None = None,
        raw_text: bool = False,
        report_detail: ReportDetail = "full",
    ) -> None:
        self.engine = engine
        self.prompt = prompt
        self.conversation = conversation
        self.sampling = sampling
        self.policy = policy
        self.reasoning_cfg = reasoning
        self.detector = detector
        self.score = score
        self.observer = observer or SteeringObserver()
        self.model = model
        self.raw_text = raw_text  # the output as written (/v1/completions): markers kept, the answer's whitespace too
        self.output = OutputProcessor(engine.tokenizer, reasoning, prompt.initial_section, stop or [], skip_special_tokens, raw_text,
                                      sampling.include_stop_str_in_output, sampling.spaces_between_special_tokens)
        self.report = SteeringReport()
        self.report_detail = report_detail
        self.finish_reason: str | None = None
        self.generation: Generation | None = None
        self._cursor: SequenceCursor | None = None
        self._latest_turn, self._history = scoring_context(conversation)
        self._eos = engine.end_ids(sampling)
        self._step_index = 1
        self._held: HeldStep | None = None
        self._reasoning_closed_by_server = False
        self._constrained = sampling.answer_constraint is not None  # a breach in the answer is refused
        self._resamples_answer_start = self._constrained and not engine.constrains_answer_itself
        self._answer_begun = False
        # Where ids are not tokens (upstream bytes), an interval of one token is still every batch.
        self.outbox = Outbox(self.output, self.report, sampling.logprobs, raw_text,
                             0 if stream_interval <= 1 else stream_interval * engine.ids_per_token)
        self._note_window()
        self._warm = warm
        self._warmed_for: str | None = None  # the released text (stripped) the scorer was last warmed with

    @property
    def client_report(self) -> SteeringReport | None:
        """The report as the client may read it (the audit log reads `report`)."""
        return self.report.disclosed(self.report_detail)

    # --- counts -------------------------------------------------------------------------------
    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt.ids)

    @property
    def output_tokens(self) -> int:
        return self.output.output_tokens

    @property
    def reasoning_tokens(self) -> int:
        return self.output.reasoning_tokens

    # --- lifecycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        """Take an engine slot (waiting in the engine's queue if needed). From here on the slot is
        this session's until `close`."""
        if self.generation is None:
            self.generation = await self.engine.start(self.prompt, self.sampling, self.conversation, model=self.model)
            self._cursor = SequenceCursor(self.generation)
            await self._begin_answer_once_in_it()

    async def close(self) -> None:
        """Free the engine slot. Shielded: a cancelled request (a client gone) must not cut the abort short."""
        if self.generation is not None:
            with anyio.CancelScope(shield=True):
                await self.generation.abort()

    async def run(self) -> AsyncIterator[Delta]:
        try:
            await self.start()
            while self.finish_reason is None:
                tokens = await self.cursor.peek()
                if len(tokens) == 1 or not self._in_one_piece(tokens):
                    await self._on_token(await self.cursor.next())
                if self.finish_reason is None and self._out_of_tokens():
                    self.finish_reason = "length"
                if self.outbox.deltas and not self.cursor.unread and self.outbox.due():
                    # A whole engine batch is processed: its text goes out together, one delta per section.
                    for delta in self.outbox.take(self.generation):
                        yield delta
            await self._finish()
            await self.cursor.rollback(0)  # the unread rest of the last batch is not part of the sequence
            for delta in self.outbox.take(self.generation):
                yield delta
        finally:
            await self.close()

    def _note_window(self) -> None:
        """Where the watched window ends: from here on entries go out whole."""
        if not self._watching():
            self.outbox.window_ended()

    @property
    def cursor(self) -> SequenceCursor:
        assert self._cursor is not None, "start() first"
        return self._cursor

    # --- one token ----------------------------------------------------------------------------
    def _watching(self) -> bool:
        return is_watching(self.policy, self._step_index, len(self.report.interventions))

    async def _on_token(self, token: int) -> None:
        if token in self._eos:
            await self._on_end()
        else:
            await self._on_model_token(token)

    def _in_one_piece(self, tokens: list[int]) -> bool:
        """A batch's model tokens taken as one piece, with no per-token work, where that decides
        nothing differently: past the watched window, or inside a held step that has begun and does
        not end in the piece (where a step's end is monotone: once its text holds a delimiter, a
        stop string, or max_step_tokens, more text keeps it so; a step regex is followed token by
        token). Where a token needs a decision of its own (a step's end, a section change, a stop
        string), the longest piece before it is found by bisection and taken, and False says that
        the next token goes alone; so do the end and the reasoning budget. True: the piece was taken
        whole."""
        held = self._held
        if held is None and self._watching():
            return False  # a step starts at its first text, token by token
        if held is not None and (not held.text.strip() or not self.detector.monotone):
            return False
        n = min((tokens.index(eos) for eos in self._eos if eos in tokens), default=len(tokens))
        if self.engine.counts_tokens:
            n = min(n, self.sampling.max_tokens - self.output.output_tokens)
        budget = self.reasoning_cfg.budget_tokens
        if budget is not None and self.output.section == "reasoning":
            n = min(n, budget - 1 - self.output.reasoning_tokens)  # the token that reaches it goes alone
        if n < 2:
            return False
        checkpoint = self.output.checkpoint()  # every rejected piece is undone back to it

        def push(k: int) -> list[Delta] | None:
            """The first `k` tokens pushed, if they decide nothing; else None and nothing pushed."""
            deltas = self.output.push_through(tokens[:k])
            if deltas is not None and held is not None and self._ends_step(held, deltas, k):
                self.output.restore(checkpoint)
                return None
            return deltas

        whole, taken = True, n
        deltas = push(n)
        if deltas is None:
            # Only verified pieces are taken: `fine` was pushed without a decision, `decides` was not.
            fine, decides = 0, n
            while decides - fine > 1:
                middle = (fine + decides) // 2
                if push(middle) is None:
                    decides = middle
                else:
                    self.output.restore(checkpoint)
                    fine = middle
            if fine == 0:
                return False
            deltas, whole, taken = push(fine), False, fine
            assert deltas is not None, "a piece pushed once pushes again"
        self.cursor.advance(taken)
        if held is None:
            self._release(deltas)
        else:
            held.tokens += taken
            held.add(deltas)
        return whole

    def _ends_step(self, held: HeldStep, deltas: list[Delta], n_tokens: int) -> bool:
        """Whether `deltas` (of one section, the step's) would end the held step."""
        text = "".join(d.text for d in deltas)
        answer = text if deltas and deltas[0].section == "answer" else ""
        return self.detector.is_complete(held.text + text, held.tokens + n_tokens) or self._reaches_stop(held, answer)

    def _reaches_stop(self, held: HeldStep, more_answer: str = "") -> bool:
        """Whether the held step's answer text (and `more_answer`) holds a stop string; the text is
        joined only when there are stop strings."""
        stop = self.output.stop
        return bool(stop.stops) and stop.would_stop(held.answer_text + more_answer)

    def _out_of_tokens(self) -> bool:
        """The session's own stop at max_tokens (an engine whose ids are not tokens stops itself)."""
        return self.engine.counts_tokens and self.output.output_tokens >= self.sampling.max_tokens

    def _fits(self, n_ids: int) -> bool:
        """Whether `n_ids` more ids stay within max_tokens (estimated where ids are not tokens)."""
        return (self.output.output_tokens + n_ids) / self.engine.ids_per_token <= self.sampling.max_tokens

    async def _on_model_token(self, token: int) -> None:
        if self._held is None and self._watching():
            self._held = self._new_step()
        # Where the model may answer at once (no reasoning opened: the "pre" section), the token that
        # shows it is answering carries answer text sampled without the constraint.
        before = self.output.checkpoint() if self._resamples_answer_start and not self._answer_begun and self.output.section == "pre" else None
        deltas = self.output.push(token)
        if before is not None and any(d.section == "answer" and d.text.strip() for d in deltas):
            self.output.restore(before)
            await self.cursor.rollback(1)  # sampled again under the constraint; a held step goes on
            await self._begin_answer()
            return
        held = self._held
        if held is not None:
            held.tokens += 1
            held.add(deltas)
            if not held.text.strip() and self.output.settled and not held.opened_the_answer(self.output.section):
                # A step starts at its first text. Tokens before it (a start marker, blank lines)
                # belong to no step: their whitespace goes out as is, their logprob entries only with
                # the next step judged safe, and a rollback never undoes the marker that opened the reasoning.
                self._held = None
                self._release(held.deltas)
                self._held = held = self._new_step()
            # A step is judged once its text is all known (no marker half-seen) and it has ended:
            # at a delimiter, at max_step_tokens, where the section changed, or at a stop string
            # (so that the sequence ends at the token that completes it).
            elif self.output.settled and (held.ended_by_section(self.output.section) or self.detector.is_complete(held.text, held.tokens)
                                          or self._reaches_stop(held)):
                await self._judge()
        else:
            self._release(deltas)
        await self._begin_answer_once_in_it()
        if self.finish_reason is not None or self._out_of_tokens():
            return
        budget = self.reasoning_cfg.budget_tokens
        if (budget is not None and self.output.section == "reasoning" and self.output.reasoning_tokens >= budget
                and self.output.settled):
            if self._held is not None:
                await self._judge()
            if self.finish_reason is None and self.output.section == "reasoning" and self.output.reasoning_tokens >= budget:
                await self._close_reasoning()

    async def _on_end(self) -> None:
        """The engine's EOS: it is never kept. A held step is judged; a replacement goes on, unless
        the engine stopped at its own token limit (then nothing can replace it)."""
        by_length = self.cursor.finished_by_length
        await self.cursor.rollback(1)
        in_reasoning = self.output.section == "reasoning"
        if self._held is None:
            self._release(self.output.end_of_text())  # text held back for a marker: after the window
        else:
            self._held.add(self.output.end_of_text())
            action = await self._judge(final=by_length)
            if action in (Action.REPLACED, Action.APPENDED) or self.finish_reason is not None:
                return
        if by_length:
            self.finish_reason = "length"
        elif in_reasoning and self.reasoning_cfg.end_on_eos and not self._reasoning_closed_by_server:
            await self._close_reasoning()
        else:
            self.finish_reason = "stop"

    def _release(self, deltas: list[Delta], final: bool = False, judged: bool = False) -> None:
        """The one release gate: what passes here is all a client may read. `judged`: the text of a step
        judged safe; text past the window counts as judged too. Only judged text releases the logprob
        entries of its tokens (and of the blank tokens before it)."""
        if not self.output.stopped and (judged or (self._held is None and not self._watching())):  # past a stop nothing goes out
            self.outbox.judged_so_far()
        self.outbox.add(self.output.release(deltas, final=final))
        if self.output.stopped and self.finish_reason is None:
            self.finish_reason = "stop"

    # --- judging ------------------------------------------------------------------------------
    async def _judge(self, final: bool = False) -> Action:
        """Judge the held step. `final`: no tokens are left to replace it with."""
        step, self._held = self._held, None
        assert step is not None
        opened = step.opened_the_answer(self.output.section)  # the model's end marker alone
        if not step.text.strip() and not opened:
            self._release(step.deltas)
            return Action.RELEASED
        started = time.perf_counter()
        generation_ms = round((started - step.began) * 1000, 3)
        # The end marker the model wrote with no text after it yet (at the end, a stop string or
        # max_step_tokens) is judged as what it is: that the model closed its reasoning here.
        first = self._step_index == 1 and not self.report.inserted  # no text released yet (whitespace aside), ours or the model's
        score, error = await self._score(step.text if step.text.strip() else self.reasoning_cfg.end_marker, first)
        p_unsafe = score.p_unsafe
        score_ms = round((time.perf_counter() - started) * 1000, 3)
        self.observer.step_scored(p_unsafe, error=error, first=first, wait_s=score_ms / 1000)
        action = decide(self.policy, p_unsafe, len(self.report.interventions), scorer_error=error)
        if final and action in (Action.REPLACED, Action.APPENDED):
            action = Action.REFUSED if self.policy.on_budget_exhausted == "refuse" else Action.WITHHELD
        if self._constrained and (step.section == "answer" or opened) and action in (Action.REPLACED, Action.APPENDED):
            action = Action.REFUSED  # a constrained answer cannot take a prefix: it would break the structure
        record = StepRecord(index=self._step_index, section="answer" if opened else step.section, p_unsafe=p_unsafe, action=action,
                            scorer_error=error, tokens=step.tokens, score_ms=score_ms, generation_ms=generation_ms,
                            queue_ms=score.queue_ms, forward_ms=score.forward_ms)
        self.report.steps.append(record)
        if action in (Action.RELEASED, Action.APPENDED):
            self._release(step.deltas, judged=True)
            self._step_index += 1
            self._note_window()
            if action is Action.APPENDED and (self.finish_reason is not None  # the step hit a stop string
                                              or not await self._intervene(self._step_index - 1, p_unsafe, discarded=0)):
                record.action = action = Action.RELEASED  # no room for the prefix: released as is
            return action
        await self._discard(step)
        if action is Action.REPLACED:
            if await self._intervene(self._step_index, p_unsafe, discarded=step.tokens):  # the replacement keeps the index
                self.report.discarded_tokens += step.tokens
                return action
            record.action = action = Action.REFUSED if self.finish_reason == "content_filter" else Action.WITHHELD
            self.report.withheld_tokens += step.tokens
        else:
            self.report.withheld_tokens += step.tokens
            if action is Action.REFUSED:
                self._refuse()
        return action

    async def _discard(self, step: HeldStep) -> None:
        await self.cursor.rollback(step.tokens)
        self.output.restore(step.checkpoint)

    def _new_step(self) -> HeldStep:
        """A watched step begins: its context is known now, and the scorer may prepare it while the
        model writes the step."""
        if self._warm is not None:
            released = self.output.released.strip()  # as the scorer reads it: blank lines between steps change nothing
            if released != self._warmed_for:
                self._warmed_for = released
                self._warm(self._item(""))
        return HeldStep(self.output.checkpoint())

    def _item(self, step_text: str) -> StepItem:
        return StepItem(prompt=self._latest_turn, history=self._history,
                        reasoning=self.prompt.assistant_text + self.output.released, step=step_text)

    async def _score(self, step_text: str, first: bool) -> tuple[StepScore, bool]:
        """The step's score (with its wait and forward times where the scorer gave them), and whether
        the scorer failed. `first`: nothing of the response released yet, so it is scored first."""
        try:
            return await asyncio.wait_for(self.score(self._item(step_text), first), timeout=self.policy.scorer_timeout_s), False
        except Exception:
            return StepScore(p_unsafe=1.0 if self.policy.on_scorer_error == "fail_closed" else 0.0), True

    # --- the server's own texts ---------------------------------------------------------------
    async def _intervene(self, step_index: int, p_unsafe: float, discarded: int) -> bool:
        """Inject the prefix; False when it does not fit under max_tokens (the response then ends)."""
        injected = await self._insert(self._separated(self.policy.prefix), "prefix")
        if injected is None:  # nothing can replace the step
            if discarded and self.policy.on_budget_exhausted == "refuse":
                self._refuse()
            else:
                self.finish_reason = "length"
            return False
        self.report.interventions.append(InterventionRecord(
            step=step_index, p_unsafe=p_unsafe, mode=self.policy.mode, prefix=self.policy.prefix,
            discarded_tokens=discarded, injected_tokens=injected))
        self.observer.intervention(step_index)
        self._note_window()
        return True

    def _separated(self, prefix: str) -> str:
        """The prefix starts a new paragraph when the released text does not end in one."""
        released = self.prompt.assistant_text + self.output.released
        if not released or released.endswith("\n\n"):
            return prefix
        return ("\n" if released.endswith("\n") else "\n\n") + prefix

    async def _close_reasoning(self) -> None:
        self._reasoning_closed_by_server = True
        if await self._insert("\n" + self.reasoning_cfg.end_marker + "\n\n", "end_marker") is None:
            self.finish_reason = "length"

    async def _insert(self, text: str, kind: InsertedKind) -> int | None:
        """Inject `text` into the sequence (the engine prefills only its ids) and release it as the
        server's own; None when it would not fit under max_tokens. Never part of a held step: one
        is judged or discarded before this."""
        assert self._held is None
        ids = self.engine.tokenizer.encode(text, add_special_tokens=False)
        if not self._fits(len(ids)):
            return None
        await self.cursor.inject(ids)
        self.report.injected_tokens += len(ids)
        self.observer.injected(len(ids))
        self.outbox.open_insert = None  # listed on its own, as the client reads it (see `Outbox.add`)
        self._release(self.output.push_all(ids, kind))
        await self._begin_answer_once_in_it()
        return len(ids)

    async def _begin_answer_once_in_it(self) -> None:
        if self._resamples_answer_start and not self._answer_begun and self.output.section == "answer":
            await self._begin_answer()

    async def _begin_answer(self) -> None:
        """A constrained answer (structured output, tool call) is sampled under its constraint from
        its first token: what the engine sampled past the section's start unconstrained is dropped."""
        self._answer_begun = True
        await self.cursor.rollback(0)
        await self.cursor.generation.begin_answer()

    def _refuse(self) -> None:
        # Judged answer text held back for a stop string goes out; a half-seen marker does not. No
        # logprob entry is released by it: blank tokens before the refused step stay unreleased.
        if not self.output.stopped:
            self.outbox.add(self.output.release([], final=True))
        answered = self.output.splitter.answer_started  # answer text went out (all before it is released now)
        text = ("\n\n" if answered else "") + self.policy.refusal
        if self.raw_text and self.output.section == "reasoning":
            text = self.reasoning_cfg.end_marker + text  # the raw text's answer begins after the marker
        self.report.refusal = self.policy.refusal
        self.outbox.open_insert = None
        self.outbox.add([Delta("answer", text, "refusal")])  # past the stop strings: the refusal is whole
        self.output.add_released(text)
        self.finish_reason = "content_filter"
        self.observer.refused()

    # --- the end ------------------------------------------------------------------------------
    async def _finish(self) -> None:
        """Out of tokens (or stopped) with a step still held: judge it; an unsafe one is not released."""
        if self._held is not None and self.finish_reason != "content_filter":
            if self.output.stopped:
                self._held = None
            else:
                self._held.add(self.output.end_of_text())
                await self._judge(final=True)
        if self.finish_reason != "content_filter":
            self._release(self.output.end_of_text(), final=True)
