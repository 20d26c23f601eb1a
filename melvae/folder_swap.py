"""Replacing a folder whole: a new one is written beside it and swapped in, so the destination
never holds a half-written state.

`replacing(dest)` gives a staging folder (`.<name>.staging-<pid>`) to write into; when the block
ends, a previous `dest` is moved aside (`.<name>.retired-<pid>`), the staging folder renamed to
`dest` and the retired one removed. A failure removes the staging folder and keeps or puts back
the previous `dest`. A process killed mid-swap leaves those named folders behind: the next
`recover(dest)` (called by `replacing`, and before a destination is checked) removes a dead
process's staging folder and puts its retired one back where `dest` is missing. Used by saved
models (`MelVAE.save`) and analysis folders (`melvae.analyze.output`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from melvae.faultpoint import stop_point

log = logging.getLogger(__name__)

_STAGING, _RETIRED = "staging", "retired"


def _sibling(dest: Path, kind: str) -> Path:
    return dest.with_name(f".{dest.name}.{kind}-{os.getpid()}")


@contextlib.contextmanager
def replacing(dest: Path) -> Iterator[Path]:
    """Yield an empty staging folder beside `dest`; swap it in as `dest` when the block ends.

    Parameters
    ----------
    dest
        The folder to create or replace (its parent is created).

    Yields
    ------
    Path
        The staging folder to fill.

    Examples
    --------
    >>> with replacing(Path("out")) as staging:  # doctest: +SKIP
    ...     (staging / "report.html").write_text("...")
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    recover(dest)
    staging, retired = _sibling(dest, _STAGING), _sibling(dest, _RETIRED)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
        if dest.exists():
            os.replace(dest, retired)
            stop_point("folder-swapping")
            os.replace(staging, dest)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if retired.exists() and not dest.exists():
            os.replace(retired, dest)
        raise


def recover(dest: Path) -> None:
    """Clean up after a process killed while replacing `dest`: its staging folder is removed,
    and a previous `dest` it had moved aside is put back. Folders of live processes are left.

    Parameters
    ----------
    dest
        The destination folder of the interrupted swap.
    """
    from melvae.study.recovery import process_alive

    dest = Path(dest)
    if not dest.parent.is_dir():
        return
    for kind in (_RETIRED, _STAGING):
        for path in dest.parent.glob(f".{dest.name}.{kind}-*"):
            pid = path.name.rsplit("-", 1)[1]
            if not pid.isdigit() or process_alive(int(pid)):
                continue
            if kind == _RETIRED and not dest.exists():
                os.replace(path, dest)
                log.warning("put back %s, moved aside by a process that was killed", dest)
            else:
                shutil.rmtree(path, ignore_errors=True)
                log.warning("removed %s, left by a process that was killed", path)
