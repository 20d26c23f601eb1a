"""The analysis output folder: refused unless safe to write, written whole, marked by a manifest.

An analysis writes only where nothing of the user's can be lost: a new or empty folder, or (with
`overwrite`) a folder holding a previous melvae analysis and nothing else, as its manifest lists.
Never the current folder or one above it, never the tracking folder (`mlruns/`), never a file.
Files are written into a staging folder beside the output and swapped in (`melvae.folder_swap`);
the staging and retired folders of a killed analysis are cleaned up (or the retired one put back)
by the next.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from melvae.errors import InputError
from melvae.faultpoint import stop_point
from melvae.folder_swap import recover, replacing

MANIFEST = "melvae-analysis.json"


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
    recover(out)
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


def write_folder(out: Path, write: Callable[[Path], None], *, manifest: dict) -> None:
    """Call `write(staging)` to fill a staging folder, add the manifest, swap it in as `out`
    (`melvae.folder_swap`)."""
    with replacing(Path(out)) as staging:
        write(staging)
        files = sorted(p.name for p in staging.iterdir())
        (staging / MANIFEST).write_text(json.dumps({**manifest, "files": files}, indent=1))
        stop_point("analysis-staged")


def _manifest_files(out: Path) -> set[str] | None:
    try:
        manifest = json.loads((out / MANIFEST).read_text())
        return {str(name) for name in manifest["files"]}
    except (OSError, ValueError, KeyError, TypeError):
        return None
