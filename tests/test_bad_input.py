"""Bad input anywhere in `run`: exit code 2, a message naming what and where, no traceback, and
nothing written to Optuna, MLflow or the registry."""

from __future__ import annotations

import concurrent.futures
import multiprocessing
from pathlib import Path

import pytest

from melvae.errors import InputError
from melvae.study.__main__ import main
from melvae.study.config import load_study_config
from tests.test_study import _offline, _quick_config

QUICK = ["--n-trials", "1", "--epochs", "1", "--quiet"]

STUDY_FILE_MISTAKES = {
    "n_trials negative": ("n_trials = 20", "n_trials = -5", "[budget] n_trials"),
    "timeout zero": ("# timeout = 3600", "timeout = 0", "[budget] timeout"),
    "range low above high": ("low = 2\nhigh = 32", "low = 32\nhigh = 2", "[search.latent_dim]"),
    "latent size 0": ("low = 2\nhigh = 32", "low = 0\nhigh = 32", "[search.latent_dim]"),
    "hidden size 0": ("choices = [64, 128", "choices = [0, 128", "[search.hidden_dim]"),
    "no hidden layer": ('int"\nlow = 1\nhigh = 3', 'int"\nlow = 0\nhigh = 3', "[search.n_layers]"),
    "learning rate negative": (
        "low = 1e-4\nhigh = 1e-2\nlog = true",
        "low = -1e-2\nhigh = 1e-2\nlog = false",
        "[search.learning_rate]",
    ),
    "learning rate zero on a log scale": (
        "low = 1e-4\nhigh = 1e-2",
        "low = 0.0\nhigh = 1e-2",
        "[search.learning_rate]",
    ),
}


def _assert_clean_failure(code: int, err: str, workdir: Path, *expected: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    for text in expected:
        assert text in err
    assert not (workdir / "mlruns").exists(), "nothing may be written to Optuna or MLflow"


@pytest.mark.parametrize("case", STUDY_FILE_MISTAKES)
def test_bad_study_file_values_name_the_key(tmp_path, monkeypatch, capsys, case):
    _offline(monkeypatch, tmp_path)
    old, new, key = STUDY_FILE_MISTAKES[case]
    assert old in _quick_config(tmp_path).read_text()
    study = _quick_config(tmp_path, **{old: new})
    code = main(["run", "--study", str(study), *QUICK])
    _assert_clean_failure(code, capsys.readouterr().err, tmp_path, key, "what to do")


@pytest.mark.parametrize("option", ["--n-trials", "--epochs", "--timeout", "--workers"])
def test_non_positive_command_line_numbers_are_refused(tmp_path, monkeypatch, capsys, option):
    _offline(monkeypatch, tmp_path)
    with pytest.raises(SystemExit) as exited:
        main(["run", option, "-5"])
    _assert_clean_failure(exited.value.code, capsys.readouterr().err, tmp_path, "must be > 0")


def _closed_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _backend_mistakes(tmp_path: Path) -> dict[str, tuple[list[str], tuple[str, ...]]]:
    port = _closed_port()
    (tmp_path / "afile").write_text("not a folder")
    return {
        "storage not a URL": (["--storage", "optuna.db"], ("malformed", "--storage")),
        "storage unsupported database": (["--storage", "oracle://u@h/db"], ("unsupported",)),
        "storage unreachable, password hidden": (
            ["--storage", f"postgresql://melvae:s3cret@127.0.0.1:{port}/optuna"],
            ("cannot use the Optuna storage", "melvae:***@127.0.0.1", "check that the server"),
        ),
        "storage under a file": (
            ["--storage", f"sqlite:///{tmp_path}/afile/optuna.db"],
            ("which is a file",),
        ),
        "tracking server unreachable": (
            ["--tracking-uri", f"http://melvae:s3cret@127.0.0.1:{port}"],
            ("no MLflow server answers", "melvae:***@127.0.0.1", "--tracking-uri"),
        ),
        "tracking database unreachable": (
            ["--tracking-uri", f"postgresql+psycopg://melvae:s3cret@127.0.0.1:{port}/mlflow"],
            ("cannot use the MLflow tracking backend", "***"),
        ),
        "tracking unknown scheme": (["--tracking-uri", "ftp://host/x"], ("unsupported",)),
    }


@pytest.mark.parametrize(
    "case",
    [
        "storage not a URL",
        "storage unsupported database",
        "storage unreachable, password hidden",
        "storage under a file",
        "tracking server unreachable",
        "tracking database unreachable",
        "tracking unknown scheme",
    ],
)
def test_bad_storage_or_tracking_uri_is_exit_2_with_the_password_hidden(
    tmp_path, monkeypatch, capsys, case
):
    pytest.importorskip("psycopg")
    _offline(monkeypatch, tmp_path)
    argv, expected = _backend_mistakes(tmp_path)[case]
    code = main(["run", *argv, *QUICK])
    err = capsys.readouterr().err
    _assert_clean_failure(code, err, tmp_path, *expected)
    assert "s3cret" not in err


def test_duplicate_cell_names_are_an_error(tmp_path, monkeypatch, capsys):
    _offline(monkeypatch, tmp_path)
    cells = tmp_path / "cells.csv"
    rows = [f"cell{i % 5},{i % 3},{i % 4},{'TB'[i % 2]}" for i in range(12)]
    cells.write_text("\n".join([",GENE_A,GENE_B,label", *rows]) + "\n")
    code = main(["run", "--data", str(cells), *QUICK])
    err = capsys.readouterr().err
    _assert_clean_failure(code, err, tmp_path, "cell name(s) occur more than once", "'cell0'")


def _tiny_data(tmp_path: Path, n_cells: int, n_genes: int) -> Path:
    rows = [
        f"cell{i}," + ",".join(str((i * 7 + g * 3) % 5) for g in range(n_genes)) + f",{'TB'[i % 2]}"
        for i in range(n_cells)
    ]
    header = "," + ",".join(f"GENE_{g}" for g in range(n_genes)) + ",label"
    path = tmp_path / "cells.csv"
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def test_fewer_genes_than_the_latent_size_is_exit_2_with_the_numbers(tmp_path, monkeypatch, capsys):
    _offline(monkeypatch, tmp_path)
    code = main(["run", "--data", str(_tiny_data(tmp_path, 40, 3)), *QUICK])
    err = capsys.readouterr().err
    # The default study searches latent sizes up to 32.
    _assert_clean_failure(code, err, tmp_path, "keep 3 genes", "largest latent size 32")


def test_fewer_cells_than_a_batch_warns_with_the_numbers(tmp_path, monkeypatch, capsys):
    _offline(monkeypatch, tmp_path)
    code = main(["create", "--data", str(_tiny_data(tmp_path, 40, 40))])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "the training split has 28 cells, fewer than the largest batch_size 128" in err


def test_a_bad_study_file_read_in_a_worker_process_reaches_the_caller_as_itself(tmp_path):
    """Python API users fan studies out over processes (bench/batch_effects.py does): the error
    must cross the process boundary whole, not as a pickling TypeError that hides it."""
    old, new, key = STUDY_FILE_MISTAKES["latent size 0"]
    study = _quick_config(tmp_path, **{old: new})
    context = multiprocessing.get_context("spawn")
    with (
        concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool,
        pytest.raises(InputError) as raised,
    ):
        pool.submit(load_study_config, study).result()
    assert key in raised.value.where and str(study) in raised.value.where
    assert raised.value.fix and "what to do" in str(raised.value)
