"""Test-only stop points: `MELVAE_TEST_STOP_AT=<step>` makes the process SIGKILL itself there.

Crash tests use it to kill a real process at an exact step (between registering a version and
moving the alias, with an analysis half-written, ...) instead of racing a timer. Unset (always,
outside tests) it does nothing.
"""

from __future__ import annotations

import os
import signal

ENV = "MELVAE_TEST_STOP_AT"


def stop_point(step: str) -> None:
    """Kill this process with SIGKILL (no cleanup runs) if `MELVAE_TEST_STOP_AT` names `step`."""
    if os.environ.get(ENV) == step:
        os.kill(os.getpid(), signal.SIGKILL)
