"""Prometheus metrics. Names are fixed: dashboards and alert rules rely on them.

Intervention rate: sum(rate(safethink_interventions_total[5m])) / sum(rate(safethink_requests_total{status!="unauthorized"}[5m]))
(`sum by (key)` for each API key's: `key` is the key's id, `anonymous` on a server without keys).
"""

from __future__ import annotations

import os
from pathlib import Path

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
    multiprocess,
    start_http_server,
)

from safethink_server.schema import RequestStatus
from safethink_server.steering.hooks import SteeringObserver

MULTIPROCESS_DIR = "PROMETHEUS_MULTIPROC_DIR"
PROCESS_REFRESH_S = 5.0
PROCESS_GAUGES = {"process_resident_memory_bytes": "Resident memory size in bytes.",
                  "process_virtual_memory_bytes": "Virtual memory size in bytes.",
                  "process_cpu_seconds_total": "Total user and system CPU time spent in seconds.",
                  "process_open_fds": "Number of open file descriptors."}
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_P_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("safethink_requests", "Chat completion requests by outcome.", ["engine", "status", "key"], registry=r)
        self.steps_scored = Counter("safethink_steps_scored", "Reasoning steps judged by the scorer.", registry=r)
        self.interventions = Counter("safethink_interventions", "Corrective prefixes injected, by step index (1..m) and API key id.", ["step", "key"], registry=r)
        self.p_unsafe = Histogram("safethink_step_p_unsafe", "p_unsafe of scored steps.", buckets=_P_BUCKETS, registry=r)
        self.scorer_latency = Histogram("safethink_scorer_latency_seconds", "Time of one scorer forward (a micro-batch).", buckets=_LATENCY_BUCKETS, registry=r)
        self.score_wait = Histogram("safethink_step_score_wait_seconds", "Time a judged step waited for its score (queue and "
                                    "forward), by whether it was its response's first (nothing sent yet) or a later one.",
                                    ["step"], buckets=_LATENCY_BUCKETS, registry=r)
        self.scorer_batch = Histogram("safethink_scorer_batch_size", "Steps per scorer forward.", buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.scorer_warm_seconds = Counter("safethink_scorer_warm_seconds", "Scorer time spent preparing contexts ahead of their steps (--scorer-warm).", registry=r)
        self.scorer_errors = Counter("safethink_scorer_errors", "Steps the scorer failed on or timed out on (handled by on_scorer_error).", registry=r)
        self.ttft = Histogram("safethink_time_to_first_token_seconds", "Request arrival to first released token.", buckets=_TTFT_BUCKETS, registry=r)
        self.generated = Counter("safethink_generated_tokens", "Completion tokens returned to clients (injected ones included).", registry=r)
        self.injected_total = Counter("safethink_injected_tokens", "Tokens injected by the server (prefixes, reasoning end markers).", registry=r)
        self.discarded = Counter("safethink_discarded_tokens", "Sampled tokens rolled back (replaced unsafe steps).", registry=r)
        self.withheld = Counter("safethink_withheld_tokens", "Sampled tokens judged unsafe and never released (refusals, token limit).", registry=r)
        self.refusals = Counter("safethink_refusals", "Responses ended with the refusal (content_filter): a breach with no intervention left, or a scorer failure under fail_closed; by API key id.", ["key"], registry=r)
        self.unauthorized = Counter("safethink_unauthorized_requests", "Requests refused for a missing or wrong API key (401).", registry=r)
        self.upstream_errors = Counter("safethink_upstream_errors", "Upstream failures by kind (proxy mode).", ["kind"], registry=r)
        self.active = Gauge("safethink_active_requests", "Requests being served or waiting for the engine.", registry=r,
                            multiprocess_mode="livesum")
        self.memory_limit = Gauge("safethink_memory_limit_bytes", "The memory the server may use: its cgroup's limit (a pod's "
                                  "limit), else the machine's.", registry=r, multiprocess_mode="max")
        self.memory_limit.set(memory_limit_bytes())
        self.process: dict[str, Gauge] = {}
        if MULTIPROCESS_DIR in os.environ:  # each worker's, labelled by its pid, copied by `refresh_process`
            self.process = {name: Gauge(name, doc, registry=r, multiprocess_mode="liveall") for name, doc in PROCESS_GAUGES.items()}
        else:  # read from /proc at each scrape
            ProcessCollector(registry=r)

    def refresh_process(self) -> None:
        """Under `--workers N`: this worker's memory, CPU time and open files into its gauges."""
        for family in ProcessCollector(registry=None).collect():  # (reads /proc/self)
            for sample in family.samples:
                if sample.name in self.process:
                    self.process[sample.name].set(sample.value)

    def exposition(self) -> bytes:
        """The text the API port's /metrics serves (see `exposed`)."""
        return generate_latest(exposed(self.registry))

    def initialise(self, engine: str, keys: list[str], early_steps: int) -> None:
        """Create the known label sets at zero, so rates and dashboards have series before the first event."""
        for key in keys:
            for status in RequestStatus:
                self.requests.labels(engine=engine, status=status, key=key)
            for step in range(1, early_steps + 1):
                self.interventions.labels(step=str(step), key=key)
            self.refusals.labels(key=key)
        for kind in ("connect", "timeout", "closed", "protocol", "status_429", "status_5xx", "upstream_error"):
            self.upstream_errors.labels(kind=kind)
        for order in ("first", "later"):
            self.score_wait.labels(step=order)

    def of_key(self, key: str) -> KeyObserver:
        return KeyObserver(self, key)

    def scorer_batch_done(self, size: int, seconds: float, error: BaseException | None) -> None:
        self.scorer_latency.observe(seconds)
        self.scorer_batch.observe(size)

    def scorer_warmed(self, seconds: float) -> None:
        self.scorer_warm_seconds.inc(seconds)


def memory_limit_bytes(cgroup: Path = Path("/sys/fs/cgroup"), meminfo: Path = Path("/proc/meminfo")) -> float:
    """The cgroup's memory limit (v2 `memory.max`, v1 `memory.limit_in_bytes`), else the machine's memory."""
    for limit in (cgroup / "memory.max", cgroup / "memory" / "memory.limit_in_bytes"):
        try:
            text = limit.read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 1 << 60:  # v1 writes a huge number for no limit, v2 "max"
            return float(text)
    try:
        total = next(line for line in meminfo.read_text().splitlines() if line.startswith("MemTotal:"))
        return float(total.split()[1]) * 1024
    except (OSError, StopIteration, IndexError, ValueError):
        return float("inf")


def exposed(registry: CollectorRegistry | None) -> CollectorRegistry:
    """What /metrics serves: this process's metrics (`registry`), or under `serve --workers N` (prometheus_client's
    multiprocess mode) every worker's, read from the multiprocess folder and summed at each scrape."""
    if MULTIPROCESS_DIR not in os.environ:
        if registry is None:
            raise ValueError("no registry, and no PROMETHEUS_MULTIPROC_DIR to read the workers' metrics from")
        return registry
    forget_dead_workers(os.environ[MULTIPROCESS_DIR])
    combined = CollectorRegistry()
    multiprocess.MultiProcessCollector(combined)
    return combined


def forget_dead_workers(folder: str) -> None:
    """Drop the live gauges (memory, active requests) of workers that are gone: a worker the kernel
    killed and uvicorn restarted would otherwise stay in the sums with its last values."""
    for path in Path(folder).glob("gauge_live*_*.db"):
        pid = int(path.stem.rsplit("_", 1)[1])
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            multiprocess.mark_process_dead(pid, folder)
        except PermissionError:
            pass  # alive, another user's


def start_listener(host: str, port: int, registry: CollectorRegistry | None) -> None:
    """`--metrics-port`: the metrics on a listener of their own (prometheus_client's, in a daemon thread of this
    process), so that the API port need not expose them. It answers GET on any path, in the text format or OpenMetrics
    as the scraper asks, and lives as long as the process. Under `serve --workers N` the parent process calls this
    (registry None): one listener binds the port, and it reads every worker's values from the multiprocess folder.
    Raises OSError when the port cannot be bound."""
    start_http_server(port, addr=host, registry=exposed(registry))


class KeyObserver(SteeringObserver):
    """The steering loop's events of one API key's request, into the metrics."""

    def __init__(self, metrics: Metrics, key: str) -> None:
        self.metrics, self.key = metrics, key

    def step_scored(self, p_unsafe: float, error: bool, first: bool = False, wait_s: float = 0.0) -> None:
        self.metrics.score_wait.labels(step="first" if first else "later").observe(wait_s)
        self.metrics.steps_scored.inc()
        self.metrics.p_unsafe.observe(p_unsafe)
        if error:
            self.metrics.scorer_errors.inc()

    def intervention(self, step_index: int) -> None:
        self.metrics.interventions.labels(step=str(step_index), key=self.key).inc()

    def injected(self, n_tokens: int) -> None:
        self.metrics.injected_total.inc(n_tokens)

    def refused(self) -> None:
        self.metrics.refusals.labels(key=self.key).inc()
