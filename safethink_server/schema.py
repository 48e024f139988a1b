"""Declarations shared by the wire format, the settings and the steering loop, each made once:
the steering policy's fields, the reasoning markers, and what a request's steering report holds.
Pure pydantic models: nothing here runs a model or serves HTTP."""

from __future__ import annotations

from enum import Enum, StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator

Section = Literal["pre", "reasoning", "answer"]  # where a piece of the output falls: before, inside or after the reasoning
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1  # what a seed or token count may be: never an error inside an engine


def seed_plus(seed: int, n: int) -> int:
    """`seed + n` wrapped into the 64-bit range a seed may take: the seed of a request's n-th choice
    or continuation, so that a seeded request replays exactly."""
    return (seed + n - INT64_MIN) % 2**64 + INT64_MIN


class RequestStatus(StrEnum):
    """How a request ended, as it is counted (`safethink_requests_total{status}`) and audited."""

    SUCCESS = "success"
    ABORTED = "aborted"  # the client left, or a drain past its timeout ended it
    INVALID = "invalid"  # a 4xx of this server's
    ERROR = "error"  # the engine or the server failed
    OVERLOADED = "overloaded"  # no slot and a full queue: 503
    UPSTREAM_ERROR = "upstream_error"  # the proxy's upstream failed
    UNAVAILABLE = "unavailable"  # draining, or the engine dead: 503


DEFAULT_PREFIX = "Wait, think safely."
DEFAULT_REFUSAL = "I can't help with that request."


class PolicyConfig(BaseModel):
    threshold: float = Field(default=0.5, ge=0.0, le=1.0, description="τ: p_unsafe at or above this breaches")
    early_steps: int = Field(default=3, ge=0, le=1000, description="m: steps of the model's output watched (any section); 0 = steering off")
    max_interventions: int = Field(default=2, ge=0, le=100, description="injections per request at most")
    mode: Literal["replace", "append"] = Field(default="replace", description="replace the unsafe step, or append after it")
    prefix: str = Field(default=DEFAULT_PREFIX, min_length=1, max_length=1000, description="corrective text injected on a breach")
    on_budget_exhausted: Literal["refuse", "release"] = Field(
        default="refuse", description="a breach with no intervention left: refuse (content_filter), or release it (the paper's behaviour)")
    refusal: str = Field(default=DEFAULT_REFUSAL, min_length=1, max_length=2000, description="answer text of a refused response")
    on_scorer_error: Literal["fail_closed", "fail_open"] = Field(
        default="fail_closed", description="a step the scorer could not judge: refuse the response (closed) or count it safe (open)")
    scorer_timeout_s: float = Field(default=10.0, gt=0, description="a step unscored after this is a scorer failure")


# The fields a request may change with `"safethink": {...}` (only where the server allows it).
OVERRIDABLE_POLICY_FIELDS = ("threshold", "early_steps", "max_interventions", "mode", "prefix", "on_budget_exhausted")

def optional_policy_field(name: str) -> tuple[object, object]:
    """A PolicyConfig field as an optional one (None: not set), with its bounds."""
    field = PolicyConfig.model_fields[name]
    annotation = Annotated[field.annotation, *field.metadata] if field.metadata else field.annotation
    return annotation | None, Field(default=None, description=field.description)


SteeringOverrides: type[BaseModel] = create_model(
    "SteeringOverrides",
    __config__=ConfigDict(extra="forbid"),
    __doc__="Per-request steering changes, honoured only where the server allows client overrides.",
    **{name: optional_policy_field(name) for name in OVERRIDABLE_POLICY_FIELDS},  # type: ignore[arg-type]
)


MAX_LOGIT_BIAS = 300  # entries, as OpenAI allows
MAX_STOP_TOKEN_IDS = 64
# vLLM's GPU sampler takes at most 1,024 allowed ids and 1,024 bad-word tokens a request (more fails inside the
# engine): 16 words of at most 32 characters are at most 32 token sequences (each word alone and after a space)
MAX_BAD_WORDS = 16
MAX_BAD_WORD_CHARS = 32
MAX_ALLOWED_TOKEN_IDS = 1024
MAX_TOP_LOGPROBS = 20


class SamplingFields(BaseModel):
    """The sampling fields a request may set beyond temperature, top_p and seed, declared once for
    the wire format and the engines. None or 0 leaves the engine's default."""

    top_k: int | None = Field(default=None, ge=-1, le=2**31 - 1, description="sample from the k likeliest tokens; 0 or -1: all")
    min_p: float | None = Field(default=None, ge=0.0, le=1.0, description="drop tokens below min_p times the likeliest one's probability")
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=10.0, description="vLLM's: >1 discourages tokens already seen")
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = Field(
        default=None, max_length=MAX_LOGIT_BIAS, description="token id (a string) -> bias added to its logit")
    min_tokens: int = Field(default=0, ge=0, le=INT64_MAX, description="the end of sequence is not sampled before this many tokens")
    stop_token_ids: list[Annotated[int, Field(ge=0, le=2**31 - 1)]] | None = Field(default=None, max_length=MAX_STOP_TOKEN_IDS)
    # vLLM's own sampling fields, as its OpenAI server takes them on chat and completions
    ignore_eos: bool = Field(default=False, description="the model's end of sequence does not end the answer: it runs to max_tokens")
    skip_special_tokens: bool = Field(default=True, description="false: special tokens' text is part of the output (and of what is judged)")
    spaces_between_special_tokens: bool = Field(
        default=True, description="read by slow tokenizers' decoding only; fast ones (every model this server loads) decode as if true, as in vLLM")
    include_stop_str_in_output: bool = Field(default=False, description="the stop string that ends the answer is kept at its end")
    bad_words: list[Annotated[str, Field(min_length=1, max_length=MAX_BAD_WORD_CHARS)]] | None = Field(
        default=None, max_length=MAX_BAD_WORDS, description="words never sampled (each as the tokenizer encodes it, with and without a leading space)")
    allowed_token_ids: list[Annotated[int, Field(ge=0, le=2**31 - 1)]] | None = Field(
        default=None, min_length=1, max_length=MAX_ALLOWED_TOKEN_IDS, description="sample only these token ids (the server's own text is not sampled)")
    truncate_prompt_tokens: int | None = Field(
        default=None, ge=-1, description="keep only the prompt's last k tokens (-1: as many as the context holds with max_tokens)")
    priority: int = Field(default=0, ge=-(2**31), le=2**31 - 1, description="vLLM's scheduling priority, lower first (vllm engine with --scheduling-policy priority)")

    @field_validator("bad_words")
    @classmethod
    def _words_not_blank(cls, v: list[str] | None) -> list[str] | None:
        if v and any(not word.strip() for word in v):
            raise ValueError("a bad word has a character that is not a space")
        return v

    @field_validator("truncate_prompt_tokens")
    @classmethod
    def _truncate_at_least_one(cls, v: int | None) -> int | None:
        if v == 0:
            raise ValueError("truncate_prompt_tokens is -1 or at least 1")
        return v

    def logit_bias_ids(self) -> dict[int, float]:
        """The logit bias by token id; ValueError naming the key that is not one."""
        out: dict[int, float] = {}
        for key, bias in (self.logit_bias or {}).items():
            if not key.strip().isdigit() or int(key) > 2**31 - 1:
                raise ValueError(f"logit_bias keys are token ids, not {key[:40]!r}")
            out[int(key)] = bias
        return out


class ReasoningConfig(BaseModel):
    start_marker: str = Field(default="<think>", min_length=1, description="marker opening the reasoning section")
    end_marker: str = Field(default="</think>", min_length=1, description="marker closing the reasoning section")
    prefill_start: bool = Field(default=True, description="open the reasoning section in the assistant turn")
    budget_tokens: int | None = Field(default=1024, ge=1, description="reasoning tokens before the server closes the section")
    end_on_eos: bool = Field(default=True, description="a model that stops inside its reasoning is asked for its answer")


class Action(str, Enum):
    RELEASED = "released"
    REPLACED = "replaced"
    APPENDED = "appended"
    REFUSED = "refused"  # unsafe with nothing left to replace it with: the response ends with the refusal
    WITHHELD = "withheld"  # unsafe at the token limit, with on_budget_exhausted=release: not released


class StepRecord(BaseModel):
    index: int
    section: Literal["reasoning", "answer"] | None = Field(description="absent for a step not released where the report hides it")
    p_unsafe: float | None = Field(description="the scorer's P(unsafe); absent where the report hides scores")
    action: Action
    scorer_error: bool = False
    tokens: int | None = Field(description="the step's tokens; absent for a step not released where the report hides them")
    score_ms: float | None = Field(default=0.0, description="time the step waited for its score (micro-batch wait and forward)")
    generation_ms: float | None = Field(default=None, description="time the model took to write the step, from its first "
                                        "token with text to its last (a first step's engine queue and prefill come before)")
    queue_ms: float | None = Field(default=None, description="of score_ms, the time the step waited for a scorer forward")
    forward_ms: float | None = Field(default=None, description="of score_ms, the time of the forward that scored it")


class InterventionRecord(BaseModel):
    step: int
    p_unsafe: float | None
    mode: str
    prefix: str  # the corrective text, so that clients and evaluations can tell it from the model's own
    discarded_tokens: int | None
    injected_tokens: int


InsertedKind = Literal["prefix", "end_marker", "refusal"]


class InsertedText(BaseModel):
    """Text the server put into the output: never the model's own, never judged, always listed,
    exactly as the client reads it (the client's text less these spans is the model's released text)."""

    kind: InsertedKind
    section: Literal["reasoning", "answer"]
    text: str
    at: int = Field(default=0, description="where it begins: the character offset in its section's text, as the client "
                                           "reads it (in /v1/completions: in the choice's text)")


class SteeringReport(BaseModel):
    """What the server did to one response: the `safethink` object of the wire format."""

    steps: list[StepRecord] = []
    interventions: list[InterventionRecord] = []
    inserted: list[InsertedText] = Field(default=[], description="every text the server put into the output")
    refusal: str | None = Field(default=None, description="the refusal that ended the response, if one did")
    injected_tokens: int = 0
    discarded_tokens: int | None = Field(default=0, description="sampled tokens rolled back with replaced steps: not in usage")
    withheld_tokens: int | None = Field(default=0, description="sampled tokens judged unsafe and never released: not in usage")

    def disclosed(self, detail: ReportDetail) -> SteeringReport | None:
        """The report as a client may read it. `actions` hides what an adaptive attacker could search
        with: every score, score time, and the size and section of each text that was not released."""
        if detail == "full":
            return self
        if detail == "none":
            return None
        hidden = {"p_unsafe": None, "score_ms": None, "generation_ms": None, "queue_ms": None, "forward_ms": None}
        steps = [s.model_copy(update=hidden if s.action is Action.RELEASED else {**hidden, "tokens": None, "section": None})
                 for s in self.steps]
        interventions = [i.model_copy(update={"p_unsafe": None, "discarded_tokens": None}) for i in self.interventions]
        return self.model_copy(update={"steps": steps, "interventions": interventions, "discarded_tokens": None, "withheld_tokens": None})


# How much of the `safethink` report a client gets (the audit log always has it all).
ReportDetail = Literal["full", "actions", "none"]


class TokenizeOptions(BaseModel):
    """What `/tokenize` asks for besides the text (as vLLM has it)."""

    add_generation_prompt: bool = True
    add_special_tokens: bool = Field(default=True, description="prompt only: the tokenizer's special tokens (BOS)")
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool = False


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None
