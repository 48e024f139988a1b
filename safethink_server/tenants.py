"""API keys and what each may do. A key has an id (what metrics and the audit log name, never the key
itself) and may carry its own steering policy and permissions, over the server's."""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import Annotated

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    SerializationInfo,
    StringConstraints,
    ValidationError,
    create_model,
    field_serializer,
    field_validator,
)

from safethink_server.schema import PolicyConfig, ReportDetail, optional_policy_field

ANONYMOUS = "anonymous"  # the id requests get on a server without keys

KeyPolicy: type[BaseModel] = create_model(
    "KeyPolicy",
    __config__=ConfigDict(extra="forbid"),
    __doc__="A key's steering policy: the fields it sets replace the server's.",
    **{name: optional_policy_field(name) for name in PolicyConfig.model_fields},  # type: ignore[arg-type]
)


class KeyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)
    id: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.-]{1,64}$")] = Field(
        description="the key's name in metrics and the audit log")
    key: SecretStr = Field(description="the bearer token")
    policy: KeyPolicy = Field(default_factory=KeyPolicy)  # type: ignore[valid-type]
    allow_client_overrides: bool | None = Field(default=None, description="the server's setting when unset")
    allow_assistant_prefill: bool | None = Field(default=None, description="the server's setting when unset")
    report: ReportDetail | None = Field(default=None, description="how much of the safethink report the key's clients get; "
                                        "the server's setting when unset")

    @field_serializer("key")
    def _hidden(self, key: SecretStr, info: SerializationInfo) -> str:
        """Masked, except in the settings file written for the workers of `serve --workers N`."""
        return key.get_secret_value() if (info.context or {}).get("secrets") else str(key)

    @field_validator("key")
    @classmethod
    def _not_blank(cls, key: SecretStr) -> SecretStr:
        # (a Secret made from a file often ends in a newline; a header's token is trimmed the same way)
        trimmed = key.get_secret_value().strip()
        if not trimmed:
            raise ValueError("a key is empty")
        return SecretStr(trimmed)


class KeysFile(BaseModel):
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)
    keys: list[KeyConfig] = Field(min_length=1)


def read_keys_file(path: Path) -> list[KeyConfig]:
    """`{"keys": [{"id": ..., "key": ..., "policy": {...}}, ...]}`, as YAML or JSON."""
    try:
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except OSError as exc:
        raise ValueError(f"cannot read the keys file {path}: {exc.strerror}") from None
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        # Only where: the parser's own message would quote the line, and with it a key.
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else f"line {getattr(exc, 'lineno', '?')}"
        raise ValueError(f"the keys file {path} is not valid YAML or JSON ({where})") from None
    try:
        return KeysFile.model_validate(data).keys
    except ValidationError as exc:
        first = exc.errors()[0]
        # An unknown field is not named: in a broken file, a field's name may be a key.
        loc = first["loc"][:-1] if first["type"] == "extra_forbidden" else first["loc"]
        what = "an unknown field" if first["type"] == "extra_forbidden" else first["msg"]
        raise ValueError(f"the keys file {path}: {'.'.join(map(str, loc)) or 'top level'}: {what}") from None


def check_unique(keys: list[KeyConfig]) -> None:
    ids = [k.id for k in keys]
    if len(set(ids)) != len(ids) or ANONYMOUS in ids:
        raise ValueError(f"key ids must be unique and not '{ANONYMOUS}': {sorted(ids)}")
    values = [k.key.get_secret_value() for k in keys]
    if len(set(values)) != len(values):
        raise ValueError("two keys have the same value")


class Tenant(BaseModel):
    """Who sent a request, and the steering policy and permissions it gets."""

    id: str
    policy: PolicyConfig
    allow_client_overrides: bool
    allow_assistant_prefill: bool
    report: ReportDetail = "full"


class Keyring:
    """The server's keys. No keys: every request is the anonymous tenant, with the server's policy."""

    def __init__(self, keys: list[KeyConfig], policy: PolicyConfig, allow_client_overrides: bool, allow_assistant_prefill: bool,
                 report: ReportDetail | None = None) -> None:
        """`report` unset: the whole report without keys, and only actions and counts with them (scores
        sent to clients let an attacker search for steps that score just under the threshold)."""
        check_unique(keys)
        self.required = bool(keys)
        server_report: ReportDetail = report or ("actions" if keys else "full")
        self.anonymous = Tenant(id=ANONYMOUS, policy=policy, allow_client_overrides=allow_client_overrides,
                                allow_assistant_prefill=allow_assistant_prefill, report=server_report)
        self._keys = [(k.key.get_secret_value().encode("utf-8"), Tenant(
            id=k.id, policy=policy.model_copy(update=k.policy.model_dump(exclude_none=True)),
            allow_client_overrides=allow_client_overrides if k.allow_client_overrides is None else k.allow_client_overrides,
            allow_assistant_prefill=allow_assistant_prefill if k.allow_assistant_prefill is None else k.allow_assistant_prefill,
            report=k.report or server_report,
        )) for k in keys]

    def tenants(self) -> list[Tenant]:
        return [tenant for _, tenant in self._keys] if self.required else [self.anonymous]

    def tenant(self, authorization: str) -> Tenant | None:
        """The tenant of an `Authorization` header, or None for a missing or wrong key. The token is
        compared as the header's own bytes (Starlette decodes them as latin-1), with every key, in
        constant time: a non-ASCII header is a wrong key, not an error."""
        if not self.required:
            return self.anonymous
        scheme, _, token = authorization.partition(" ")
        sent = token.strip(" \t").encode("latin-1")
        found = None
        for key, tenant in self._keys:
            if secrets.compare_digest(sent, key) and scheme.lower() == "bearer":
                found = tenant
        return found
