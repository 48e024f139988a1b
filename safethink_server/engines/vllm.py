"""`vllm`: steering inside an in-process vLLM `AsyncLLM` (continuous batching, paged KV cache, prefix
caching and tensor/pipeline parallelism all come from vLLM).

KV-cache steering: `rollback` and `inject` only edit the kept token ids and close the running vLLM
request; the next `next_tokens` resubmits `prompt + kept tokens` as token ids (never re-tokenised
text), so vLLM's automatic prefix cache serves everything already computed and only the new
tokens are prefilled.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, GenerationConfig

from safethink_server.engines.base import (
    SAMPLING_FIELDS,
    SEQUENCE_END,
    AnswerFormat,
    Engine,
    EngineError,
    EngineOverloaded,
    Generation,
    SamplingParams,
    TokenLogprob,
)
from safethink_server.prompt import Conversation, RenderedPrompt

logger = logging.getLogger(__name__)


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def cpu_environment_defaults() -> None:
    """Settings that vLLM reads from the environment, set before the engine starts unless the user set them."""
    os.environ.setdefault("VLLM_USE_AOT_COMPILE", "0")  # otherwise every start recompiles
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache


class VLLMGeneration(Generation):
    def __init__(self, engine: VLLMEngine, prompt_ids: list[int], sampling: SamplingParams) -> None:
        self.engine = engine
        self.prompt_ids = list(prompt_ids)
        self.sampling = sampling
        self.output_ids: list[int] = []  # every token kept so far: sampled and returned, or injected
        self.entries: list[TokenLogprob | None] = []  # per output position, when logprobs are asked for
        self.request_id = f"safethink-{uuid.uuid4().hex[:16]}"
        self.submissions = 0
        self.cached_tokens = 0  # prompt tokens the prefix cache served, over all submissions
        self.last_cached_tokens = 0
        self._prefilled = 0
        self._stream: AsyncGenerator[Any, None] | None = None
        self._awaiting_first_output = False
        self._submitted_len = 0
        self._closed = False
        self._constrain = False  # the answer has begun: sample under sampling.answer_constraint

    @property
    def prefilled_tokens(self) -> int:
        return self._prefilled

    def token_logprobs(self, start: int, end: int) -> list[TokenLogprob | None]:
        return self.entries[start:end]

    async def begin_answer(self) -> None:
        """A structured output starts with the answer: the running request (sampled without it) is
        closed, and every submission from here carries it. A grammar's state cannot be carried over
        a resubmission, so the steering loop never rolls back inside a constrained answer."""
        if self.sampling.answer_constraint is not None and not self._constrain:
            self._constrain = True
            await self._close_stream()

    def _submit(self) -> None:
        from vllm import SamplingParams as VLLMSamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

        ids = self.prompt_ids + self.output_ids
        room = self.engine.max_model_len - len(ids)
        if room <= 0:
            raise EngineError(f"the sequence reached the context limit of {self.engine.max_model_len} tokens")
        # A resubmission is a new vLLM request; a seeded one derives its seed so a rerun replays exactly.
        seed = None if self.sampling.seed is None else (self.sampling.seed + self.submissions) % 2**63
        s = self.sampling
        # Penalties count the output of this submission: after a resubmission the kept output is prompt.
        params = VLLMSamplingParams(
            max_tokens=min(room, max(1, s.max_tokens - len(self.output_ids))),
            min_tokens=max(0, s.min_tokens - len(self.output_ids)),
            temperature=s.temperature,
            top_p=s.top_p,
            top_k=s.top_k or 0,
            min_p=s.min_p or 0.0,
            frequency_penalty=s.frequency_penalty or 0.0,
            presence_penalty=s.presence_penalty or 0.0,
            repetition_penalty=s.repetition_penalty or 1.0,
            logit_bias=s.logit_bias_ids() or None,
            stop_token_ids=s.stop_token_ids,
            ignore_eos=s.ignore_eos,
            bad_words=s.bad_words,
            allowed_token_ids=s.allowed_token_ids,
            logprobs=s.logprobs,
            structured_outputs=StructuredOutputsParams(**s.answer_constraint) if self._constrain and s.answer_constraint else None,
            seed=seed,
            detokenize=False,  # the steering loop detokenises incrementally itself
            output_kind=RequestOutputKind.DELTA,
        )
        request_id = f"{self.request_id}-{self.submissions}"
        self.submissions += 1
        self._submitted_len = len(ids)
        self._awaiting_first_output = True
        self._stream = self.engine.llm.generate(TokensPrompt(prompt_token_ids=ids), params, request_id, priority=s.priority)

    async def _close_stream(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            # Closing the generator makes vLLM abort the request and free its KV blocks.
            await stream.aclose()

    async def next_tokens(self) -> list[int]:
        from vllm.v1.engine.exceptions import EngineDeadError

        if self._closed:
            raise EngineError("generation was aborted")
        if self._stream is None:
            self._submit()
        assert self._stream is not None
        try:
            out = await anext(self._stream)
        except StopAsyncIteration:
            self._stream = None
            self.output_ids.append(SEQUENCE_END)  # part of the sequence until the session rolls it back, as at any end
            self.entries.append(None)
            return [SEQUENCE_END]
        except EngineDeadError as exc:
            raise EngineError("the vLLM engine died") from exc
        except Exception as exc:
            logger.exception("vLLM generation failed")
            raise EngineError("vLLM generation failed") from exc  # (its text stays in the server's log)
        if self._awaiting_first_output:
            self._awaiting_first_output = False
            self.last_cached_tokens = out.num_cached_tokens or 0
            self.cached_tokens += self.last_cached_tokens
            self._prefilled += self._submitted_len - self.last_cached_tokens
        completion = out.outputs[0]
        tokens = list(completion.token_ids)
        if out.finished:
            self._stream = None
            ended_on_eos = tokens and tokens[-1] in self.engine.eos_token_ids and not self.sampling.ignore_eos
            if completion.finish_reason == "length":
                # vLLM's own limit (the context): end the sequence here rather than resubmit past it.
                self.finished_by_length = True
                tokens.append(SEQUENCE_END)
            elif isinstance(completion.stop_reason, int) and tokens and tokens[-1] == completion.stop_reason:
                # one of stop_token_ids: as in vLLM, its text is output only with include_stop_str_in_output
                tokens[-1:] = [tokens[-1], SEQUENCE_END] if self.sampling.include_stop_str_in_output else [SEQUENCE_END]
            elif completion.finish_reason == "stop" and not ended_on_eos:
                tokens.append(SEQUENCE_END)  # stopped on a token vLLM did not return
        self.output_ids.extend(tokens)
        self._keep_logprobs(completion.logprobs, tokens)
        if not tokens:
            return await self.next_tokens()
        return tokens

    def _keep_logprobs(self, logprobs: Any, tokens: list[int]) -> None:
        """One entry per returned token: vLLM's dict of {token id: Logprob} holds the sampled token and
        the top alternatives, the sampled one first."""
        sampled = list(logprobs or [])
        for token, alternatives in zip(tokens, sampled + [None] * (len(tokens) - len(sampled)), strict=True):
            if alternatives is None or token not in alternatives:
                self.entries.append(None)
                continue
            top = sorted(((i, lp) for i, lp in alternatives.items() if lp.rank is not None and lp.rank <= (self.sampling.logprobs or 0)),
                         key=lambda item: item[1].rank)
            self.entries.append(TokenLogprob(token_id=token, logprob=alternatives[token].logprob,
                                             top=[(i, lp.logprob) for i, lp in top]))

    async def rollback(self, n_tokens: int) -> None:
        if n_tokens <= 0:
            return
        if n_tokens > len(self.output_ids):
            raise ValueError("cannot roll back into the prompt")
        await self._close_stream()
        del self.output_ids[-n_tokens:]
        del self.entries[len(self.output_ids) :]
        self.finished_by_length = False

    async def inject(self, token_ids: list[int]) -> None:
        if self._closed:
            raise EngineError("generation was aborted")
        if token_ids:
            await self._close_stream()
            self.output_ids.extend(token_ids)
            self.entries += [None] * len(token_ids)
            self.finished_by_length = False

    async def abort(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            await self._close_stream()
        finally:
            self.engine.release()


class VLLMEngine(Engine):
    name = "vllm"
    honoured_fields = Engine.honoured_fields | SAMPLING_FIELDS | {"logprobs", "top_logprobs", "tools", "tool_choice",
                                                                  "parallel_tool_calls", "response_format", "structured_outputs"}

    def answer_format(self, request: dict[str, Any]) -> AnswerFormat | None:
        from safethink_server.engines.vllm_answer import answer_format

        return answer_format(request, self.tokenizer, self.tool_call_parser)

    def __init__(self, model_path: Path, model_name: str, engine_args: dict[str, Any],
                 max_queued_requests: int = 64, tool_call_parser: str | None = None) -> None:
        if tool_call_parser is not None:
            from vllm.tool_parsers.abstract_tool_parser import ToolParserManager

            ToolParserManager.get_tool_parser(tool_call_parser)  # KeyError now, not at the first request
        self.tool_call_parser = tool_call_parser
        self.model_path = model_path
        self.model_name = model_name
        self.engine_args = dict(engine_args)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self._eos = self._stop_ids(model_path)
        if self.engine_args.get("scheduling_policy") != "priority":  # vLLM refuses a priority under first-come-first-served
            self.honoured_fields = self.honoured_fields - {"priority"}
        self.max_queued = max_queued_requests
        self.llm: Any = None
        self.max_model_len = 0
        self.max_num_seqs = 0
        self._active = 0

    def _stop_ids(self, model_path: Path) -> set[int]:
        ids = set(super().eos_token_ids)
        try:
            extra = GenerationConfig.from_pretrained(model_path).eos_token_id
        except OSError:
            extra = None
        if extra is not None:
            ids |= set(extra) if isinstance(extra, list) else {extra}
        return {i for i in ids if i is not None}

    @property
    def eos_token_ids(self) -> set[int]:
        return self._eos

    async def open(self) -> None:
        """Start vLLM (minutes on a CPU): model load, KV-cache allocation, compilation."""
        if self.llm is not None:
            return
        from vllm import AsyncEngineArgs
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.async_llm import AsyncLLM

        args = {"model": str(self.model_path), "served_model_name": self.model_name, "enable_prefix_caching": True,
                "disable_log_stats": False, **self.engine_args}
        if _on_cpu():
            cpu_environment_defaults()
            args.setdefault("block_size", 32)  # prefix caching reuses whole blocks only: small blocks reuse more
            if args.get("dtype", "auto") == "auto":
                args["dtype"] = "float32"  # bf16 on CPU changed this model's answers badly
        logger.info("starting vLLM with %s", args)
        self.llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**args), usage_context=UsageContext.OPENAI_API_SERVER)
        self.max_model_len = self.llm.model_config.max_model_len
        self.vocab_size = self.llm.model_config.get_vocab_size()
        self.max_num_seqs = self.llm.vllm_config.scheduler_config.max_num_seqs

    async def start(self, prompt: RenderedPrompt, sampling: SamplingParams, conversation: Conversation,
                    model: str | None = None) -> Generation:
        if self.llm is None:
            raise EngineError("the vLLM engine is not started")
        if self._active >= self.max_num_seqs + self.max_queued:
            raise EngineOverloaded(f"{self._active} requests are running or queued in vLLM")
        generation = VLLMGeneration(self, prompt.ids, sampling)
        self._active += 1
        return generation

    def release(self) -> None:
        self._active -= 1

    def stats(self) -> dict[str, int | str]:
        unfinished = self.llm.output_processor.get_num_unfinished_requests() if self.llm is not None else 0
        return {"running": self._active, "engine_unfinished_requests": unfinished}

    def dead_reason(self) -> str | None:
        if self.llm is not None and self.llm.errored:
            return f"the vLLM engine died ({type(self.llm.dead_error).__name__})"
        return None

    async def close(self) -> None:
        if self.llm is not None:
            self.llm.shutdown()
            self.llm = None
