"""Load and soak: N concurrent clients against a real server for a bounded time, then the server's
books are checked.

    python bench/load.py --duration-s 60 --concurrency 8
    python bench/load.py --duration-s 600 --concurrency 32 --server-args "--max-concurrent-sequences 4"
    python bench/load.py --url http://host:8000 --api-key KEY --duration-s 300 --json load.json
    python bench/load.py --duration-s 1800 --json soak.json            # the soak: memory must level off
    python bench/load.py --proxy --duration-s 1800 --json soak-proxy.json

By default the bench starts `safethink serve --engine hf --allow-client-overrides` (plus
`--server-args`) as a subprocess on a free port and stops it afterwards; `--url` runs against a
server already running instead (which must allow client overrides, and should have no other
clients: every request it counts is compared with the requests this bench sent). `--proxy` starts
two: an hf server with steering off as the upstream, and in front of it the gateway
(`--engine upstream`, the probe scorer) that the clients talk to.

Each client loops until the time is up, building random requests from its own seeded generator:
a prompt of a few words up to some hundreds, a random max_tokens, two choices sometimes, streamed
mostly (usage asked for sometimes), and a mix of steering outcomes through the per-request `safethink` override: no
override (the server's default), `{"threshold": 1.0}` (never breaches), `{"threshold": 0.0}` (every
judged step breaches: interventions, then the refusal with finish_reason "content_filter") and
`{"early_steps": 0}` (steering off). Some streaming clients leave on purpose: before the first
chunk (once the response headers arrived, so the server has surely taken and counted the request)
or after k chunks. Once the time is up, requests in flight may finish (`--drain-s`), the bench
waits for the server to notice every client that left (`--settle-s`), and then checks:
- /health answers 200 with status "ok";
- no slot is held: `running` and `waiting` of /health are 0, and so is `safethink_active_requests`;
- `safethink_requests_total`, summed over every label set, grew by exactly the requests sent;
- then `--concurrency` short requests sent at once must all be answered (`--probe-timeout-s`): a
  server that lost its engine slots without its counters showing it would hang here.
It exits 1 when any check fails. Reported (a table, and `--json PATH`): requests sent, completed by
finish reason, left on purpose, errors by kind (HTTP status and error type, transport exception,
error events in a stream, broken streams), time to first text p50 / p99 (the first content or
reasoning byte of a stream, queueing for a slot included), output tokens/s (from usage where the
request asked for it, else one a text chunk), and the server's RSS at the start and the end.

Memory: each server process's RSS is read from its own /metrics (`process_resident_memory_bytes`,
one series per worker under `--workers N`) every `--sample-s`; a process a server this bench started
spawns (vLLM's engine core under `--engine vllm`) is read from /proc. The report gives it at every minute
and its slope over the last third of the load, per process, in % per 5 minutes (a least-squares
line through the samples, over their mean). Where the last third spans 5 minutes or more
(`--duration-s` 900 and up), a slope above `--max-growth` (1% per 5 minutes) fails the run too:
memory that has not levelled off.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import re
import shlex
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from random import Random

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.gateway_cost import start  # noqa: E402  start a server process once its health answers
from tests.support.servers import free_port  # noqa: E402  the same port helper the tests use

# Steering outcomes a request asks for with the per-request override; None: the server's default.
MODES: dict[str, dict[str, object] | None] = {
    "default": None,
    "never breaches": {"threshold": 1.0},
    "always breaches": {"threshold": 0.0},
    "steering off": {"early_steps": 0},
}
WORDS = ("the a of to and in is it that for on with as was at by this be from or an are have not but we they "
         "which one all there their what so up out about who get would make like time just him know take people "
         "into year your good some could them see other than then now look only come its over think also back "
         "after use two how our work first well way even new want because any these give day most us garden "
         "river number bread window question answer sky blue train minute kitchen recipe letter music paint "
         "history planet ocean light energy simple careful explain reason step add list count compare").split()
DEFAULT_SERVER_ARGS = "--max-concurrent-sequences 2 --max-step-tokens 24"


@dataclass
class LoadConfig:
    duration_s: float = 60.0
    concurrency: int = 8
    seed: int = 0
    words: tuple[int, int] = (3, 300)  # prompt length in words, drawn log-uniformly
    max_tokens: tuple[int, int] = (8, 128)
    stream_share: float = 0.85
    two_choices_share: float = 0.15  # of requests: n = 2
    usage_share: float = 0.5  # of streamed requests: stream_options.include_usage
    leave_before_first: float = 0.12  # of streamed requests: close once the headers arrived
    leave_after_chunks: float = 0.12  # of streamed requests: close after k chunks, k in 1..8
    modes: dict[str, float] = field(default_factory=lambda: {"default": 0.3, "never breaches": 0.3,
                                                             "always breaches": 0.3, "steering off": 0.1})
    request_timeout_s: float = 300.0
    drain_s: float = 180.0
    settle_s: float = 30.0
    probe_timeout_s: float = 120.0
    sample_s: float = 5.0  # the server's RSS, active gauge and slots are sampled this often during the load
    max_growth_pct_per_5min: float = 1.0  # RSS slope over the last third that fails a run of 900 s or more


@dataclass
class Planned:
    """One request as a client decided it."""

    mode: str
    stream: bool
    usage: bool
    leave_after: int | None  # chunks read before the client closes: 0 is before the first one; None reads to the end
    body: dict[str, object]


@dataclass
class Outcome:
    """What one request got."""

    mode: str
    stream: bool
    usage_asked: bool
    finish: str | None = None
    left: str | None = None  # "before first chunk", "after k chunks"
    error: str | None = None
    ttft_s: float | None = None  # to the first content or reasoning byte of a stream
    first_text_s: float | None = None  # to the first text that is not blank (a step released once judged)
    tokens: int = 0
    tokens_from_usage: bool = False
    interventions: int = 0
    scorer_errors: int = 0  # steps the scorer could not judge (fail_closed refuses them)
    actions: list[str] = field(default_factory=list)  # of the judged steps, from the steering report
    max_tokens: int = 0
    chunks: int = 0
    ended_s: float = 0.0  # since the load began


@dataclass
class Snapshot:
    """The server's state as its endpoints show it."""

    health_status: int | None = None
    health: dict[str, object] = field(default_factory=dict)
    active: float | None = None  # safethink_active_requests
    requests_total: float | None = None  # safethink_requests_total, every label set summed
    requests_by_status: dict[str, float] = field(default_factory=dict)  # the same by its status label
    rss: dict[str, int] = field(default_factory=dict)  # resident memory by server process, from each one's /metrics

    @property
    def rss_bytes(self) -> int | None:
        return sum(self.rss.values()) if self.rss else None

    @property
    def held(self) -> float:
        """Slots held: what /health says is running or waiting, and the active gauge."""
        return sum(float(self.health.get(k) or 0) for k in ("running", "waiting")) + (self.active or 0.0)


@dataclass
class LoadReport:
    config: dict[str, object]
    sent: int = 0
    completed: dict[str, int] = field(default_factory=dict)  # by finish reason
    left: dict[str, int] = field(default_factory=dict)  # left on purpose, by when
    cut_at_drain: int = 0  # still in flight when the drain time was up, closed by the bench
    errors: dict[str, int] = field(default_factory=dict)
    by_mode: dict[str, dict[str, int]] = field(default_factory=dict)
    with_interventions: int = 0
    with_scorer_errors: int = 0  # requests with a step the scorer failed on or timed out on
    ttft_p50_ms: float | None = None
    ttft_p99_ms: float | None = None
    first_text_p50_ms: float | None = None  # the same to the first text that is not blank
    first_text_p99_ms: float | None = None
    output_tokens: int = 0
    tokens_from_usage: int = 0
    load_s: float = 0.0
    output_tokens_per_s: float = 0.0
    max_in_flight: int = 0
    start: Snapshot = field(default_factory=Snapshot)
    end: Snapshot = field(default_factory=Snapshot)
    settle_wait_s: float = 0.0
    probe: dict[str, object] = field(default_factory=dict)
    samples: list[dict[str, object]] = field(default_factory=list)  # t, rss (by process), active, running, waiting
    requests: list[Outcome] = field(default_factory=list)  # every request's outcome, in the order they ended

    def __repr__(self) -> str:  # the requests' outcomes stay out of assertion messages
        return (f"LoadReport(sent={self.sent}, counted={self.counted}, completed={self.completed}, left={self.left}, "
                f"errors={self.errors}, end={self.end})")

    @property
    def counted(self) -> float | None:
        if self.start.requests_total is None or self.end.requests_total is None:
            return None
        return self.end.requests_total - self.start.requests_total

    @property
    def counted_by_status(self) -> dict[str, float]:
        """The growth of safethink_requests_total by status (what the server says became of the requests)."""
        start, end = self.start.requests_by_status, self.end.requests_by_status
        return {k: end.get(k, 0.0) - start.get(k, 0.0) for k in sorted(set(start) | set(end)) if end.get(k, 0.0) != start.get(k, 0.0)}

    @property
    def server_errors(self) -> int:
        """5xx answers and server_error events in streams."""
        return sum(n for kind, n in self.errors.items() if kind.startswith("HTTP 5") or kind == "stream error event server_error")

    def problems(self) -> list[str]:
        """What makes the run fail: an unhealthy server, a slot held, a count that is not the requests sent."""
        out = []
        end = self.end
        if end.health_status != 200 or end.health.get("status") != "ok":
            out.append(f"/health answered {end.health_status} {end.health} at the end")
        for key in ("running", "waiting"):
            if end.health.get(key):
                out.append(f"/health {key} is {end.health[key]} at the end, not 0")
        if end.active is None:
            out.append("no safethink_active_requests gauge on /metrics")
        elif end.active != 0:
            out.append(f"safethink_active_requests is {end.active:g} at the end, not 0")
        if self.counted is None:
            out.append("no safethink_requests_total on /metrics")
        elif self.counted != self.sent:
            out.append(f"safethink_requests_total grew by {self.counted:g}, but {self.sent} requests were sent")
        if self.config.get("duration_s", 0) >= MEMORY_CHECKED_FROM_S:  # type: ignore[operator]
            limit = float(self.config["max_growth_pct_per_5min"])  # type: ignore[arg-type]
            if not self.memory:
                out.append("no process_resident_memory_bytes on /metrics: the memory was not checked")
            for process, trend in self.memory.items():
                growth = trend["last_third_pct_per_5min"]
                if growth is None:
                    out.append(f"no RSS samples of {process} in the last third of the load")
                elif growth > limit:
                    out.append(f"RSS of {process} still grows by {growth:.2f}% per 5 minutes in the last third (limit {limit:g}%)")
        if self.probe and not self.probe.get("ok"):
            out.append(f"after the load, {self.probe.get('answered')} of {self.probe.get('sent')} short requests were "
                       f"answered in {self.probe.get('timeout_s')} s: {self.probe.get('errors')}")
        return out

    @property
    def memory(self) -> dict[str, dict[str, object]]:
        """Per server process: RSS (MiB) at each whole minute of the load, and its slope over the last third."""
        duration = float(self.config.get("duration_s", 0))  # type: ignore[arg-type]
        series: dict[str, list[tuple[float, int]]] = {}
        for sample in self.samples:
            for process, rss in (sample.get("rss") or {}).items():  # type: ignore[attr-defined]
                series.setdefault(process, []).append((float(sample["t"]), int(rss)))  # type: ignore[arg-type]
        return {process: {"by_minute_mib": by_minute(points, duration),
                          "last_third_pct_per_5min": growth_pct_per_5min([p for p in points if duration * 2 / 3 <= p[0] <= duration])}
                for process, points in sorted(series.items())}

    def as_json(self) -> dict[str, object]:
        data = asdict(self)
        data.update(counted=self.counted, counted_by_status=self.counted_by_status, server_errors=self.server_errors,
                    memory=self.memory, problems=self.problems())
        return data


MEMORY_CHECKED_FROM_S = 900.0  # the last third spans 5 minutes: shorter runs report the slope without judging it


def by_minute(points: list[tuple[float, int]], duration_s: float) -> dict[int, float]:
    """The sample nearest each whole minute of the load (and its start), in MiB."""
    if not points:
        return {}
    out = {}
    for minute in range(int(duration_s // 60) + 1):
        t, rss = min(points, key=lambda p: abs(p[0] - minute * 60))
        if abs(t - minute * 60) <= 30:
            out[minute] = round(rss / 2**20, 1)
    return out


def growth_pct_per_5min(points: list[tuple[float, int]]) -> float | None:
    """The least-squares slope of RSS over time, as a share of its mean per 5 minutes."""
    if len(points) < 3:
        return None
    ts, ys = [p[0] for p in points], [float(p[1]) for p in points]
    t_mean, y_mean = statistics.fmean(ts), statistics.fmean(ys)
    spread = sum((t - t_mean) ** 2 for t in ts)
    if spread == 0 or y_mean == 0:
        return None
    slope = sum((t - t_mean) * (y - y_mean) for t, y in zip(ts, ys, strict=True)) / spread
    return 100.0 * slope * 300.0 / y_mean


METRIC = re.compile(r'^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>(?:[^"}]|"(?:[^"\\]|\\.)*")*)\})? (?P<value>\S+)')


def metric_sum(text: str, name: str) -> float | None:
    """A metric's value summed over every label set it has (None when the exposition has no sample of it)."""
    values = [float(m["value"]) for m in map(METRIC.match, text.splitlines()) if m is not None and m["name"] == name]
    return sum(values) if values else None


def metric_by(text: str, name: str, label: str) -> dict[str, float]:
    """A metric's value by one of its labels, summed over every other label."""
    out: dict[str, float] = {}
    for m in map(METRIC.match, text.splitlines()):
        if m is not None and m["name"] == name:
            found = re.search(rf'(?:^|,){label}="((?:[^"\\]|\\.)*)"', m["labels"] or "")
            key = found.group(1) if found else ""
            out[key] = out.get(key, 0.0) + float(m["value"])
    return out


OWN_PIDS: dict[str, int] = {}  # base URL -> pid of each server this bench started


def children_rss(pid: int) -> dict[int, int]:
    """VmRSS of every process below `pid` (vLLM's engine core under `--engine vllm`), from /proc."""
    out: dict[int, int] = {}
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            for child in map(int, (task / "children").read_text().split()):
                status = Path(f"/proc/{child}/status").read_text()
                out[child] = next(int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmRSS:"))
                out.update(children_rss(child))
    except (OSError, ValueError, StopIteration):
        pass
    return out


async def process_rss(client: httpx.AsyncClient, name: str, base: str) -> dict[str, int]:
    """One server's resident memory from its /metrics: by worker pid where it runs several; and,
    for a server this bench started, each process it spawned, from /proc."""
    try:
        response = await client.get(base + "/metrics", timeout=10)
    except httpx.HTTPError:
        return {}
    if response.status_code != 200:
        return {}
    by_pid = metric_by(response.text, "process_resident_memory_bytes", "pid")
    out = {(f"{name} pid {pid}" if pid else name): int(value) for pid, value in by_pid.items()}
    if base in OWN_PIDS and not any(by_pid):  # (a multi-worker server's workers are on its /metrics already)
        out.update({f"{name} child {child}": rss for child, rss in children_rss(OWN_PIDS[base]).items()})
    return out


async def snapshot(client: httpx.AsyncClient, base: str, watched: dict[str, str] | None = None) -> Snapshot:
    """The server's books at `base`, and the RSS of every process in `watched` (name: base URL)."""
    snap = Snapshot()
    try:
        response = await client.get(base + "/health", timeout=10)
        snap.health_status = response.status_code
        with contextlib.suppress(ValueError):
            snap.health = response.json()
    except httpx.HTTPError as exc:
        snap.health = {"error": type(exc).__name__}
    try:
        response = await client.get(base + "/metrics", timeout=10)
        if response.status_code == 200:
            text = response.text
            snap.active = metric_sum(text, "safethink_active_requests")
            snap.requests_total = metric_sum(text, "safethink_requests_total")
            snap.requests_by_status = metric_by(text, "safethink_requests_total", "status")
    except httpx.HTTPError:
        pass
    for name, url in (watched or {"server": base}).items():
        snap.rss.update(await process_rss(client, name, url))
    return snap


def plan(rng: Random, config: LoadConfig, model: str, number: str) -> Planned:
    """A random request. `number` opens the prompt, so that no two requests share the scorer's cache."""
    low, high = config.words
    words = int(math.exp(rng.uniform(math.log(low), math.log(high + 1))))
    prompt = f"Request {number}: " + " ".join(rng.choice(WORDS) for _ in range(max(1, words))) + ". Think step by step."
    mode = rng.choices(list(config.modes), weights=list(config.modes.values()))[0]
    stream = rng.random() < config.stream_share
    choices = 2 if rng.random() < config.two_choices_share else 1
    usage = stream and rng.random() < config.usage_share
    leave_after = None
    if stream:
        roll = rng.random()
        if roll < config.leave_before_first:
            leave_after = 0
        elif roll < config.leave_before_first + config.leave_after_chunks:
            leave_after = rng.randint(1, 8)
    body: dict[str, object] = {"model": model, "messages": [{"role": "user", "content": prompt}],
                               "max_tokens": rng.randint(*config.max_tokens), "stream": stream}
    if choices > 1:
        body["n"] = choices
    if usage:
        body["stream_options"] = {"include_usage": True}
    if MODES[mode] is not None:
        body["safethink"] = MODES[mode]
    return Planned(mode, stream, usage, leave_after, body)


def http_error(response: httpx.Response) -> str:
    try:
        kind = response.json()["error"]["type"]
    except (ValueError, KeyError, TypeError):
        kind = "no OpenAI error body"
    return f"HTTP {response.status_code} {kind}"


def _read_choice(out: Outcome, data: dict[str, object]) -> None:
    info = data.get("safethink")
    if isinstance(info, dict):
        out.interventions = max(out.interventions, len(info.get("interventions") or []))
        out.scorer_errors = max(out.scorer_errors, sum(1 for step in info.get("steps") or [] if step.get("scorer_error")))
        out.actions = [str(step.get("action")) for step in info.get("steps") or []] or out.actions
    usage = data.get("usage")
    if isinstance(usage, dict) and out.usage_asked:
        out.tokens, out.tokens_from_usage = int(usage.get("completion_tokens") or 0), True


async def send(client: httpx.AsyncClient, base: str, headers: dict[str, str], planned: Planned, began: float) -> Outcome:
    """One request, read as the plan says: to the end, or closed after some chunks."""
    out = Outcome(planned.mode, planned.stream, usage_asked=planned.usage or not planned.stream,
                  max_tokens=int(planned.body["max_tokens"]))  # type: ignore[call-overload]
    sent_at = time.perf_counter()
    try:
        async with client.stream("POST", base + "/v1/chat/completions", json=planned.body, headers=headers) as response:
            if response.status_code != 200:
                await response.aread()
                out.error = http_error(response)
            elif not planned.stream:
                data = json.loads(await response.aread())
                out.finish = data["choices"][0]["finish_reason"]
                _read_choice(out, data)
                if not out.tokens_from_usage:
                    out.error = "no usage in a whole response"
            elif planned.leave_after == 0:
                out.left = "before first chunk"  # the headers are in: the server has taken the request
            else:
                await read_stream(response, planned, out, sent_at)
    except httpx.HTTPError as exc:
        out.error = f"transport {type(exc).__name__}"
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        out.error = f"bad response {type(exc).__name__}"
    out.ended_s = time.perf_counter() - began
    return out


async def read_stream(response: httpx.Response, planned: Planned, out: Outcome, sent_at: float) -> None:
    done = False
    async for line in response.aiter_lines():
        if not line.startswith("data: "):
            continue
        if line == "data: [DONE]":
            done = True
            continue
        data = json.loads(line[6:])
        if "error" in data:
            out.error = f"stream error event {(data['error'] or {}).get('type')}"
            continue
        out.chunks += 1
        _read_choice(out, data)
        for choice in data.get("choices") or []:
            delta = choice.get("delta") or {}
            text = (delta.get("content") or "") + (delta.get("reasoning_content") or "")
            if text:
                if out.ttft_s is None:
                    out.ttft_s = time.perf_counter() - sent_at
                if out.first_text_s is None and text.strip():
                    out.first_text_s = time.perf_counter() - sent_at
                if not out.tokens_from_usage:
                    out.tokens += 1
            out.finish = choice.get("finish_reason") or out.finish
        if planned.leave_after is not None and out.chunks >= planned.leave_after and not done:
            out.left = f"after {planned.leave_after} chunks"
            return
    if out.error:
        return
    if not done:
        out.error = "broken stream: no [DONE]"
    elif out.finish is None:
        out.error = "broken stream: no finish_reason"
    elif out.usage_asked and not out.tokens_from_usage:
        out.error = "broken stream: no usage event"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def settle(client: httpx.AsyncClient, base: str, timeout_s: float, watched: dict[str, str] | None) -> tuple[Snapshot, float]:
    """The server's state once nothing is held (it notices clients that left on its own time), or at the timeout."""
    started = time.perf_counter()
    while True:
        snap = await snapshot(client, base, watched)
        if (snap.health_status == 200 and snap.held == 0) or time.perf_counter() - started > timeout_s:
            return snap, time.perf_counter() - started
        await asyncio.sleep(0.25)


async def probe(client: httpx.AsyncClient, base: str, headers: dict[str, str], model: str, n: int, timeout_s: float) -> dict[str, object]:
    """`n` short requests at once, steering off: each must be answered, which needs every slot the server had."""
    body = {"model": model, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 2,
            "safethink": {"early_steps": 0}}

    async def one() -> str | None:
        try:
            response = await client.post(base + "/v1/chat/completions", json=body, headers=headers, timeout=timeout_s)
            return None if response.status_code == 200 else http_error(response)
        except httpx.HTTPError as exc:
            return f"transport {type(exc).__name__}"

    started = time.perf_counter()
    errors = Counter(e for e in await asyncio.gather(*(one() for _ in range(n))) if e)
    answered = n - sum(errors.values())
    return {"sent": n, "answered": answered, "ok": answered == n, "seconds": round(time.perf_counter() - started, 2),
            "timeout_s": timeout_s, "errors": dict(errors)}


async def served_model(client: httpx.AsyncClient, base: str, headers: dict[str, str]) -> str:
    response = await client.get(base + "/v1/models", headers=headers, timeout=30)
    response.raise_for_status()
    return response.json()["data"][0]["id"]


async def run_load(base: str, config: LoadConfig, api_key: str | None = None,
                   watched: dict[str, str] | None = None, progress: Callable[[str], None] | None = None) -> LoadReport:
    """The whole run against a server at `base` (no /v1): load for `config.duration_s`, drain, settle,
    the final state and the probe. `watched`: the server processes whose memory is sampled, by name
    (default: the one at `base`)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    report = LoadReport(config=asdict(config))
    outcomes: list[Outcome] = []
    timeout = httpx.Timeout(config.request_timeout_s, connect=10.0)
    limits = httpx.Limits(max_connections=config.concurrency + 8, max_keepalive_connections=config.concurrency + 8)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client, \
            httpx.AsyncClient(timeout=30) as monitor:
        model = await served_model(monitor, base, headers)
        report.start = await snapshot(monitor, base, watched)
        began = time.perf_counter()
        stop_at = began + config.duration_s
        in_flight = 0

        async def worker(index: int) -> None:
            nonlocal in_flight
            rng = Random(f"{config.seed}-{index}")
            number = 0
            while time.perf_counter() < stop_at:
                number += 1
                planned = plan(rng, config, model, f"{config.seed}.{index}.{number}")
                report.sent += 1
                in_flight += 1
                report.max_in_flight = max(report.max_in_flight, in_flight)
                try:
                    outcomes.append(await send(client, base, headers, planned, began))
                except asyncio.CancelledError:
                    report.cut_at_drain += 1
                    raise
                finally:
                    in_flight -= 1

        async def sampler() -> None:
            while True:
                snap = await snapshot(monitor, base, watched)
                report.samples.append({"t": round(time.perf_counter() - began, 1), "rss": snap.rss,
                                       "active": snap.active, "running": snap.health.get("running"),
                                       "waiting": snap.health.get("waiting"), "in_flight": in_flight})
                await asyncio.sleep(config.sample_s)

        workers = [asyncio.create_task(worker(i)) for i in range(config.concurrency)]
        sampling = asyncio.create_task(sampler())
        await asyncio.sleep(config.duration_s)
        if progress:
            progress(f"{config.duration_s:g} s of load: {report.sent} requests sent, {in_flight} in flight; draining")
        _done, pending = await asyncio.wait(workers, timeout=config.drain_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        sampling.cancel()
        await asyncio.gather(sampling, return_exceptions=True)
        report.load_s = max([o.ended_s for o in outcomes] or [time.perf_counter() - began])
        report.end, report.settle_wait_s = await settle(monitor, base, config.settle_s, watched)
        if report.end.health_status == 200:
            report.probe = await probe(client, base, headers, model, config.concurrency, config.probe_timeout_s)
    report.requests = outcomes
    summarise(report, outcomes)
    return report


def summarise(report: LoadReport, outcomes: list[Outcome]) -> None:
    completed: Counter[str] = Counter()
    left: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    by_mode: dict[str, Counter[str]] = {}
    for o in outcomes:
        if o.error:
            errors[o.error] += 1
            outcome = "error"
        elif o.left:
            left["after k chunks" if o.left.startswith("after") else o.left] += 1
            outcome = "left"
        else:
            completed[o.finish or "none"] += 1
            outcome = o.finish or "none"
        by_mode.setdefault(o.mode, Counter())[outcome] += 1
        by_mode[o.mode]["interventions"] += o.interventions > 0
        by_mode[o.mode]["scorer errors"] += o.scorer_errors > 0
        report.with_interventions += o.interventions > 0
        report.with_scorer_errors += o.scorer_errors > 0
    report.completed, report.left, report.errors = dict(completed), dict(left), dict(errors)
    report.by_mode = {mode: dict(counts) for mode, counts in sorted(by_mode.items())}
    ttfts = [o.ttft_s * 1000 for o in outcomes if o.ttft_s is not None]
    if ttfts:
        report.ttft_p50_ms, report.ttft_p99_ms = statistics.median(ttfts), percentile(ttfts, 0.99)
    firsts = [o.first_text_s * 1000 for o in outcomes if o.first_text_s is not None]
    if firsts:
        report.first_text_p50_ms, report.first_text_p99_ms = statistics.median(firsts), percentile(firsts, 0.99)
    report.output_tokens = sum(o.tokens for o in outcomes)
    report.tokens_from_usage = sum(o.tokens for o in outcomes if o.tokens_from_usage)
    report.output_tokens_per_s = report.output_tokens / report.load_s if report.load_s else 0.0


def _mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.1f} MiB"


def render(report: LoadReport) -> None:
    """The report as tables (rich when installed, else plain lines)."""
    c = report.config
    counted = report.counted
    memory = report.memory
    rows = [
        ("load", f"{c['duration_s']:g} s, {c['concurrency']} clients, seed {c['seed']}; last request ended at {report.load_s:.1f} s"),
        ("requests sent", str(report.sent)),
        ("completed", ", ".join(f"{k} {v}" for k, v in sorted(report.completed.items())) or "0"),
        ("with interventions", str(report.with_interventions)),
        ("with scorer errors", str(report.with_scorer_errors)),
        ("left on purpose", ", ".join(f"{k} {v}" for k, v in sorted(report.left.items())) or "0"),
        ("cut at the drain limit", str(report.cut_at_drain)),
        ("errors", ", ".join(f"{k}: {v}" for k, v in sorted(report.errors.items())) or "none"),
        ("TTFT p50 / p99", "n/a" if report.ttft_p50_ms is None else f"{report.ttft_p50_ms:.0f} / {report.ttft_p99_ms:.0f} ms"),
        ("first non-blank text p50 / p99", "n/a" if report.first_text_p50_ms is None else
         f"{report.first_text_p50_ms:.0f} / {report.first_text_p99_ms:.0f} ms"),
        ("output tokens/s", f"{report.output_tokens_per_s:.1f} ({report.output_tokens} tokens, {report.tokens_from_usage} from usage)"),
        ("max in flight", str(report.max_in_flight)),
        ("server RSS start / end", f"{_mib(report.start.rss_bytes)} / {_mib(report.end.rss_bytes)}"),
        *((f"RSS of {process} (MiB) by minute", " ".join(f"{m}:{v:g}" for m, v in trend["by_minute_mib"].items()))  # type: ignore[attr-defined]
          for process, trend in memory.items()),
        *((f"RSS of {process}, last third", "n/a" if trend["last_third_pct_per_5min"] is None else
           f"{trend['last_third_pct_per_5min']:+.2f}% per 5 min") for process, trend in memory.items()),
        ("/health at the end", f"{report.end.health_status} {json.dumps(report.end.health)} (after {report.settle_wait_s:.1f} s)"),
        ("active gauge at the end", "n/a" if report.end.active is None else f"{report.end.active:g}"),
        ("requests_total delta / sent", f"{'n/a' if counted is None else f'{counted:g}'} / {report.sent}"),
        ("delta by status", ", ".join(f"{k} {v:g}" for k, v in report.counted_by_status.items()) or "none"),
        ("probe after the load", "not run" if not report.probe else
         f"{report.probe['answered']}/{report.probe['sent']} answered in {report.probe['seconds']} s"),
    ]
    modes = sorted({k for counts in report.by_mode.values() for k in counts})
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        for name, value in rows:
            print(f"{name:28} {value}")
        for mode, counts in report.by_mode.items():
            print(f"{mode:28} " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    else:
        console = Console(width=max(Console().width, 120))  # wide enough for the tables when not a terminal
        table = Table(title="load", show_header=False)
        table.add_column("")
        table.add_column("")
        for name, value in rows:
            table.add_row(name, value)
        console.print(table)
        per_mode = Table(title="outcomes by steering mode")
        per_mode.add_column("mode")
        for key in modes:
            per_mode.add_column(key, justify="right")
        for mode, counts in report.by_mode.items():
            per_mode.add_row(mode, *(str(counts.get(key, 0)) for key in modes))
        console.print(per_mode)
    for problem in report.problems():
        print(f"FAILED: {problem}")


@contextlib.contextmanager
def own_process(flags: list[str], env: dict[str, str] | None = None) -> Iterator[str]:
    """`safethink serve` with these flags (and `env`) on a free port, stopped afterwards: its base URL."""
    port = free_port()
    log = Path("/tmp") / f"load-serve-{port}.log"
    command = [sys.executable, "-m", "safethink_server.cli", "serve", "--port", str(port), "--log-level", "warning", *flags]
    proc = start(command, f"http://127.0.0.1:{port}/health", log, env)
    OWN_PIDS[f"http://127.0.0.1:{port}"] = proc.pid
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        print(f"server log: {log}", file=sys.stderr)


@contextlib.contextmanager
def own_servers(server_args: list[str], proxy: bool) -> Iterator[tuple[str, dict[str, str]]]:
    """The server the clients talk to (its base URL) and every server process to watch, by name.
    Plain: `safethink serve --engine hf --allow-client-overrides` and `server_args`. Proxy: that
    server with steering off as the upstream, and the gateway in front of it with `server_args`."""
    with contextlib.ExitStack() as stack:
        if not proxy:
            base = stack.enter_context(own_process(["--engine", "hf", "--allow-client-overrides", *server_args]))
            yield base, {"server": base}
            return
        upstream = stack.enter_context(own_process(["--engine", "hf", "--early-steps", "0", "--allow-assistant-prefill",
                                                    "--max-concurrent-sequences", "2"]))
        base = stack.enter_context(own_process(["--engine", "upstream", "--upstream-url", upstream + "/v1",
                                                "--allow-client-overrides", *server_args]))
        yield base, {"proxy": base, "upstream": upstream}


def config_from(args: argparse.Namespace) -> LoadConfig:
    return LoadConfig(duration_s=args.duration_s, concurrency=args.concurrency, seed=args.seed,
                      words=(args.min_words, args.max_words), max_tokens=(args.min_tokens, args.max_tokens),
                      stream_share=args.stream_share, two_choices_share=args.two_choices_share, usage_share=args.usage_share, leave_before_first=args.leave_before_first,
                      leave_after_chunks=args.leave_after_chunks, request_timeout_s=args.request_timeout_s,
                      drain_s=args.drain_s, settle_s=args.settle_s, probe_timeout_s=args.probe_timeout_s, sample_s=args.sample_s,
                      max_growth_pct_per_5min=args.max_growth)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration-s", type=float, default=60.0, help="time new requests are sent for")
    parser.add_argument("--concurrency", type=int, default=8, help="clients, each with one request at a time")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--url", help="an existing server's base URL (no /v1); default: start one")
    parser.add_argument("--api-key", help="with --url: the server's API key")
    parser.add_argument("--proxy", action="store_true", help="start an hf upstream and load the gateway in front of it")
    parser.add_argument("--server-args", default=DEFAULT_SERVER_ARGS,
                        help=f"more flags for the server the bench starts (default: {DEFAULT_SERVER_ARGS!r})")
    parser.add_argument("--min-words", type=int, default=3)
    parser.add_argument("--max-words", type=int, default=300)
    parser.add_argument("--min-tokens", type=int, default=8, help="max_tokens of a request, at least")
    parser.add_argument("--max-tokens", type=int, default=128, help="max_tokens of a request, at most")
    parser.add_argument("--stream-share", type=float, default=0.85)
    parser.add_argument("--two-choices-share", type=float, default=0.15, help="of requests, those asking for n = 2")
    parser.add_argument("--usage-share", type=float, default=0.5, help="of streamed requests, those asking for usage")
    parser.add_argument("--leave-before-first", type=float, default=0.12, help="of streamed requests, closed before the first chunk")
    parser.add_argument("--leave-after-chunks", type=float, default=0.12, help="of streamed requests, closed after 1-8 chunks")
    parser.add_argument("--request-timeout-s", type=float, default=300.0, help="a client's read timeout")
    parser.add_argument("--drain-s", type=float, default=180.0, help="how long requests in flight may finish after the time is up")
    parser.add_argument("--settle-s", type=float, default=30.0, help="how long to wait for the server to hold no slot")
    parser.add_argument("--probe-timeout-s", type=float, default=120.0)
    parser.add_argument("--sample-s", type=float, default=5.0, help="the server's RSS and slots are sampled this often (in the JSON)")
    parser.add_argument("--max-growth", type=float, default=1.0,
                        help=f"RSS growth in %% per 5 minutes over the last third that fails a run of {MEMORY_CHECKED_FROM_S:g} s or more")
    parser.add_argument("--json", type=Path, help="write the report here as JSON")
    args = parser.parse_args()
    config = config_from(args)

    def progress(line: str) -> None:
        print(line, file=sys.stderr)

    with contextlib.ExitStack() as stack:
        if args.url:
            base = args.url.rstrip("/").removesuffix("/v1")
            watched = {"server": base}
        else:
            base, watched = stack.enter_context(own_servers(shlex.split(args.server_args), args.proxy))
        progress(f"load against {base}: {config.concurrency} clients for {config.duration_s:g} s")
        report = asyncio.run(run_load(base, config, args.api_key, watched, progress))
    render(report)
    if args.json:
        args.json.write_text(json.dumps(report.as_json(), indent=2) + "\n")
    return 1 if report.problems() else 0


if __name__ == "__main__":
    sys.exit(main())
