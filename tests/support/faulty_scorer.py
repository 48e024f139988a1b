"""A real HTTP server speaking vLLM's /classify that misbehaves on purpose: a remote scorer's faults
cannot be caused on demand with a real one."""

from __future__ import annotations

import asyncio

from fastapi import FastAPI
from fastapi.responses import JSONResponse

from tests.support.threaded_server import ThreadedServer


class FaultyScorer(ThreadedServer):
    """`behaviour`: "error" (every call a 500), "stall" (no answer for 5 s), or "safe" (p_unsafe 0.01)."""

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
                await asyncio.sleep(5)
            return JSONResponse({"object": "list", "data": [{"index": i, "probs": [0.99, 0.01]} for i in range(len(body["input"]))]})

        super().__init__(app, port)
