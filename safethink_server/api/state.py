"""What every route shares: the settings, the engine, the scorer and its batcher, metrics, lifecycle, keys and audit."""

from __future__ import annotations

from dataclasses import dataclass

from reward_models.base import Scorer
from reward_models.batcher import MicroBatcher
from safethink_server.api.audit import AuditLog
from safethink_server.api.lifecycle import Lifecycle
from safethink_server.config import ServerSettings
from safethink_server.engines.base import Engine
from safethink_server.metrics import Metrics
from safethink_server.tenants import Keyring


@dataclass
class ServerState:
    settings: ServerSettings
    engine: Engine
    scorer: Scorer
    batcher: MicroBatcher
    metrics: Metrics
    lifecycle: Lifecycle
    keyring: Keyring
    audit: AuditLog

    @property
    def max_model_len(self) -> int:
        if self.settings.max_model_len:
            return self.settings.max_model_len
        return int(self.engine.max_model_len or self.engine.tokenizer.model_max_length)
