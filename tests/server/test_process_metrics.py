"""The server's own memory on /metrics: read from /proc at each scrape in one process, and under
`--workers N` (prometheus_client's multiprocess mode) one series per worker, labelled by its pid."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from safethink_server.metrics import PROCESS_GAUGES, Metrics, memory_limit_bytes


def test_one_process_reports_its_memory():
    text = Metrics().exposition().decode()
    rss = re.findall(r"^process_resident_memory_bytes (\S+)$", text, re.M)
    assert len(rss) == 1 and float(rss[0]) > 10e6, text


def test_each_worker_reports_its_own_memory(tmp_path):
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    worker = "from safethink_server.metrics import Metrics; Metrics().refresh_process(); print(__import__('os').getpid())"
    pids = {subprocess.run([sys.executable, "-c", worker], env=env, capture_output=True, text=True, check=True).stdout.strip()
            for _ in range(2)}
    scrape = "from prometheus_client import generate_latest; from safethink_server.metrics import exposed; print(generate_latest(exposed(None)).decode())"
    text = subprocess.run([sys.executable, "-c", scrape], env=env, capture_output=True, text=True, check=True).stdout
    for name in PROCESS_GAUGES:
        series = dict(re.findall(rf'^{name}{{pid="(\d+)"}} (\S+)$', text, re.M))
        assert set(series) == pids, (name, text)
    rss = dict(re.findall(r'^process_resident_memory_bytes{pid="(\d+)"} (\S+)$', text, re.M))
    assert all(float(value) > 10e6 for value in rss.values()), rss


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
