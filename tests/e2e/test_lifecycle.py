"""Health, readiness and shutdown, on real server processes and a real engine."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
import uvicorn

from tests.support.servers import EMBEDDED_MODEL, LOG_DIR, free_port

pytestmark = pytest.mark.e2e  # a real server process, vLLM or Prometheus: `make test` runs it, `make test-fast` does not

STORY = {"model": EMBEDDED_MODEL, "messages": [{"role": "user", "content": "Write a long story about a lighthouse keeper."}],
         "stream": True, "safethink": {"early_steps": 0}}


def start_server(*flags: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = (LOG_DIR / f"safethink-lifecycle-{port}.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "safethink_server.cli", "serve", "--port", str(port), "--engine", "hf",
                             "--allow-client-overrides", "--log-level", "warning", *flags], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 240
    while True:
        assert proc.poll() is None, f"the server exited with {proc.returncode}"
        try:
            if httpx.get(url + "/health/ready", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "the server did not become ready"
        time.sleep(0.5)


class StreamReader(threading.Thread):
    """A streamed request read in the background; `events` are its data lines as they come."""

    def __init__(self, url: str, body: dict) -> None:
        super().__init__(daemon=True)
        self.url, self.body = url, body
        self.events: list[str] = []
        self.started_streaming = threading.Event()

    def run(self) -> None:
        with httpx.stream("POST", self.url + "/v1/chat/completions", json=self.body, timeout=120) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    self.events.append(line[6:])
                    self.started_streaming.set()

    def texts(self) -> str:
        out = ""
        for event in self.events:
            if event != "[DONE]" and "choices" in event:
                for choice in json.loads(event)["choices"]:
                    out += (choice["delta"].get("content") or "") + (choice["delta"].get("reasoning_content") or "")
        return out


def sigterm_while_streaming(url: str, proc: subprocess.Popen, body: dict) -> tuple[StreamReader, httpx.Response, httpx.Response]:
    reader = StreamReader(url, body)
    reader.start()
    assert reader.started_streaming.wait(120)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    refused = httpx.post(url + "/v1/chat/completions", json={**body, "stream": False, "max_tokens": 4}, timeout=30)
    ready = httpx.get(url + "/health/ready", timeout=10)
    return reader, refused, ready


def assert_refused_while_draining(refused: httpx.Response, ready: httpx.Response) -> None:
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "server_shutting_down", refused.text
    assert ready.status_code == 503 and ready.json()["status"] == "draining"


def test_sigterm_lets_a_stream_in_flight_finish_and_refuses_new_requests():
    proc, url = start_server("--drain-timeout-s", "120")
    try:
        reader, refused, ready = sigterm_while_streaming(url, proc, {**STORY, "max_tokens": 160})
        assert_refused_while_draining(refused, ready)
        reader.join(120)
        assert reader.events[-1] == "[DONE]"
        events = [json.loads(e) for e in reader.events[:-1]]  # (as JSON: the model's own text may say "error")
        finishes = [c.get("finish_reason") for e in events for c in e.get("choices", [])]
        assert finishes[-1] == "length" and not any("error" in e for e in events)
        assert proc.wait(30) == -signal.SIGTERM  # uvicorn passes the signal on once it has stopped
    finally:
        proc.kill()


def test_a_stream_still_running_at_the_drain_timeout_is_aborted_with_an_error_event():
    proc, url = start_server("--drain-timeout-s", "2", "--max-step-tokens", "16")
    try:
        steered = {key: value for key, value in STORY.items() if key != "safethink"}
        reader, refused, ready = sigterm_while_streaming(url, proc, {**steered, "max_tokens": 4000})
        assert_refused_while_draining(refused, ready)
        reader.join(60)
        assert not reader.is_alive()
        assert reader.events[-1] == "[DONE]"
        error = json.loads(reader.events[-2])["error"]
        assert error["code"] == "server_shutting_down" and error["param"] is None, error
        assert reader.texts()
        assert proc.wait(30) == -signal.SIGTERM
    finally:
        proc.kill()


@pytest.mark.asyncio(loop_scope="session")
async def test_a_dead_hf_engine_turns_health_and_liveness_503_and_requests_are_refused():
    """The fault, a worker thread that is gone, cannot be caused from outside the process: the real
    app and engine run in this process, and the test shuts the engine's worker down."""
    from safethink_server.config import ServerSettings
    from safethink_server.server import build_app

    settings = ServerSettings(engine="hf", port=free_port())
    app = build_app(settings)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=settings.port, log_level="warning"))
    task = asyncio.create_task(server.serve())
    url = f"http://127.0.0.1:{settings.port}"
    try:
        while not server.started:
            await asyncio.sleep(0.2)
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            for path in ("/health", "/health/live", "/health/ready"):
                assert (await http.get(path)).status_code == 200
            app.state.safethink.engine.executor.shutdown(wait=True)
            for path in ("/health", "/health/live", "/health/ready"):
                response = await http.get(path)
                assert response.status_code == 503 and response.json()["status"] == "dead", (path, response.text)
            refused = await http.post("/v1/chat/completions", json={**STORY, "stream": False, "max_tokens": 4})
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "engine_dead"
            metrics = (await http.get("/metrics")).text
            assert 'safethink_requests_total{engine="hf",key="anonymous",status="unavailable"} 1.0' in metrics
    finally:
        server.should_exit = True
        await task
