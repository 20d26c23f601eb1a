"""`run --workers N`: N worker processes on this machine share one study and split its cores."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from types import FrameType

# Options the parent decides per worker; every other `run` option is passed on unchanged.
_PER_WORKER = ("--workers", "--n-trials", "--threads")


def split(total: int, parts: int) -> list[int]:
    """`total` trials shared as evenly as possible by at most `parts` workers (none gets 0)."""
    shares = [total // parts + (i < total % parts) for i in range(parts)]
    return [share for share in shares if share > 0]


def cores() -> int:
    """CPU cores this process may use (respects taskset/cgroup affinity)."""
    return len(os.sched_getaffinity(0))


def worker_argv(run_argv: Sequence[str], *, n_trials: int, threads: int) -> list[str]:
    """One worker's `run` arguments: the parent's, with its own trial share and thread count."""
    kept: list[str] = []
    skip_value = False
    for arg in run_argv:
        if skip_value:
            skip_value = False
        elif arg in _PER_WORKER:
            skip_value = True
        elif not arg.startswith(tuple(f"{option}=" for option in _PER_WORKER)):
            kept.append(arg)
    return [*kept, "--n-trials", str(n_trials), "--threads", str(threads)]


def run_workers(run_argv: Sequence[str], *, workers: int, n_trials: int) -> int:
    """Start the workers (`python -m melvae.study run ...` each), wait, return the worst exit code.

    Each gets cores/N torch threads (at least 1): N processes each using every core would slow
    each other down many times over. SIGTERM to this process is passed on to every worker.
    """
    shares = split(n_trials, workers)
    threads = max(1, cores() // len(shares))
    print(
        f"melvae: {len(shares)} workers ({'+'.join(map(str, shares))} trials), "
        f"{threads} thread(s) each",
        file=sys.stderr,
        flush=True,
    )
    processes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "melvae.study",
                *worker_argv(run_argv, n_trials=share, threads=threads),
            ]
        )
        for share in shares
    ]

    def forward(signum: int, frame: FrameType | None) -> None:
        for process in processes:
            process.send_signal(signum)

    previous = signal.signal(signal.SIGTERM, forward)
    try:
        codes = [process.wait() for process in processes]
    except KeyboardInterrupt:
        # Ctrl-C reached every worker too: let them end their runs KILLED before returning.
        for process in processes:
            process.wait()
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    failed = [code for code in codes if code != 0]
    return failed[0] if failed else 0
