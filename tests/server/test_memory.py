"""The native memory bounds take effect in a real process: glibc makes no more arenas than the bound
however many threads allocate, oneDNN's variable is set before any kernel is built, and freed memory
is trimmed on a timer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Threads that each allocate at once, then glibc's own account of its heaps (one <heap> an arena).
PROBE = r"""
import ctypes, json, os, tempfile, threading
from safethink_server.memory import bound_native_memory

settings = bound_native_memory()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.fopen.restype = ctypes.c_void_p
libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
libc.fclose.argtypes = [ctypes.c_void_p]
start = threading.Barrier(8)
held = []

def allocate():
    start.wait()
    held.extend(libc.malloc(4096) for _ in range(64))

threads = [threading.Thread(target=allocate) for _ in range(8)]
for t in threads:
    t.start()
for t in threads:
    t.join()
path = tempfile.mktemp()
fp = libc.fopen(path.encode(), b"w")
libc.malloc_info(0, fp)
libc.fclose(fp)
heaps = open(path).read().count("<heap nr=")
os.unlink(path)
print(json.dumps({"heaps": heaps, "onednn": os.environ.get("ONEDNN_PRIMITIVE_CACHE_CAPACITY"),
                  "trimming": any(t.name == "malloc-trim" for t in threading.enumerate())}))
"""


def probe(**env: str) -> dict[str, object]:
    clean = {k: v for k, v in os.environ.items() if k not in ("MALLOC_ARENA_MAX", "ONEDNN_PRIMITIVE_CACHE_CAPACITY", "SAFETHINK_MALLOC_TRIM_S")}
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env={**clean, **env}, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_the_defaults_bound_arenas_set_onednn_and_trim():
    seen = probe()
    assert seen == {"heaps": 2, "onednn": "64", "trimming": True}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_the_environment_overrides_each_bound():
    seen = probe(MALLOC_ARENA_MAX="0", ONEDNN_PRIMITIVE_CACHE_CAPACITY="1024", SAFETHINK_MALLOC_TRIM_S="0")
    assert seen["heaps"] > 2, "glibc's default makes an arena for each thread that allocates at once"  # type: ignore[operator]
    assert seen["onednn"] == "1024" and seen["trimming"] is False
    assert probe(MALLOC_ARENA_MAX="4")["heaps"] == 4
