"""Real server processes for tests and benches: a free port, a subprocess up once healthy, its log and
its metrics."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import httpx

EMBEDDED_MODEL = "SmolLM2-135M-Instruct"
LOG_DIR = Path(os.environ.get("PYTEST_TMPDIR", "/tmp"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_process(command: list[str], health_url: str, log: Path, env: dict[str, str] | None = None,
                    timeout_s: float = 240.0) -> Iterator[None]:
    """A real server subprocess, up once `health_url` answers 200; stopped afterwards."""
    with log.open("w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{command[2:4]} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(health_url, timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{command[2:4]} did not start in {timeout_s}s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


@contextmanager
def running_server(*flags: str, env: dict[str, str] | None = None, timeout_s: float = 240.0) -> Iterator[str]:
    """`safethink serve` as a real subprocess on a free port; yields its base URL."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "safethink_server.cli", "serve", "--port", str(port), "--log-level", "warning", *flags]
    with running_process(command, url + "/health", LOG_DIR / f"safethink-serve-{port}.log", env, timeout_s):
        yield url


def server_log(url: str) -> str:
    """What a server that `running_server` started has written to its stdout and stderr so far."""
    return (LOG_DIR / f"safethink-serve-{urlsplit(url).port}.log").read_text(errors="replace")


def series(url: str, name: str, **labels: str) -> float:
    """A metric on a server's /metrics, summed over the label sets that have `labels`."""
    total = 0.0
    for match in re.finditer(rf"^{name}(?:{{([^}}]*)}})? (\S+)$", httpx.get(url + "/metrics").text, re.M):
        have = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(match.group(2))
    return total
