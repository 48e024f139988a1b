"""Every `safethink serve` setting as a markdown table, from the settings model: `python -m safethink_server.settings_table`."""

from __future__ import annotations

import argparse
import json

from pydantic.fields import FieldInfo

from safethink_server.cli import _serve_flags
from safethink_server.config import ServerSettings

ENV_PREFIX = "SAFETHINK_"


def _text(value: object) -> str:
    """A value as one line of text, with control characters written as escapes (`\\n`), as the flags take them."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in str(value))


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _code(value: object) -> str:
    return f"`{_text(value)}`"


def _default(field: FieldInfo) -> str:
    value = field.get_default(call_default_factory=True)
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list):
        return ", ".join(_code(item) for item in value) or "–"
    if isinstance(value, dict):
        return _code(json.dumps(value))
    return _code(value)


def _serve_options() -> dict[str, argparse.Action]:
    """The options `safethink serve` really has, by setting name, from the parser the CLI builds."""
    parser = argparse.ArgumentParser(add_help=False)
    _serve_flags(parser)
    return {action.dest: action for action in parser._actions if action.option_strings}


def _flags(action: argparse.Action | None) -> str:
    return ", ".join(_code(o) for o in action.option_strings) if action else "– (environment or YAML only)"


def flag_table() -> str:
    """One row per `safethink serve` setting: its flags, environment variable, default and description."""
    options = _serve_options()
    rows = ["| flag | environment | default | meaning |", "|---|---|---|---|"]
    config = options["config"]
    rows.append(f"| {_flags(config)} | `{ENV_PREFIX}CONFIG` | – | {_cell(config.help or '')} |")
    for name, field in ServerSettings.fields_in_order().items():
        rows.append(f"| {_flags(options.get(name))} | `{ENV_PREFIX}{name.upper()}` | {_cell(_default(field))} | "
                    f"{_cell(field.description or '')} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(flag_table())
