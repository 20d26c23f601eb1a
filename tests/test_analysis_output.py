"""The analysis output folder: a kill in the middle of replacing a previous analysis loses
nothing (the next analysis puts the old one back), and only melvae's own files are replaced."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from melvae.analyze.output import MANIFEST, check_destination, write_folder
from melvae.errors import InputError
from melvae.faultpoint import ENV as STOP_AT

WRITE = """
import sys
from pathlib import Path
from melvae.analyze.output import write_folder
text = sys.argv[1]
write_folder(Path("out"), lambda d: (d / "report.html").write_text(text), manifest={})
"""


def _write(folder: Path, text: str, stop_at: str | None = None) -> int:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    if stop_at:
        env[STOP_AT] = stop_at
    command = [sys.executable, "-c", WRITE, text]
    return subprocess.run(command, cwd=folder, env=env, timeout=120).returncode


def test_a_kill_while_swapping_puts_the_previous_analysis_back(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert _write(tmp_path, "first") == 0
    assert json.loads((tmp_path / "out" / MANIFEST).read_text())["files"] == ["report.html"]
    assert _write(tmp_path, "second", stop_at="folder-swapping") == -signal.SIGKILL
    assert not (tmp_path / "out").exists()
    assert len(list(tmp_path.glob(".out.retired-*"))) == 1

    check_destination(Path("out"), overwrite=True)
    assert (tmp_path / "out" / "report.html").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"], "staging removed"
    write_folder(Path("out"), lambda d: (d / "report.html").write_text("third"), manifest={})
    assert (tmp_path / "out" / "report.html").read_text() == "third"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_file_added_to_a_previous_analysis_blocks_overwrite(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_folder(Path("out"), lambda d: (d / "report.html").write_text("x"), manifest={})
    (tmp_path / "out" / "my_notes.md").write_text("mine")
    with pytest.raises(InputError, match=r"my_notes\.md"):
        check_destination(Path("out"), overwrite=True)
    assert (tmp_path / "out" / "my_notes.md").read_text() == "mine"
