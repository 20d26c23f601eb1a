"""What a user sees on the terminal during `run`: one trial bar, no per-trial MLflow noise."""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios
import threading

import pytest

from tests.test_study import _offline

NOISE = ("CloudPickle", "Validating input example", "Downloading artifacts")


def _run_on_a_terminal(args: list[str], cwd: str) -> tuple[int, str, str]:
    """Run the CLI with stderr on a 120-column pseudo-terminal (so tqdm draws its bars)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    process = subprocess.Popen(
        [sys.executable, "-m", "melvae.study", *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=slave,
        text=True,
    )
    os.close(slave)
    chunks: list[bytes] = []

    def drain() -> None:  # keep reading, or the child blocks once the pty buffer is full
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed its end
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain)
    reader.start()
    stdout = process.communicate(timeout=600)[0]
    reader.join(timeout=30)
    os.close(master)
    return process.returncode, stdout, b"".join(chunks).decode(errors="replace")


@pytest.mark.slow
def test_a_run_shows_one_trial_bar_and_no_per_trial_noise(tmp_path, monkeypatch):
    _offline(monkeypatch, tmp_path)
    code, stdout, terminal = _run_on_a_terminal(
        ["run", "--n-trials", "3", "--epochs", "2"], str(tmp_path)
    )
    assert code == 0, terminal[-3000:]
    for noise in NOISE:
        assert noise not in terminal
    screens = terminal.replace("\r", "\n")
    assert "trials: 100%" in screens
    assert "3/3" in screens
    assert "best: " in screens
    assert "training:" in screens  # the per-epoch bar, under the trial bar
    assert "Trial 0 finished" not in screens  # Optuna's line: the bar says it
    assert "champion: trial " in stdout  # the final table and its summary stay
    assert stdout.count("COMPLETE") == 3
