"""Gene-set libraries: GMT parsing, shipped KEGG/GO, Reactome download and cache."""

from __future__ import annotations

import functools
import hashlib
import http.server
import threading
import zipfile
from pathlib import Path

import pytest

from melvae.analyze.genesets import GeneSetLibrary, load_libraries, load_library, read_gmt
from melvae.errors import DownloadError, InputError

SHARED_GENESETS = Path(__file__).resolve().parents[2] / "shared" / "data" / "genesets"


def shared_gmt(name: str) -> Path:
    path = SHARED_GENESETS / name
    if not path.is_file():
        pytest.skip(f"shared gene-set file {path} not available")
    return path


def write(path: Path, text: str) -> Path:
    path.write_bytes(text.encode("utf-8"))
    return path


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def served(tmp_path: Path):
    """A loopback HTTP server over tmp_path/www; yields (folder, base URL, stop function)."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()

    def stop() -> None:
        if thread.is_alive():
            server.shutdown()
            server.server_close()
            thread.join()

    yield root, f"http://127.0.0.1:{server.server_address[1]}", stop
    stop()


def test_shared_reactome_has_documented_counts():
    sets = read_gmt(shared_gmt("reactome_human.gmt"))
    assert len(sets) == 2694
    assert len({gene for genes in sets.values() for gene in genes}) == 11668
    # Reactome names contain spaces: splitting on any whitespace would break them apart.
    assert "Signaling by Interleukins" in sets


def test_shared_kegg_has_documented_counts():
    sets = read_gmt(shared_gmt("kegg_2021_human.gmt"))
    assert len(sets) == 320
    assert len({gene for genes in sets.values() for gene in genes}) == 8078


@pytest.mark.parametrize(
    ("spec", "name", "shared"),
    [
        ("kegg", "KEGG_2021_Human", "kegg_2021_human.gmt"),
        ("GO_BP", "GO_Biological_Process_2023", "go_bp_2023_human.gmt"),
    ],
)
def test_shipped_library_matches_shared_copy(spec, name, shared):
    """The blitzgsea copy differs from the shared file only in the (unused) description."""
    library = load_library(spec)
    assert library.name == name
    expected = {term: tuple(genes) for term, genes in read_gmt(shared_gmt(shared)).items()}
    assert library.sets == expected


def test_gmt_parsing_splits_on_tabs_drops_empties_and_duplicates(tmp_path):
    path = write(
        tmp_path / "mine.gmt",
        "Signaling by Interleukins\tR-HSA-449147\tIL2\t\tIL7 \tIL2\tJAK1\r\n"
        "\n"
        "T cell set\t\tCD8A\tCD3E\t\n",
    )
    assert read_gmt(path) == {
        "Signaling by Interleukins": ["IL2", "IL7", "JAK1"],
        "T cell set": ["CD8A", "CD3E"],
    }
    library = load_library(str(path))
    assert library == GeneSetLibrary(
        name="mine",
        sets={"Signaling by Interleukins": ("IL2", "IL7", "JAK1"), "T cell set": ("CD8A", "CD3E")},
    )


@pytest.mark.parametrize(
    "bad_line",
    [
        "space separated set desc CD8A CD3E",
        "no genes\tdesc\t\t",
        "first\tagain\tCD4",
    ],
)
def test_malformed_gmt_names_file_and_line(tmp_path, bad_line):
    path = write(tmp_path / "bad.gmt", f"first\tdesc\tCD8A\tCD3E\n{bad_line}\n")
    with pytest.raises(InputError) as info:
        read_gmt(path)
    assert f"{path}, line 2" in info.value.where


def test_unknown_spec_lists_the_options(tmp_path):
    with pytest.raises(InputError) as info:
        load_library(str(tmp_path / "missing.gmt"))
    for option in ("kegg", "go_bp", "reactome", ".gmt"):
        assert option in info.value.fix


def test_load_libraries_keeps_order(tmp_path):
    path = write(tmp_path / "tiny.gmt", "a\t\tCD8A\n")
    names = [library.name for library in load_libraries([str(path), "kegg"])]
    assert names == ["tiny", "KEGG_2021_Human"]


def _reactome_zip(path: Path, member: str = "ReactomePathways.gmt") -> Path:
    with zipfile.ZipFile(path, "w") as zipped:
        zipped.writestr(
            member,
            "Interferon gamma signaling\tR-HSA-877300\tIFNG\tIFNGR1\tSTAT1\n"
            "Signaling by Interleukins\tR-HSA-449147\tIL2\tIL7\n",
        )
    return path


def test_reactome_downloads_once_then_uses_cache(served, tmp_path, monkeypatch):
    root, base_url, stop = served
    archive = _reactome_zip(root / "ReactomePathways.gmt.zip")
    monkeypatch.setenv("MELVAE_REACTOME_URL", f"{base_url}/ReactomePathways.gmt.zip")
    monkeypatch.setenv("MELVAE_DATA_DIR", str(tmp_path / "cache"))

    first = load_library("reactome")
    assert first.name == "Reactome"
    assert first.sets["Interferon gamma signaling"] == ("IFNG", "IFNGR1", "STAT1")
    sidecar = tmp_path / "cache" / "genesets" / "ReactomePathways.gmt.zip.sha256"
    assert sidecar.read_text().split()[0] == hashlib.sha256(archive.read_bytes()).hexdigest()

    stop()  # the second load must not need the network
    assert load_library("reactome") == first


def test_reactome_data_dir_argument_overrides_cache_dir(served, tmp_path, monkeypatch):
    root, base_url, _ = served
    _reactome_zip(root / "r.zip", member="some/folder/Pathways.gmt")
    monkeypatch.setenv("MELVAE_REACTOME_URL", f"{base_url}/r.zip")
    monkeypatch.setenv("MELVAE_DATA_DIR", str(tmp_path / "unused"))
    library = load_library("reactome", data_dir=tmp_path / "mine")
    assert set(library.sets) == {"Interferon gamma signaling", "Signaling by Interleukins"}
    assert (tmp_path / "mine" / "genesets" / "ReactomePathways.gmt.zip").is_file()
    assert not (tmp_path / "unused").exists()


def test_reactome_download_that_is_not_a_zip_says_how_to_retry(served, tmp_path, monkeypatch):
    root, base_url, _ = served
    write(root / "page.html", "<html>maintenance</html>")
    monkeypatch.setenv("MELVAE_REACTOME_URL", f"{base_url}/page.html")
    with pytest.raises(InputError, match="not a readable zip") as info:
        load_library("reactome", data_dir=tmp_path)
    assert "delete" in info.value.fix


def test_reactome_unreachable_raises_download_error(served, tmp_path, monkeypatch):
    _, base_url, stop = served
    stop()
    monkeypatch.setenv("MELVAE_REACTOME_URL", f"{base_url}/ReactomePathways.gmt.zip")
    with pytest.raises(DownloadError):
        load_library("reactome", data_dir=tmp_path)
    assert not (tmp_path / "genesets" / "ReactomePathways.gmt.zip").exists()
