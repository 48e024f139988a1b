"""A scripted engine for property-based tests of the steering loop. It implements the real engine
contract (`safethink_server.engines.base`): batches of any size, exact rollback and injection, an
EOS at the end, its own token limit, and a slot held from `start` to `abort`. Its "model" plays a
token script forward, whatever was rolled back or injected, so that every request shape can be
generated (or, `by_position`, reads the script at each output position, as a deterministic model). A unit-test device only: the end-to-end tests run the real model."""

from __future__ import annotations

import asyncio

from safethink_server.engines.base import SEQUENCE_END, Engine, Generation, SamplingParams, TokenLogprob
from safethink_server.prompt import Conversation, RenderedPrompt

SERVER_PIECES = ["[", "]", "F", "I", "X", "N", "O", " "]  # server texts are spelled with these alone
# "<c3>" and "<a9>" are the two UTF-8 bytes of "é" (a character split over two tokens); "<pad>" is a
# special token that decodes to nothing.
BYTE_PIECES = {"<c3>": b"\xc3", "<a9>": b"\xa9", "<pad>": b""}
MODEL_PIECES = ["a", "b", " ok", " step", " BAD", ".", "\n", "\n\n", ".\n\n", "<", "/", "think", ">", "</think>", "<think>",
                "STOP", "S", "é", "<c3>", "<a9>", "<pad>"]


class ScriptedTokenizer:
    """Tokens are whole pieces, decoded as UTF-8 bytes; the EOS is the id after the last piece.
    Encoding is greedy longest match over the text pieces."""

    def __init__(self) -> None:
        self.pieces = sorted(set(MODEL_PIECES + SERVER_PIECES + [chr(c) for c in range(32, 127)] + ["\n"]),
                             key=lambda p: (-len(p), p))
        self.ids = {p: i for i, p in enumerate(self.pieces)}
        self.bytes = [BYTE_PIECES.get(p, p.encode()) for p in self.pieces]
        self.eos_token_id = len(self.pieces)
        self.model_max_length = 1 << 20

    def decode(self, ids: list[int], skip_special_tokens: bool = True, spaces_between_special_tokens: bool = True) -> str:
        assert all(i >= 0 for i in ids), f"the end of the sequence was decoded: {ids}"
        return b"".join(self.bytes[i] for i in ids if i != self.eos_token_id).decode("utf-8", errors="replace")

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        out, at = [], 0
        while at < len(text):
            piece = next(p for p in self.pieces if p not in BYTE_PIECES and text.startswith(p, at))
            out.append(self.ids[piece])
            at += len(piece)
        return out


class ScriptedGeneration(Generation):
    def __init__(self, engine: ScriptedEngine, sampling: SamplingParams) -> None:
        self.engine = engine
        self.sampling = sampling
        self.sequence: list[int] = []  # the output part of the sequence: returned + injected - rolled back
        # A logprob entry per position: each sampled token gets a serial of its own (its logprob is
        # minus the serial), injected ones None; `rolled_back` holds every serial ever rolled back.
        self.entries: list[TokenLogprob | None] = []
        self.rolled_back: set[int] = set()
        self.answer_begun_at: int | None = None  # output position where a constrained answer began
        self.finished_by_length = False
        self._script_at = 0
        self._calls = 0
        self._closed = False

    @property
    def prefilled_tokens(self) -> int:
        return 0

    async def next_tokens(self) -> list[int]:
        assert not self._closed, "read after abort"
        await asyncio.sleep(0)  # a real engine yields to the event loop here
        eos = self.engine.tokenizer.eos_token_id
        ends = self.engine.end_ids(self.sampling)
        if self.sequence and self.sequence[-1] in ends:
            raise AssertionError("read past the end of the sequence without a rollback")
        # The model's own end: its EOS, or, where the request ignores it, the engine's end; a limit of the engine's
        # is always the contract's SEQUENCE_END (as vllm's)
        end = SEQUENCE_END if self.sampling.ignore_eos else eos
        size = self.engine.batch_sizes[self._calls % len(self.engine.batch_sizes)]
        self._calls += 1
        batch: list[int] = []
        while len(batch) < size:
            limit = self.engine.limit(self.sampling)
            if limit is not None and len(self.sequence) + len(batch) >= limit:
                self.finished_by_length = True
                batch.append(SEQUENCE_END)
                break
            at = len(self.sequence) + len(batch) if self.engine.by_position else self._script_at
            if at >= len(self.engine.script):
                batch.append(end)
                break
            token = self.engine.script[at]
            self._script_at += 1
            batch.append(token)
            if token in ends:
                break
        self.sequence += batch
        for token in batch:
            self.engine.serial += 1
            # The alternatives are candidates the model did not write: a "BAD" one, as an attacker would read it.
            top = [(self.engine.tokenizer.ids[" BAD"], -0.5)] * (self.sampling.logprobs or 0)
            self.entries.append(TokenLogprob(token_id=token, logprob=-self.engine.serial, top=top))
        return batch

    def token_logprobs(self, start: int, end: int) -> list[TokenLogprob | None]:
        return self.entries[start:end]

    async def begin_answer(self) -> None:
        if self.answer_begun_at is None:
            self.answer_begun_at = len(self.sequence)

    async def rollback(self, n_tokens: int) -> None:
        assert not self._closed
        assert 0 < n_tokens <= len(self.sequence), f"rollback of {n_tokens} with {len(self.sequence)} output tokens"
        del self.sequence[-n_tokens:]
        self.rolled_back |= {-int(e.logprob) for e in self.entries[-n_tokens:] if e is not None}
        del self.entries[-n_tokens:]
        self.finished_by_length = False

    async def inject(self, token_ids: list[int]) -> None:
        assert not self._closed
        assert token_ids
        self.sequence += token_ids
        self.entries += [None] * len(token_ids)
        self.finished_by_length = False

    async def abort(self) -> None:
        if not self._closed:
            self._closed = True
            self.engine.active -= 1


class ScriptedEngine(Engine):
    name = "scripted"
    model_name = "scripted"

    def __init__(self, script: list[int], batch_sizes: list[int], enforces_max_tokens: bool = True,
                 own_limit: int | None = None, by_position: bool = False) -> None:
        self.tokenizer = ScriptedTokenizer()
        # by_position: the token at each position of the output is the script's, whatever came before
        # (a deterministic model), so that runs with different batch sizes can be compared.
        self.by_position = by_position
        self.script = script
        self.batch_sizes = batch_sizes
        self.enforces_max_tokens = enforces_max_tokens  # vllm and upstream stop at max_tokens themselves, hf does not
        self.own_limit = own_limit  # a limit of the engine's own below max_tokens (an upstream's count, a context)

        self.active = 0
        self.serial = 0
        self.generations: list[ScriptedGeneration] = []

    def limit(self, sampling: SamplingParams) -> int | None:
        if self.own_limit is not None:
            return self.own_limit
        return sampling.max_tokens if self.enforces_max_tokens else None

    async def start(self, prompt: RenderedPrompt, sampling: SamplingParams, conversation: Conversation,
                    model: str | None = None) -> Generation:
        self.active += 1
        generation = ScriptedGeneration(self, sampling)
        self.generations.append(generation)
        return generation
