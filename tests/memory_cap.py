"""Helper for tests that run work in a child process whose memory is capped by an rlimit."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

# The child runs SETUP, caps LIMIT at what /proc/self/status's FIELD says it holds then plus
# HEADROOM_MB, runs WORK and prints "done".
_CAPPED = r"""
import re, resource, sys
SETUP
held = int(re.search(r"FIELD:\s+(\d+)", open("/proc/self/status").read()).group(1)) * 1024
limit = held + HEADROOM_MB * 2**20
resource.setrlimit(resource.LIMIT, (limit, limit))
WORK
print("done")
"""
# What each limit caps, as /proc/self/status reports it.
_FIELDS = {"RLIMIT_AS": "VmSize", "RLIMIT_DATA": "VmData"}


def run_capped(
    setup: str,
    work: str,
    *,
    headroom_mb: int,
    limit: str = "RLIMIT_AS",
    args: tuple[str, ...] = (),
    cwd: Path | None = None,
) -> subprocess.CompletedProcess:
    """Run `setup`, then `work` under `limit` (`RLIMIT_AS`: address space, `RLIMIT_DATA`: heap
    and private writable mappings) capped `headroom_mb` above what `setup` left; `args` are the
    child's `sys.argv[1:]`."""
    script = (
        _CAPPED.replace("SETUP", setup)
        .replace("FIELD", _FIELDS[limit])
        .replace("LIMIT", limit)
        .replace("HEADROOM_MB", str(headroom_mb))
        .replace("WORK", work)
    )
    return subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=900, cwd=cwd
    )
