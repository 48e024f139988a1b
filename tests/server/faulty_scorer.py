"""A real HTTP server speaking vLLM's /classify that misbehaves on purpose: a remote scorer's faults
cannot be caused on demand with a real one."""

from __future__ import annotations

import asyncio
import threading
import time

import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse


class FaultyScorer:
    """`behaviour`: "error" (every call a 500), "stall" (no answer for a minute), or "safe" (p_unsafe 0.01)."""

    def __init__(self, port: int, behaviour: str) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.behaviour = behaviour
        self.calls = 0
        app = FastAPI()

        @app.post("/classify")
        async def classify(body: dict) -> JSONResponse:
            self.calls += 1
            if self.behaviour == "error":
                return JSONResponse({"error": {"message": "scorer crashed"}}, status_code=500)
            if self.behaviour == "stall":
                await asyncio.sleep(60)
            return JSONResponse({"object": "list", "data": [{"index": i, "probs": [0.99, 0.01]} for i in range(len(body["input"]))]})

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> FaultyScorer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("the faulty scorer did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
