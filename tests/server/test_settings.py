"""Settings: each declared once (the component's config gives the server's flag its type, default,
bounds and help), and read from flags > environment > YAML file > defaults."""

from __future__ import annotations

import os

import pytest
from pydantic import ValidationError

from reward_models.registry import ScorerConfig
from safethink_server.config import REASONING_SETTINGS, SCORER_SETTINGS, UPSTREAM_SETTINGS, ServerSettings, load_settings
from safethink_server.engines.upstream.config import UpstreamConfig
from safethink_server.schema import ReasoningConfig

MIRRORS = [(UpstreamConfig, UPSTREAM_SETTINGS), (ReasoningConfig, REASONING_SETTINGS), (ScorerConfig, SCORER_SETTINGS)]


@pytest.mark.parametrize(("config", "names"), MIRRORS)
def test_a_mirrored_setting_is_its_components_field(config, names):
    for setting, name in names.items():
        field, mirror = config.model_fields[name], ServerSettings.model_fields[setting]
        assert mirror.metadata == field.metadata and field.description in mirror.description
        assert mirror.default == (None if field.is_required() else field.get_default(call_default_factory=True))


def test_the_components_get_what_the_settings_say():
    settings = ServerSettings(engine="upstream", upstream_url="http://up/v1", upstream_chunk_timeout_s=3, reasoning_start="<r>",
                              reasoning_end="</r>", reasoning_budget=7, scorer_device="cpu", scorer_dtype="float32")
    upstream = settings.upstream_config()
    assert (upstream.url, upstream.chunk_timeout_s, upstream.reasoning.start_marker, upstream.reasoning.end_marker) == (
        "http://up/v1", 3, "<r>", "</r>")
    assert settings.reasoning().budget_tokens == 7
    assert (settings.scorer_config().device, settings.scorer_config().dtype) == ("cpu", "float32")
    with pytest.raises(ValidationError, match="upstream_chunk_timeout_s"):
        ServerSettings(upstream_chunk_timeout_s=0)
    with pytest.raises(ValueError, match="--upstream-url"):
        ServerSettings(engine="upstream").upstream_config()


def test_flags_beat_the_environment_which_beats_the_yaml_file(tmp_path, monkeypatch):
    config = tmp_path / "safethink.yaml"
    config.write_text("threshold: 0.3\nearly_steps: 5\nupstream_mode: chat\nport: 9001\n")
    monkeypatch.setenv("SAFETHINK_EARLY_STEPS", "4")
    monkeypatch.delenv("SAFETHINK_CONFIG", raising=False)
    settings = load_settings({"port": 9002}, config)
    assert (settings.threshold, settings.early_steps, settings.upstream_mode, settings.port) == (0.3, 4, "chat", 9002)
    assert "SAFETHINK_CONFIG" not in os.environ, "the file reaches the settings, not the process environment"
    assert load_settings({}).threshold == 0.5, "a later load without the file does not read it"
    monkeypatch.setenv("SAFETHINK_CONFIG", str(config))
    assert load_settings({}).threshold == 0.3
