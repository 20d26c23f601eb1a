"""The analysis output folder: refused unless safe to write, written whole, marked by a manifest.

An analysis writes only where nothing of the user's can be lost: a new or empty folder, or (with
`overwrite`) a folder holding a previous melvae analysis and nothing else, as its manifest lists.
Never the current folder or one above it, never the tracking folder (`mlruns/`), never a file.
Files are written into a staging folder beside the output and swapped in; the staging and
retired folders of a killed analysis are cleaned up (or the retired one put back) by the next.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from melvae.errors import InputError
from melvae.faultpoint import stop_point
from melvae.study.recovery import process_alive

log = logging.getLogger(__name__)

MANIFEST = "melvae-analysis.json"
_STAGING, _RETIRED = "staging", "retired"


def check_destination(out: Path, *, overwrite: bool, protected: Path | None = None) -> None:
    """Raise InputError unless `out` may receive an analysis; writes nothing.

    `protected`: the local tracking folder (e.g. `mlruns/`), never written into.
    """
    out = Path(out)
    resolved = out.resolve()
    fix = "pass --out with a new folder name, e.g. --out analysis-2"
    for folder in (resolved, *resolved.parents):
        if folder.exists() and not folder.is_dir():
            what = "is a file" if folder == resolved else f"lies below the file {folder}"
            raise InputError(f"the output folder {out} {what}", where="--out", fix=fix)
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise InputError(
            f"the output folder {out} is the current folder or one above it: an analysis is "
            "never written over it",
            where="--out",
            fix=fix,
        )
    if protected is not None:
        guarded = protected.resolve()
        if resolved == guarded or guarded in resolved.parents or resolved in guarded.parents:
            raise InputError(
                f"the output folder {out} overlaps the tracking folder {protected}, which holds "
                "every run, the registry and the studies",
                where="--out",
                fix=fix,
            )
    restore_killed_swap(out)
    if not out.exists() or not any(out.iterdir()):
        return
    listed = _manifest_files(out)
    if listed is None:
        raise InputError(
            f"the output folder {out} exists and holds files melvae did not write (no {MANIFEST})",
            where="--out",
            fix=fix + "; melvae never replaces a folder it did not write",
        )
    foreign = sorted({p.name for p in out.iterdir()} - listed - {MANIFEST})
    if foreign:
        raise InputError(
            f"the output folder {out} holds a melvae analysis plus files it did not write: "
            f"{', '.join(foreign[:5])}",
            where="--out",
            fix=fix + ", or move those files out first",
        )
    if not overwrite:
        raise InputError(
            f"the output folder {out} holds a previous melvae analysis",
            where="--out",
            fix=fix + ", or add --overwrite to replace it",
        )


def restore_killed_swap(out: Path) -> None:
    """Clean up after an analysis killed while writing `out`: its staging folder is removed, and
    a previous analysis it had moved aside is put back. Folders of live processes are left."""
    out = Path(out)
    if not out.parent.is_dir():
        return
    for kind in (_RETIRED, _STAGING):
        for path in out.parent.glob(f".{out.name}.{kind}-*"):
            pid = path.name.rsplit("-", 1)[1]
            if not pid.isdigit() or process_alive(int(pid)):
                continue
            if kind == _RETIRED and not out.exists():
                path.rename(out)
                log.warning("put back %s, moved aside by an analysis that was killed", out)
            else:
                shutil.rmtree(path, ignore_errors=True)
                log.warning("removed %s, left by an analysis that was killed", path)


def write_folder(out: Path, write: Callable[[Path], None], *, manifest: dict) -> None:
    """Call `write(staging)` to fill a staging folder, add the manifest, swap it in as `out`."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.{_STAGING}-{os.getpid()}")
    retired = out.with_name(f".{out.name}.{_RETIRED}-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        write(staging)
        files = sorted(p.name for p in staging.iterdir())
        (staging / MANIFEST).write_text(json.dumps({**manifest, "files": files}, indent=1))
        stop_point("analysis-staged")
        if out.exists():
            out.rename(retired)
            stop_point("analysis-swapping")
            staging.rename(out)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if retired.exists() and not out.exists():
            retired.rename(out)
        raise


def _manifest_files(out: Path) -> set[str] | None:
    try:
        manifest = json.loads((out / MANIFEST).read_text())
        return {str(name) for name in manifest["files"]}
    except (OSError, ValueError, KeyError, TypeError):
        return None
