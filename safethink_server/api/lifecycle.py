"""Readiness and shutdown. On SIGTERM the server drains: it stops admitting requests (503), lets the
ones in flight finish for up to the drain timeout, then aborts the rest, and only then lets uvicorn
stop. Kubernetes sends SIGTERM and waits terminationGracePeriodSeconds before SIGKILL."""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import anyio

from safethink_server.api.errors import APIError

logger = logging.getLogger(__name__)


def shutting_down() -> APIError:
    return APIError(503, "the server is shutting down; retry on another replica", code="server_shutting_down")


class Lifecycle:
    def __init__(self, drain_timeout_s: float) -> None:
        self.drain_timeout_s = drain_timeout_s
        self.draining = False
        self.aborting = False  # the drain timed out: requests still in flight are being aborted
        self.in_flight = 0
        self._scopes: set[anyio.CancelScope] = set()
        self._drain: asyncio.Task[None] | None = None

    def admit(self) -> None:
        """Count a request in, or refuse it while the server drains."""
        if self.draining:
            raise shutting_down()
        self.in_flight += 1

    def leave(self) -> None:
        self.in_flight -= 1

    @contextmanager
    def abortable(self) -> Iterator[anyio.CancelScope]:
        """A scope the drain cancels when its timeout passes; `cancelled_caught` tells the request."""
        with anyio.CancelScope() as scope:
            if self.aborting:  # entered after the drain's sweep
                scope.cancel()
            self._scopes.add(scope)
            try:
                yield scope
            finally:
                self._scopes.discard(scope)

    def handle_sigterm(self) -> None:
        """Drain on SIGTERM, then pass the signal on to the handler that was there before (uvicorn's,
        which stops the server). Only the main thread can take signals; elsewhere nothing changes."""
        if threading.current_thread() is not threading.main_thread():
            return
        loop = asyncio.get_running_loop()
        previous = signal.getsignal(signal.SIGTERM)

        def on_sigterm() -> None:
            if self._drain is None:
                self._drain = loop.create_task(self.drain(lambda: _pass_on(previous)))

        loop.add_signal_handler(signal.SIGTERM, on_sigterm)

    async def drain(self, then: Any = None) -> None:
        self.draining = True
        began = time.monotonic()
        logger.warning("draining: %d requests in flight, new ones refused; aborting any left after %.0f s",
                       self.in_flight, self.drain_timeout_s)
        while self.in_flight and time.monotonic() - began < self.drain_timeout_s:
            await asyncio.sleep(0.05)
        if self.in_flight:
            logger.warning("drain timeout: aborting %d requests", self.in_flight)
            self.aborting = True
            for scope in list(self._scopes):
                scope.cancel()
            deadline = time.monotonic() + 5.0
            while self.in_flight and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        logger.warning("drained in %.1f s", time.monotonic() - began)
        if then is not None:
            then()


def _pass_on(previous: Any) -> None:
    asyncio.get_running_loop().remove_signal_handler(signal.SIGTERM)
    signal.signal(signal.SIGTERM, previous)
    if callable(previous):
        previous(signal.SIGTERM, None)
    else:
        signal.raise_signal(signal.SIGTERM)
