"""The server's own memory on /metrics: read from /proc at each scrape in one process, and under
`--workers N` (prometheus_client's multiprocess mode) one series per worker, labelled by its pid."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from safethink_server.metrics import PROCESS_GAUGES, Metrics, memory_limit_bytes

ROOT = Path(__file__).resolve().parents[2]


def test_one_process_reports_its_memory():
    text = Metrics().exposition().decode()
    rss = re.findall(r"^process_resident_memory_bytes (\S+)$", text, re.M)
    assert len(rss) == 1 and float(rss[0]) > 10e6, text


def scrape(env: dict[str, str]) -> str:
    code = "from prometheus_client import generate_latest; from safethink_server.metrics import exposed; print(generate_latest(exposed(None)).decode())"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, cwd=ROOT).stdout


def test_each_worker_reports_its_own_memory_until_it_is_gone(tmp_path):
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    worker = ("import os, sys; from safethink_server.metrics import Metrics; m = Metrics(); m.active.inc(); m.refresh_process(); "
              "print(os.getpid(), flush=True); sys.stdin.read()")
    workers = [subprocess.Popen([sys.executable, "-c", worker], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                cwd=ROOT) for _ in range(2)]
    try:
        pids = [w.stdout.readline().strip() for w in workers]
        text = scrape(env)
        for name in PROCESS_GAUGES:
            assert set(re.findall(rf'^{name}{{pid="(\d+)"}} \S+$', text, re.M)) == set(pids), (name, text)
        rss = re.findall(r'^process_resident_memory_bytes{pid="\d+"} (\S+)$', text, re.M)
        assert all(float(value) > 10e6 for value in rss) and "safethink_active_requests 2.0" in text, text
        workers[0].kill()  # as the kernel kills a worker over its memory limit
        workers[0].wait()
        text = scrape(env)
        assert set(re.findall(r'^process_resident_memory_bytes{pid="(\d+)"}', text, re.M)) == {pids[1]}, text
        assert "safethink_active_requests 1.0" in text, "a dead worker's requests are not active"
    finally:
        for w in workers:
            w.kill()
            w.wait()


def test_the_memory_limit_is_the_cgroups_else_the_machines(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       16384 kB\nMemFree:        1024 kB\n")
    v2, v1 = tmp_path / "v2", tmp_path / "v1"
    (v1 / "memory").mkdir(parents=True)
    v2.mkdir()
    (v2 / "memory.max").write_text("4294967296\n")
    (v1 / "memory" / "memory.limit_in_bytes").write_text("2147483648\n")
    assert memory_limit_bytes(v2, meminfo) == 4294967296 and memory_limit_bytes(v1, meminfo) == 2147483648
    (v2 / "memory.max").write_text("max\n")
    (v1 / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    assert memory_limit_bytes(v2, meminfo) == memory_limit_bytes(v1, meminfo) == 16384 * 1024
    assert memory_limit_bytes(tmp_path / "none", tmp_path / "no-meminfo") == float("inf")
    assert re.search(r"^safethink_memory_limit_bytes \S+$", Metrics().exposition().decode(), re.M)
