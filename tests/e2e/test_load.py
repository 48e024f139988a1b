"""A short load run (bench/load.py's own functions) against a real server: every request is counted
once, no slot is held afterwards, and the server is still healthy and serving."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.load import LoadConfig, LoadReport, run_load
from tests.support.servers import running_server

pytestmark = pytest.mark.e2e  # a real server process, vLLM or Prometheus: `make test` runs it, `make test-fast` does not

# 8 clients over 2 engine slots: most requests queue for a slot, and some leave while others run.
CONFIG = LoadConfig(duration_s=25, concurrency=8, seed=7, words=(3, 150), max_tokens=(8, 40), stream_share=0.85,
                    usage_share=0.5, leave_before_first=0.2, leave_after_chunks=0.2,
                    modes={"default": 0.25, "never breaches": 0.35, "always breaches": 0.3, "steering off": 0.1},
                    request_timeout_s=180, drain_s=90, settle_s=30, probe_timeout_s=60)


async def test_a_load_run_leaves_the_books_balanced_and_no_slot_held():
    with running_server("--engine", "hf", "--allow-client-overrides", "--max-concurrent-sequences", "2",
                        "--max-step-tokens", "24") as url:
        report = await run_load(url, CONFIG)

    end, sent, counted = report.end, report.sent, report.counted
    assert end.health_status == 200 and end.health.get("status") == "ok", f"/health at the end: {end.health_status} {end.health}"
    assert end.health.get("running") == 0 and end.health.get("waiting") == 0, f"slot held after the load: {end.health}"
    assert end.active == 0, f"safethink_active_requests is {end.active} after the load"
    assert counted == sent, f"safethink_requests_total grew by {counted} ({report.counted_by_status}), {sent} requests were sent"
    assert report.probe.get("ok"), f"the server did not serve {CONFIG.concurrency} short requests after the load: {report.probe}"
    assert report.server_errors == 0 and not any(kind.startswith("HTTP 5") for kind in report.errors), report.errors
    assert not report.errors, f"errors under load: {report.errors}"
    assert report.cut_at_drain == 0, f"{report.cut_at_drain} requests still in flight {CONFIG.drain_s} s after the load"
    assert sent >= CONFIG.concurrency, f"too few requests to say anything: {sent}"
    assert sum(report.left.values()) >= 1, f"no client left on purpose: {report.left}"
    assert report.with_interventions + report.completed.get("content_filter", 0) >= 1, f"no steering outcome: {report.by_mode}"
    normal = [o for o in report.requests if o.finish in ("stop", "length") and not o.interventions and not o.error and not o.left]
    assert normal, f"no normal completion: {report.completed}"
    assert report.problems() == []


def soak_report(duration_s: float, rss_at: Callable[[float], float]) -> LoadReport:
    """A report of a run that met its counts, with the server's RSS sampled every 5 s."""
    report = LoadReport(config={"duration_s": duration_s, "max_growth_pct_per_5min": 1.0})
    report.start.health_status = report.end.health_status = 200
    report.start.health = report.end.health = {"status": "ok", "running": 0, "waiting": 0}
    report.start.active = report.end.active = 0.0
    report.start.requests_total, report.end.requests_total, report.sent = 0.0, 10.0, 10
    report.samples = [{"t": float(t), "rss": {"server": int(rss_at(t))}} for t in range(0, int(duration_s) + 1, 5)]
    return report


@settings(max_examples=60, deadline=None)
@given(growth=st.floats(min_value=-5.0, max_value=5.0), base_mib=st.floats(min_value=200, max_value=4000),
       duration_s=st.sampled_from([600.0, 900.0, 1800.0]))
def test_the_soak_fails_on_memory_still_growing_in_its_last_third(growth, base_mib, duration_s):
    """RSS that rose early and then grows linearly by `growth`% per 5 minutes over its last third:
    the slope is read back, and a run of 900 s or more fails on it when it is over 1%."""
    base = base_mib * 2**20
    third = duration_s * 2 / 3

    def rss_at(t: float) -> float:
        return base * (0.5 + t / third * 0.5) if t < third else base * (1 + growth / 100 * (t - third) / 300)

    report = soak_report(duration_s, rss_at)
    measured = report.memory["server"]["last_third_pct_per_5min"]
    mean_share = 1 + growth / 100 * (duration_s - third) / 600  # the slope is read over the last third's mean
    assert measured == pytest.approx(growth / mean_share, rel=1e-3, abs=1e-6)
    flagged = any("still grows" in problem for problem in report.problems())
    assert flagged == (duration_s >= 900 and measured > 1.0)
    assert report.memory["server"]["by_minute_mib"][int(duration_s // 60)] == pytest.approx(rss_at(duration_s - duration_s % 5) / 2**20, abs=0.1)
