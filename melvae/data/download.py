"""Fetch files into the local cache: checksum-verified, atomic, with a clear error when offline."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import logging
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import platformdirs
from tqdm.auto import tqdm

from melvae.errors import DownloadError, InputError

logger = logging.getLogger(__name__)

_CHUNK = 1 << 20


def cache_dir() -> Path:
    """Folder for downloaded and parsed datasets: ``$MELVAE_DATA_DIR`` or the user cache dir."""
    return Path(os.environ.get("MELVAE_DATA_DIR") or platformdirs.user_cache_dir("melvae"))


@contextlib.contextmanager
def atomic_path(dest: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``dest``; move it into place only if the block succeeds.

    A crash or exception (Ctrl-C included) removes the temporary file, so ``dest`` is either
    the old file or the complete new one, never half-written.
    """
    dest = Path(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    except OSError as err:
        raise InputError(
            f"cannot write to the folder {dest.parent}: {err.strerror or err}",
            where=str(dest),
            fix="Make the folder writable, or point MELVAE_DATA_DIR at a writable folder.",
        ) from err
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def file_digests(path: Path) -> dict[str, str]:
    """The md5 and sha256 of a file, read once in chunks."""
    md5, sha256 = hashlib.md5(), hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(_CHUNK):
            md5.update(block)
            sha256.update(block)
    return {"md5": md5.hexdigest(), "sha256": sha256.hexdigest()}


def _sidecar(dest: Path) -> Path:
    return dest.with_name(dest.name + ".sha256")


def _expected(dest: Path, md5: str | None, sha256: str | None) -> dict[str, str]:
    """Known checksums: the given ones, else the sha256 recorded on the first download."""
    expected = {k: v.lower() for k, v in (("md5", md5), ("sha256", sha256)) if v}
    sidecar = _sidecar(dest)
    if not expected and sidecar.is_file():
        recorded = sidecar.read_text().split()
        if recorded:
            expected["sha256"] = recorded[0].lower()
    return expected


def _mismatch(got: dict[str, str], expected: dict[str, str]) -> str | None:
    for kind, want in expected.items():
        if got[kind] != want:
            return f"expected {kind} {want}, got {got[kind]}"
    return None


def _record_sha256(dest: Path, sha256: str) -> None:
    with atomic_path(_sidecar(dest)) as tmp:
        tmp.write_text(f"{sha256}  {dest.name}\n")
    logger.info("recorded sha256 %s of %s (trust on first use)", sha256, dest.name)


def _download(url: str, part: Path, dest: Path, *, timeout: float, progress: bool) -> None:
    fix = (
        f"Check the network connection (and any proxy), or download the file yourself and "
        f"place it at {dest} (MELVAE_DATA_DIR sets the cache folder)."
    )
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(part, "wb") as out:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            received = 0
            with tqdm(
                total=total,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=f"downloading {dest.name}",
                disable=None if progress else True,
            ) as bar:
                while block := response.read(_CHUNK):
                    out.write(block)
                    received += len(block)
                    bar.update(len(block))
    except urllib.error.HTTPError as err:
        raise DownloadError(
            f"could not download {url}: the server answered HTTP {err.code} {err.reason}",
            where=url,
            fix=fix,
        ) from err
    except (OSError, ValueError, http.client.HTTPException) as err:
        reason = getattr(err, "reason", None) or err
        raise DownloadError(f"could not download {url}: {reason}", where=url, fix=fix) from err
    if total is not None and received != total:
        raise DownloadError(
            f"could not download {url}: the connection closed after {received} of {total} bytes",
            where=url,
            fix=fix,
        )


def fetch(
    url: str,
    dest: Path,
    *,
    md5: str | None = None,
    sha256: str | None = None,
    timeout: float = 60,
    progress: bool = True,
) -> Path:
    """Return ``dest``, downloading ``url`` there first unless a verified copy is cached.

    With no checksum given, the sha256 of the first download is recorded next to the file
    (``<name>.sha256``) and later copies must match it (trust on first use).
    """
    dest = Path(dest)
    expected = _expected(dest, md5, sha256)
    if dest.is_file():
        digests = file_digests(dest)
        problem = _mismatch(digests, expected)
        if problem is None:
            if not expected:
                _record_sha256(dest, digests["sha256"])
            return dest
        logger.warning("cached %s fails its checksum (%s); downloading it again", dest, problem)

    with atomic_path(dest) as part:
        logger.info("downloading %s to %s", url, dest)
        _download(url, part, dest, timeout=timeout, progress=progress)
        digests = file_digests(part)
        problem = _mismatch(digests, expected)
        if problem is not None:
            sidecar = _sidecar(dest)
            trusted = f" If you trust the new file, delete {sidecar}." if sidecar.is_file() else ""
            raise DownloadError(
                f"checksum mismatch for {url}: {problem}",
                where=url,
                fix="The download was corrupted or the file changed on the server; nothing was "
                f"saved. Try again later.{trusted}",
            )
    if not expected:
        _record_sha256(dest, digests["sha256"])
    return dest
