"""fetch: cached copies are reused offline, bad downloads leave nothing behind."""

from __future__ import annotations

import hashlib
from pathlib import Path

import platformdirs
import pytest

from melvae.data.download import atomic_path, cache_dir, fetch
from melvae.errors import DownloadError

CONTENT = b"gene,cell1\nCD3E,1.5\n" * 100


@pytest.fixture
def served_file(http_server):
    (http_server.root / "data.csv").write_bytes(CONTENT)
    return http_server, f"{http_server.url}/data.csv"


def test_fetch_downloads_once_then_serves_the_cache_offline(served_file, tmp_path):
    server, url = served_file
    dest = tmp_path / "cache" / "data.csv"
    md5 = hashlib.md5(CONTENT).hexdigest()

    assert fetch(url, dest, md5=md5) == dest
    assert dest.read_bytes() == CONTENT
    assert server.requests == ["/data.csv"]

    server.stop()
    assert fetch(url, dest, md5=md5).read_bytes() == CONTENT
    assert server.requests == ["/data.csv"]


def test_checksum_mismatch_saves_nothing_and_says_expected_and_got(served_file, tmp_path):
    _, url = served_file
    folder = tmp_path / "cache"
    with pytest.raises(DownloadError) as err:
        fetch(url, folder / "data.csv", sha256="0" * 64)
    message = str(err.value)
    assert "checksum mismatch" in message
    assert "0" * 64 in message and hashlib.sha256(CONTENT).hexdigest() in message
    assert url in message and "nothing was saved" in message
    assert list(folder.iterdir()) == []


def test_first_download_records_sha256_and_later_downloads_must_match(served_file, tmp_path):
    server, url = served_file
    dest = tmp_path / "data.csv"
    fetch(url, dest)
    sidecar = tmp_path / "data.csv.sha256"
    assert sidecar.read_text().split()[0] == hashlib.sha256(CONTENT).hexdigest()

    # A damaged cached copy is noticed and replaced by a fresh download.
    dest.write_bytes(b"damaged")
    assert fetch(url, dest).read_bytes() == CONTENT

    # The file changed on the server: refuse it and keep the recorded hash.
    dest.unlink()
    (server.root / "data.csv").write_bytes(CONTENT + b"changed")
    with pytest.raises(DownloadError) as err:
        fetch(url, dest)
    assert "checksum mismatch" in str(err.value)
    assert str(sidecar) in err.value.fix
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.csv.sha256"]


def test_file_placed_by_hand_is_used_without_network(unreachable_url, tmp_path):
    dest = tmp_path / "data.csv"
    dest.write_bytes(CONTENT)
    assert fetch(f"{unreachable_url}/data.csv", dest) == dest
    assert (tmp_path / "data.csv.sha256").is_file()


def test_unreachable_server_raises_download_error_with_what_to_do(unreachable_url, tmp_path):
    url = f"{unreachable_url}/data.csv"
    dest = tmp_path / "cache" / "data.csv"
    with pytest.raises(DownloadError) as err:
        fetch(url, dest, timeout=5)
    assert url in str(err.value)
    assert str(dest) in err.value.fix and "MELVAE_DATA_DIR" in err.value.fix
    assert list(dest.parent.iterdir()) == []


def test_missing_file_on_server_reports_http_status(http_server, tmp_path):
    with pytest.raises(DownloadError, match="HTTP 404"):
        fetch(f"{http_server.url}/absent.csv.gz", tmp_path / "absent.csv.gz")
    assert list(tmp_path.iterdir()) == []


def test_atomic_path_keeps_the_old_file_when_writing_fails(tmp_path):
    dest = tmp_path / "model.json"
    dest.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(dest) as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert dest.read_text() == "old"
    assert list(tmp_path.iterdir()) == [dest]


def test_cache_dir_follows_melvae_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("MELVAE_DATA_DIR", str(tmp_path))
    assert cache_dir() == tmp_path
    monkeypatch.delenv("MELVAE_DATA_DIR")
    assert cache_dir() == Path(platformdirs.user_cache_dir("melvae"))
