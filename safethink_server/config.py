"""Server settings: defaults < YAML file (--config / SAFETHINK_CONFIG) < SAFETHINK_* env < CLI flags."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, PrivateAttr, create_model, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, YamlConfigSettingsSource

from reward_models.registry import ScorerConfig, ScorerKind
from safethink_server.engines.upstream.config import UpstreamConfig
from safethink_server.schema import PolicyConfig, ReasoningConfig, ReportDetail
from safethink_server.steering.steps import StepBoundaryDetector
from safethink_server.tenants import KeyConfig, Keyring, read_keys_file


def mirrored(model: type[BaseModel], names: dict[str, str], note: str = "") -> type[BaseModel]:
    """Settings named `names` (setting -> field of `model`) with the field's type, default, bounds and
    description: a setting that configures a component is declared in the component's config only."""
    fields: dict[str, Any] = {}
    for setting, name in names.items():
        info = copy.deepcopy(model.model_fields[name])
        annotation = info.annotation
        if info.is_required():  # asked for only where the component is used
            annotation, info.default = annotation | None, None
        info.description = f"{note}{info.description}"
        fields[setting] = (annotation, info)
    return create_model(f"{model.__name__}Settings", **fields)


UPSTREAM_SETTINGS = {f"upstream_{name}": name for name in UpstreamConfig.model_fields if name != "reasoning"}
REASONING_SETTINGS = {"reasoning_start": "start_marker", "reasoning_end": "end_marker", "prefill_reasoning": "prefill_start",
                      "reasoning_budget": "budget_tokens"}
SCORER_SETTINGS = {"scorer_url": "url", "scorer_device": "device", "scorer_dtype": "dtype"}
UpstreamSettings = mirrored(UpstreamConfig, UPSTREAM_SETTINGS, "upstream: ")
ReasoningSettings = mirrored(ReasoningConfig, REASONING_SETTINGS)
ScorerSettings = mirrored(ScorerConfig, SCORER_SETTINGS)


class ServerSettings(BaseSettings, PolicyConfig, ReasoningSettings, ScorerSettings, UpstreamSettings):  # type: ignore[misc,valid-type]
    """Every setting is a flag (`safethink serve --help`); the steering policy's own fields
    (threshold, early_steps, mode, prefix, on_budget_exhausted, refusal, ...) come from PolicyConfig."""

    model_config = SettingsConfigDict(env_prefix="SAFETHINK_", extra="forbid", hide_input_in_errors=True)  # inputs hold keys
    _keyring: Keyring | None = PrivateAttr(default=None)

    host: str = Field(default="127.0.0.1", description="address to listen on")
    port: int = Field(default=8000, ge=0, le=65535, description="port to listen on")
    metrics_port: int | None = Field(default=None, ge=1, le=65535, description="serve /metrics on this port (same host), on a "
                                     "listener of its own, and not on the API port (default: on the API port)")
    engine: Literal["hf", "vllm", "upstream"] = Field(default="hf", description="generation engine: hf (embedded transformers), vllm (in-process AsyncLLM), upstream (proxy)")
    model: Path | None = Field(default=None, description="local HF causal-LM folder (default: the embedded SmolLM2-135M-Instruct)")
    served_model_name: str | None = Field(default=None, description="model name clients use (default: the folder name)")
    dtype: Literal["auto", "bfloat16", "float32", "float16"] = Field(default="auto", description="engine weights dtype (auto: hf bfloat16; vllm float32 on CPU, the model's on GPU)")
    max_model_len: int | None = Field(default=None, ge=16, description="context limit (default: the model's)")
    default_max_tokens: int = Field(default=512, ge=1, description="max_tokens when the request gives none")
    max_concurrent_sequences: int | None = Field(default=None, ge=1, description="sequences decoded at once (hf: 1; vllm: its max_num_seqs)")
    max_queued_requests: int = Field(default=64, ge=0, description="requests waiting for a slot before 503")
    stream_interval: int = Field(default=1, ge=1, le=1024, description="streaming: text goes out once this many tokens came since "
                                 "the last event, the first at once (as vLLM's --stream-interval; fewer events, less CPU a token)")

    tensor_parallel_size: int = Field(default=1, ge=1, description="vllm: GPUs per pipeline stage")
    pipeline_parallel_size: int = Field(default=1, ge=1, description="vllm: pipeline stages (nodes)")
    distributed_executor_backend: Literal["mp", "ray", "uni", "external_launcher"] | None = Field(default=None, description="vllm: executor backend for multi-GPU / multi-node")
    gpu_memory_utilization: float = Field(default=0.9, gt=0.0, le=1.0, description="vllm: fraction of GPU memory for weights and KV cache")
    enable_prefix_caching: bool = Field(default=True, description="vllm: automatic prefix caching (what makes injection cheap)")
    block_size: int | None = Field(default=None, ge=1, description="vllm: KV-cache block size (CPU default 32)")
    enforce_eager: bool = Field(default=False, description="vllm: no CUDA graphs / compilation")
    vllm_args: dict[str, Any] = Field(default_factory=dict, description="vllm: any other AsyncEngineArgs, as JSON")
    enable_auto_tool_choice: bool = Field(default=False, description="vllm: tool_choice auto, read with --tool-call-parser")
    tool_call_parser: str | None = Field(default=None, description="vllm: vLLM's tool parser for the model (hermes, llama3_json, "
                                         "mistral, ...), named as vLLM names them")
    reasoning_parser: Literal["deepseek_r1", "qwen3"] | None = Field(default=None, description="reasoning markers as vLLM's parser of that name reads them")

    scorer: ScorerKind = Field(default="probe", description="safety scorer: probe, classifier, guard, remote")
    scorer_model: Path | None = Field(default=None, description="classifier/guard model folder, or probe head file")
    scorer_max_batch: int = Field(default=32, ge=1, description="micro-batcher: most steps in one scorer forward")
    scorer_max_wait_ms: float = Field(default=2.0, ge=0, description="micro-batcher: longest wait to fill a batch")
    scorer_warm: bool = Field(default=True, description="let the scorer prepare a step's context while the model writes the step "
                              "(probe: encodes it), when no scoring waits")
    scorer_max_context_chars: int = Field(
        default=100_000, ge=1_000, description="the longest conversation (characters, all of it as the scorer reads it) a "
        "steered request may have: the probe encodes all of it once (about twice this in windows, more tokens for a dense "
        "script), so this bounds one request's scoring cost; a longer one is a 400")

    step_delimiters: list[str] = Field(default=["\n\n"], description="texts that end a reasoning step")
    step_regex: str | None = Field(default=None, description="regex that ends a step (instead of the delimiters)")
    max_step_tokens: int = Field(default=256, ge=1, description="a step ends after this many tokens regardless")

    api_key: str | None = Field(default=None, description="require 'Authorization: Bearer KEY' on /v1 (its id is 'default')")
    api_keys: list[KeyConfig] = Field(default_factory=list, json_schema_extra={"no_flag": True},
                                      description="keys, each with an id and its own policy (SAFETHINK_API_KEYS as JSON, or YAML)")
    api_keys_file: Path | None = Field(default=None, description="YAML or JSON file of keys: {keys: [{id, key, policy: {threshold, "
                                       "early_steps, mode, prefix, ...}, allow_client_overrides, allow_assistant_prefill}]}")
    allow_client_overrides: bool = Field(default=False, description="let requests change steering via a 'safethink' object")
    allow_assistant_prefill: bool = Field(default=False, description="accept continue_final_message (a client-written start of the "
                                          "assistant turn); the scorer then reads it as context")
    report: ReportDetail | None = Field(
        default=None, description="how much of the safethink report clients get: full (scores and token counts), actions (actions "
        "and counts: no scores, no sizes of withheld text), none; unset: full without API keys, actions with them. Scores let "
        "an attacker search for steps that score just under the threshold")
    max_body_bytes: int = Field(default=1_000_000, ge=1024, description="largest request body accepted (413 above)")
    drain_timeout_s: float = Field(default=30.0, ge=0, description="on SIGTERM: how long requests in flight may finish (new ones get 503) "
                                   "before they are aborted; keep it below Kubernetes' terminationGracePeriodSeconds")
    audit_log: str = Field(default="stdout", description="one JSON line per request: stdout, a file path (appended), or off")
    audit_log_text: bool = Field(default=False, description="put the prompt and the released output text into the audit log")
    log_level: str = Field(default="info", description="uvicorn log level")
    workers: int = Field(default=1, ge=1, le=64, description="server processes sharing the port (--engine upstream): each has "
                         "its own event loop, upstream connections and scorer; metrics are summed across them")

    @model_validator(mode="after")
    def _workers_only_in_front_of_an_upstream(self) -> ServerSettings:
        if self.workers > 1 and self.engine != "upstream":
            raise ValueError(f"--workers {self.workers} needs --engine upstream: each worker of an in-process engine would "
                             "load its own copy of the model")
        return self

    @model_validator(mode="after")
    def _metrics_port_is_not_the_api_port(self) -> ServerSettings:
        if self.metrics_port is not None and self.metrics_port == self.port:
            raise ValueError(f"--metrics-port {self.metrics_port} is the API port: give the metrics a port of their own, "
                             "or leave --metrics-port unset to serve /metrics on the API port")
        return self

    @model_validator(mode="after")
    def _no_empty_api_key(self) -> ServerSettings:
        if self.api_key is not None:
            if not self.api_key.strip():
                raise ValueError("the API key is empty: set a key, or leave --api-key / SAFETHINK_API_KEY unset to serve without one")
            self.api_key = self.api_key.strip()  # (a Secret made from a file often ends in a newline; a header's token is stripped)
        return self

    @model_validator(mode="after")
    def _keys_are_readable_and_unique(self) -> ServerSettings:
        self._keyring = Keyring(self.keys(), self.policy(), self.allow_client_overrides, self.allow_assistant_prefill, self.report)
        return self

    def keys(self) -> list[KeyConfig]:
        """Every key: --api-key (id 'default'), --api-keys, and the keys file's."""
        single = [KeyConfig(id="default", key=self.api_key)] if self.api_key is not None else []  # type: ignore[arg-type]
        from_file = read_keys_file(self.api_keys_file) if self.api_keys_file is not None else []
        return [*single, *self.api_keys, *from_file]

    def keyring(self) -> Keyring:
        """The keys, read (the keys file included) and checked once, when the settings were."""
        assert self._keyring is not None
        return self._keyring

    @model_validator(mode="after")
    def _auto_tool_choice_needs_a_parser(self) -> ServerSettings:
        if self.enable_auto_tool_choice and (self.engine != "vllm" or not self.tool_call_parser):
            raise ValueError("--enable-auto-tool-choice needs --engine vllm and --tool-call-parser NAME")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        yaml_file = settings_cls.model_config.get("yaml_file") or os.environ.get("SAFETHINK_CONFIG")
        if yaml_file:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=yaml_file))
        return tuple(sources)

    @classmethod
    def fields_in_order(cls) -> dict[str, FieldInfo]:
        """The settings as `--help` and docs/configuration.md list them: the steering policy and the
        server's own, then those of the reasoning markers, the scorer and the proxy."""
        mirrored = [*REASONING_SETTINGS, *SCORER_SETTINGS, *UPSTREAM_SETTINGS]
        return {name: cls.model_fields[name] for name in [*(n for n in cls.model_fields if n not in mirrored), *mirrored]}

    def policy(self) -> PolicyConfig:
        return PolicyConfig(**{name: getattr(self, name) for name in PolicyConfig.model_fields})

    def reasoning(self) -> ReasoningConfig:
        reasoning = ReasoningConfig(**{name: getattr(self, setting) for setting, name in REASONING_SETTINGS.items()})
        if self.reasoning_parser is not None:
            # deepseek_r1: everything before </think> is reasoning, the template may already open it;
            # qwen3: reasoning only inside <think>...</think> that the model writes itself.
            markers = ReasoningConfig()
            reasoning = reasoning.model_copy(update={"start_marker": markers.start_marker, "end_marker": markers.end_marker,
                                                     "prefill_start": self.reasoning_parser == "deepseek_r1"})
        return reasoning

    def upstream_config(self) -> UpstreamConfig:
        if not self.upstream_url:  # type: ignore[attr-defined]
            raise ValueError("--engine upstream needs --upstream-url")
        return UpstreamConfig(**{name: getattr(self, setting) for setting, name in UPSTREAM_SETTINGS.items()}, reasoning=self.reasoning())

    def vllm_engine_args(self) -> dict[str, Any]:
        """The vLLM AsyncEngineArgs these settings ask for; `vllm_args` overrides the named ones."""
        args: dict[str, Any] = {
            "tensor_parallel_size": self.tensor_parallel_size, "pipeline_parallel_size": self.pipeline_parallel_size,
            "gpu_memory_utilization": self.gpu_memory_utilization, "enable_prefix_caching": self.enable_prefix_caching,
            "enforce_eager": self.enforce_eager, "dtype": self.dtype,
        }
        optional = {"distributed_executor_backend": self.distributed_executor_backend, "block_size": self.block_size,
                    "max_model_len": self.max_model_len, "max_num_seqs": self.max_concurrent_sequences}
        args.update({k: v for k, v in optional.items() if v is not None})
        return {**args, **self.vllm_args}

    def detector(self) -> StepBoundaryDetector:
        return StepBoundaryDetector(self.step_delimiters, self.step_regex, self.max_step_tokens)

    def scorer_config(self) -> ScorerConfig:
        return ScorerConfig(
            kind=self.scorer, **{name: getattr(self, setting) for setting, name in SCORER_SETTINGS.items()},
            head_path=self.scorer_model if self.scorer == "probe" else None,
            model_path=self.scorer_model if self.scorer in ("classifier", "guard") else None,
        )


def load_settings(overrides: dict[str, object] | None = None, config_file: Path | None = None) -> ServerSettings:
    """Settings from the flags given (`overrides`), the environment, and a YAML file (`--config`, else
    SAFETHINK_CONFIG)."""
    if config_file is None:
        return ServerSettings(**(overrides or {}))

    class FromFile(ServerSettings):
        model_config = SettingsConfigDict(yaml_file=config_file)

    return FromFile(**(overrides or {}))
