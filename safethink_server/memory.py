"""Bounds on the server's native memory, set once per process before the first forward.

Under traffic of varied shapes a CPU server's resident memory grows in native code, while Python's
own heap stays flat:
- oneDNN (torch's CPU kernels) keeps a compiled kernel for every shape it has run, up to 1,024 by
  default, and a prompt of a new length is a new shape for every linear layer;
- glibc gives threads that allocate at once arenas of their own (up to 8 per core), and keeps what
  is freed in each for reuse instead of returning it to the system.

Each bound is read from the process environment, so a container sets it once; unset, the value
here applies. The throughput each one costs is measured by `bench/memory_bounds.py`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import threading
import time

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

logger = logging.getLogger(__name__)

M_ARENA_MAX = -8  # mallopt's parameter number (glibc malloc.h)


class NativeMemorySettings(BaseSettings):
    """Read from the environment under these exact names (the first two are oneDNN's and glibc's own)."""

    model_config = SettingsConfigDict(case_sensitive=True, extra="ignore")

    ONEDNN_PRIMITIVE_CACHE_CAPACITY: int = Field(
        default=64, ge=0, description="kernels oneDNN keeps compiled, least recently used evicted (oneDNN's default: 1024)")
    MALLOC_ARENA_MAX: int = Field(default=2, ge=0, description="glibc malloc arenas at most (0: glibc's default, 8 per core)")
    SAFETHINK_MALLOC_TRIM_S: float = Field(
        default=10.0, ge=0, description="seconds between returns of freed heap memory to the system (malloc_trim; 0: never)")

    @field_validator("SAFETHINK_MALLOC_TRIM_S")
    @classmethod
    def _not_continuous(cls, v: float) -> float:
        if 0 < v < 1:
            raise ValueError("trim at most once a second (each trim holds the allocator's locks), or 0: never")
        return v


_bounded = False


def bound_native_memory() -> NativeMemorySettings:
    """Apply the bounds to this process (once; later calls change nothing)."""
    global _bounded
    settings = NativeMemorySettings()
    if _bounded:
        return settings
    _bounded = True
    # oneDNN reads its variable when it builds its first kernel, after this; glibc reads its own when a
    # process starts, so a process spawned from here (vLLM's engine core) gets both bounds from them
    os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = str(settings.ONEDNN_PRIMITIVE_CACHE_CAPACITY)
    if settings.MALLOC_ARENA_MAX > 0:
        os.environ["MALLOC_ARENA_MAX"] = str(settings.MALLOC_ARENA_MAX)
    libc = _glibc()
    if libc is None:
        logger.info("not glibc: the malloc bounds do not apply")
        return settings
    if settings.MALLOC_ARENA_MAX > 0:  # for arenas made from now on: this runs before the engine's threads start
        libc.mallopt(M_ARENA_MAX, settings.MALLOC_ARENA_MAX)
    if settings.SAFETHINK_MALLOC_TRIM_S > 0:  # this process's heap only (not a spawned engine core's)
        threading.Thread(target=_trim_every, args=(libc, settings.SAFETHINK_MALLOC_TRIM_S), name="malloc-trim", daemon=True).start()
    return settings


def _glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    libc = ctypes.CDLL(name)
    return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None


def _trim_every(libc: ctypes.CDLL, interval_s: float) -> None:
    while True:
        time.sleep(interval_s)
        libc.malloc_trim(0)
