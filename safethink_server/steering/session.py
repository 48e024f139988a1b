"""One request's steering loop: pull tokens from the engine, split reasoning into steps, hold each
watched step back until the scorer has judged it, and on a breach roll the step back and inject the
corrective prefix into the running sequence. Knows nothing about which engine or scorer runs."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from pydantic import BaseModel, Field

from reward_models.base import StepItem, StepScore
from safethink_server.engines.base import Engine, Generation, SamplingParams
from safethink_server.steering.policy import Action, PolicyConfig, decide, is_watching, score_on_failure
from safethink_server.steering.steps import StepBoundaryDetector
from safethink_server.steering.text import IncrementalDetokenizer, Section, SectionSplitter, StopMatcher

ScoreFn = Callable[[StepItem], Awaitable[StepScore]]


class ReasoningConfig(BaseModel):
    start_marker: str = Field(default="<think>", min_length=1)
    end_marker: str = Field(default="</think>", min_length=1)
    prefill_start: bool = Field(default=True, description="open the reasoning section in the assistant turn for the model")
    budget_tokens: int | None = Field(default=1024, ge=1, description="close the reasoning section after this many tokens")
    end_on_eos: bool = Field(default=True, description="a model that stops inside its reasoning is asked for its answer")


class StepRecord(BaseModel):
    index: int
    p_unsafe: float | None
    action: Action
    scorer_error: bool = False
    tokens: int


class InterventionRecord(BaseModel):
    step: int
    p_unsafe: float
    mode: str
    prefix: str  # the corrective text injected, so that clients and evaluations can tell it from the model's own
    discarded_tokens: int
    injected_tokens: int


class SteeringReport(BaseModel):
    steps: list[StepRecord] = []
    interventions: list[InterventionRecord] = []
    injected_tokens: int = 0
    discarded_tokens: int = 0


class SteeringObserver:
    """Metrics hooks; the default does nothing."""

    def step_scored(self, p_unsafe: float, error: bool) -> None: ...
    def intervention(self, step_index: int) -> None: ...
    def injected(self, n_tokens: int) -> None: ...


@dataclass
class Delta:
    section: Section  # "reasoning" or "answer"
    text: str


@dataclass
class _Step:
    """The step being held back: its tokens, its text, and where to roll back to."""

    text: str = ""
    tokens: int = 0
    checkpoint: tuple = ()  # (detokenizer state, splitter state, output tokens)
    deltas: list[Delta] = field(default_factory=list)


class SteeringSession:
    def __init__(
        self,
        engine: Engine,
        prompt_ids: list[int],
        prompt_text: str,
        sampling: SamplingParams,
        policy: PolicyConfig,
        reasoning: ReasoningConfig,
        detector: StepBoundaryDetector,
        score: ScoreFn,
        stop: list[str] | None = None,
        observer: SteeringObserver | None = None,
        messages: list[dict[str, str]] | None = None,
        model: str | None = None,
        initial_section: Section | None = None,
    ) -> None:
        self.engine = engine
        self.prompt_ids = prompt_ids
        self.prompt_text = prompt_text
        self.sampling = sampling
        self.policy = policy
        self.reasoning_cfg = reasoning
        self.detector = detector
        self.score = score
        self.observer = observer or SteeringObserver()
        self.tokenizer = engine.tokenizer
        self.detok = IncrementalDetokenizer(self.tokenizer)
        self.splitter = SectionSplitter(reasoning.start_marker, reasoning.end_marker,
                                        initial_section or ("reasoning" if reasoning.prefill_start else "pre"))
        self.messages = messages
        self.model = model
        self.stop = StopMatcher(stop or [])
        self.report = SteeringReport()
        self.finish_reason: str | None = None
        self.output_tokens = 0  # tokens in the final sequence: kept samples + injected
        self.reasoning_tokens = 0
        self.released_reasoning = ""
        self.generation: Generation | None = None
        self._eos = engine.eos_token_ids
        self._step_index = 1
        self._step: _Step | None = None
        self._reasoning_closed_by_server = False

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    def _watching(self) -> bool:
        return self.splitter.section == "reasoning" and is_watching(self.policy, self._step_index, len(self.report.interventions))

    def _checkpoint(self) -> tuple:
        return (self.detok.checkpoint(), self.splitter.checkpoint(), self.output_tokens, self.reasoning_tokens)

    async def start(self) -> None:
        """Take an engine slot (waiting in the engine's queue if needed)."""
        if self.generation is None:
            self.generation = await self.engine.start(self.prompt_ids, self.sampling, messages=self.messages, model=self.model)

    async def run(self) -> AsyncIterator[Delta]:
        await self.start()
        assert self.generation is not None
        try:
            while self.finish_reason is None:
                for token in await self.generation.next_tokens():
                    async for delta in self._on_token(token):
                        yield delta
                    if self.finish_reason is not None:
                        break
            async for delta in self._finish():
                yield delta
        finally:
            await self.generation.abort()

    async def _on_token(self, token: int) -> AsyncIterator[Delta]:
        if token in self._eos:
            await self.generation.rollback(1)  # the EOS is never part of the kept sequence
            in_reasoning = self.splitter.section == "reasoning"
            interventions = len(self.report.interventions)
            async for d in self._close_step():
                yield d
            if len(self.report.interventions) > interventions:
                return  # a prefix was injected: generation goes on after it
            if self.generation.finished_by_length:
                self.finish_reason = "length"
                return
            if in_reasoning and self.reasoning_cfg.end_on_eos and not self._reasoning_closed_by_server:
                async for d in self._inject_end_marker():
                    yield d
                return
            self.finish_reason = "stop"
            return
        if self._step is None and self._watching():
            self._step = _Step(checkpoint=self._checkpoint())
        self.output_tokens += 1
        if self.splitter.section == "reasoning":
            self.reasoning_tokens += 1
        if self._step is not None:
            self._step.tokens += 1
        async for d in self._emit_text(self.detok.push(token)):
            yield d
        if self._step is not None and (
            self.splitter.section != "reasoning" or self.detector.is_complete(self._step.text, self._step.tokens)
        ):
            async for d in self._close_step():
                yield d
        if self.finish_reason is None and self.engine.counts_tokens and self.output_tokens >= self.sampling.max_tokens:
            self.finish_reason = "length"
            return
        budget = self.reasoning_cfg.budget_tokens
        if budget is not None and self.splitter.section == "reasoning" and self.reasoning_tokens >= budget:
            async for d in self._close_step():
                yield d
            if self.splitter.section == "reasoning" and self.reasoning_tokens >= budget:
                async for d in self._inject_end_marker():
                    yield d

    async def _emit_text(self, text: str) -> AsyncIterator[Delta]:
        """Route decoded text: into the held step, or straight out."""
        for segment in self.splitter.feed(text):
            delta = Delta(segment.section, segment.text)
            if self._step is not None:
                if segment.section == "reasoning":
                    self._step.text += segment.text
                self._step.deltas.append(delta)
            else:
                async for d in self._release([delta]):
                    yield d

    async def _release(self, deltas: list[Delta], final: bool = False) -> AsyncIterator[Delta]:
        for delta in deltas:
            if self.finish_reason == "stop":
                return
            if delta.section == "reasoning":
                self.released_reasoning += delta.text
                yield delta
                continue
            text, hit = self.stop.feed(delta.text, final=final)
            if text:
                yield Delta("answer", text)
            if hit:
                self.finish_reason = "stop"

    async def _close_step(self) -> AsyncIterator[Delta]:
        """Judge the held step: release it, or replace it, or release it and append the prefix."""
        step, self._step = self._step, None
        if step is None:
            return
        if not step.text.strip():
            async for d in self._release(step.deltas):
                yield d
            return
        p_unsafe, error = await self._score(step.text)
        action = decide(self.policy, p_unsafe)
        self.report.steps.append(StepRecord(index=self._step_index, p_unsafe=p_unsafe, action=action, scorer_error=error, tokens=step.tokens))
        if action is Action.REPLACED:
            await self.generation.rollback(step.tokens)
            detok_state, splitter_state, self.output_tokens, self.reasoning_tokens = step.checkpoint
            self.detok.restore(detok_state)
            self.splitter.restore(splitter_state)
            self.report.discarded_tokens += step.tokens
            # The replacement step (prefix + what follows) keeps this step's index and is judged again.
            async for d in self._intervene(self._step_index, p_unsafe, discarded=step.tokens):
                yield d
            return
        async for d in self._release(step.deltas):
            yield d
        self._step_index += 1
        if action is Action.APPENDED:
            async for d in self._intervene(self._step_index - 1, p_unsafe, discarded=0):
                yield d

    async def _intervene(self, step_index: int, p_unsafe: float, discarded: int) -> AsyncIterator[Delta]:
        record = InterventionRecord(step=step_index, p_unsafe=p_unsafe, mode=self.policy.mode, prefix=self.policy.prefix,
                                    discarded_tokens=discarded, injected_tokens=0)
        self.report.interventions.append(record)
        self.observer.intervention(record.step)
        if self._watching():
            self._step = _Step(checkpoint=self._checkpoint())
        async for d in self._inject(self._separated(self.policy.prefix)):
            yield d
        record.injected_tokens = self._last_injected

    def _separated(self, prefix: str) -> str:
        """The prefix starts a new paragraph when the released reasoning does not end in one."""
        if not self.released_reasoning or self.released_reasoning.endswith("\n\n"):
            return prefix
        return ("\n" if self.released_reasoning.endswith("\n") else "\n\n") + prefix

    async def _score(self, step_text: str) -> tuple[float, bool]:
        item = StepItem(prompt=self.prompt_text, reasoning=self.released_reasoning, step=step_text)
        try:
            result = await asyncio.wait_for(self.score(item), timeout=self.policy.scorer_timeout_s)
        except Exception:
            p = score_on_failure(self.policy)
            self.observer.step_scored(p, error=True)
            return p, True
        self.observer.step_scored(result.p_unsafe, error=False)
        return result.p_unsafe, False

    async def _inject(self, text: str) -> AsyncIterator[Delta]:
        """Force `text` into the sequence (engine prefill of the new ids only) and route its text."""
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        await self.generation.inject(ids)
        self.output_tokens += len(ids)
        if self.splitter.section == "reasoning":
            self.reasoning_tokens += len(ids)
        if self._step is not None:
            self._step.tokens += len(ids)
        self.report.injected_tokens += len(ids)
        self._last_injected = len(ids)
        self.observer.injected(len(ids))
        for token in ids:
            async for d in self._emit_text(self.detok.push(token)):
                yield d

    async def _inject_end_marker(self) -> AsyncIterator[Delta]:
        self._reasoning_closed_by_server = True
        async for d in self._inject("\n" + self.reasoning_cfg.end_marker + "\n\n"):
            yield d

    async def _finish(self) -> AsyncIterator[Delta]:
        step, self._step = self._step, None
        if step is not None and step.text.strip():
            # Out of tokens with a watched step unjudged: judge it; an unsafe one is withheld.
            p_unsafe, error = await self._score(step.text)
            withhold = p_unsafe >= self.policy.threshold and self.policy.mode == "replace"
            self.report.steps.append(StepRecord(index=self._step_index, p_unsafe=p_unsafe, scorer_error=error, tokens=step.tokens,
                                                action=Action.WITHHELD if withhold else Action.RELEASED))
            if not withhold:
                async for d in self._release(step.deltas):
                    yield d
        elif step is not None:
            async for d in self._release(step.deltas):
                yield d
        tail = [Delta(s.section, s.text) for s in self.splitter.feed("", final=True)]
        async for d in self._release(tail + [Delta("answer", "")], final=True):
            yield d
