"""Nothing lost, nothing poisoned: wrong flags, bad files and real `kill -9`s against a finished
study, each checked for its exit code, a message without traceback, and what did not change
(a hash of the folder, the registry's aliases and tags, runs left RUNNING, the trial states).

Kills are exact: `MELVAE_TEST_STOP_AT=<step>` makes the process SIGKILL itself at that step
(`melvae/faultpoint.py`).
"""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
from pathlib import Path

import anndata as ad
import mlflow
import numpy as np
import optuna
import pytest

from melvae.data.datasets import load_dataset
from melvae.faultpoint import ENV as STOP_AT
from melvae.register import CHAMPION, COMPLETE_TAG
from melvae.study.config import DEFAULT_STUDY
from tests.workers import STUDY, client_for, worker_env

MODEL = "melvae-pbmc68k_reduced"
KEGG = ["--genesets", "kegg"]  # ships inside blitzgsea: offline
TINY = ["--epochs", "2", "--quiet", "--threads", "1"]


def cli(workdir: Path, module: str, *args: str, stop_at: str | None = None):
    """`python -m <module> ARGS` in `workdir`, offline; the finished process."""
    env = worker_env(workdir.parent)  # the data cache beside the folder, not in it
    if stop_at is not None:
        env[STOP_AT] = stop_at
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def refused(done: subprocess.CompletedProcess, *words: str) -> None:
    """Exit code 2, melvae's message (with every word in it), no traceback."""
    assert done.returncode == 2, done.stderr[-3000:]
    assert "melvae: error:" in done.stderr and "Traceback" not in done.stderr, done.stderr
    for word in words:
        assert word in done.stderr, done.stderr


def folder_hash(folder: Path, *, skip: tuple[str, ...] = ("cache",)) -> str:
    """Every file's path and bytes under `folder` (lock files, which hold nothing, aside)."""
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if relative.parts[0] in skip or path.suffix == ".lock" or not path.is_file():
            continue
        digest.update(str(relative).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def registry(tracking: str) -> dict[str, object]:
    """The lineage's versions with their tags, and where the champion alias points."""
    client = client_for(tracking)
    versions = client.search_model_versions(f"name = '{MODEL}'")
    champion = client.get_model_version_by_alias(MODEL, CHAMPION)
    return {
        "versions": {v.version: dict(v.tags) for v in versions},
        "champion": champion.version,
    }


def running(tracking: str) -> list[str]:
    client = client_for(tracking)
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, filter_string="attributes.status = 'RUNNING'")
    return [run.info.run_name for run in runs]


def trial_states(storage: str) -> list[str]:
    return [t.state.name for t in optuna.load_study(study_name=STUDY, storage=storage).trials]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A finished two-trial, two-epoch default study (PBMC fallback) run by the real CLI."""
    root = tmp_path_factory.mktemp("faults")
    (root / "cache").mkdir()
    workdir = root / "study"
    workdir.mkdir()
    done = cli(workdir, "melvae.study", "run", "--n-trials", "2", *TINY)
    assert done.returncode == 0, done.stderr[-3000:]
    return {
        "workdir": workdir,
        "storage": f"sqlite:///{workdir}/mlruns/optuna.db",
        "tracking": f"sqlite:///{workdir}/mlruns/mlflow.db",
    }


@pytest.fixture
def inside(study, monkeypatch):
    """Run CLIs in this process, from the study folder, offline (the fast path for many cases;
    each family also has a case in a real process)."""
    workdir = study["workdir"]
    for key, value in worker_env(workdir.parent).items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(workdir)
    return workdir


def analyze_here(capsys, *args: str) -> subprocess.CompletedProcess:
    """`melvae.analyze.__main__.main(ARGS)` in this process, as a finished process."""
    from melvae.analyze.__main__ import main

    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out, err)


OUT_CASES = [
    ("mine", ["holds files melvae did not write"]),
    ("mlruns", ["tracking folder"]),
    ("mlruns/analysis", ["tracking folder"]),
    ("notes.txt", ["is a file"]),
    ("notes.txt/analysis", ["lies below the file"]),
    ("..", ["one above it"]),
]


def _user_files(workdir: Path) -> None:
    (workdir / "mine").mkdir(exist_ok=True)
    (workdir / "mine" / "thesis.tex").write_text("years of work")
    (workdir / "notes.txt").write_text("keep me")


@pytest.mark.slow
@pytest.mark.parametrize(("out", "words"), OUT_CASES)
def test_analyze_never_writes_over_what_melvae_did_not_write(inside, capsys, out, words):
    _user_files(inside)
    before = folder_hash(inside.parent)
    refused(analyze_here(capsys, *KEGG, "--out", out, "--overwrite"), *words)
    assert folder_hash(inside.parent) == before
    assert not [p for p in inside.iterdir() if p.name.startswith(".")]


@pytest.mark.slow
def test_analyze_never_writes_over_the_study_folder_in_a_real_process(study):
    workdir = study["workdir"]
    _user_files(workdir)
    before = folder_hash(workdir)
    done = cli(workdir, "melvae.analyze", *KEGG, "--out", str(workdir), "--overwrite")
    refused(done, "current folder")
    assert folder_hash(workdir) == before


@pytest.mark.slow
def test_analyze_rejects_a_bad_tracking_uri_like_run(study, unreachable_url):
    workdir = study["workdir"]
    before = folder_hash(workdir)
    port = unreachable_url.rsplit(":", 1)[1]
    for uri, word in (
        ("ftp://host/x", "unsupported"),
        (f"postgresql+psycopg://melvae:s3cret@127.0.0.1:{port}/mlflow", "melvae:***@"),
    ):
        # `run` rejects the same URIs (tests/test_bad_input.py).
        done = cli(workdir, "melvae.analyze", "--tracking-uri", uri)
        refused(done, word)
        assert "s3cret" not in done.stderr
    assert folder_hash(workdir) == before


@pytest.mark.slow
def test_commands_that_only_read_create_no_database_in_an_empty_folder(study):
    empty = study["workdir"].parent / "empty"
    empty.mkdir()
    refused(cli(empty, "melvae.analyze", *KEGG), "no tracking database")
    refused(cli(empty, "melvae.study", "best"), "no study")
    code = "import melvae; melvae.load_model('models:/melvae-pbmc68k_reduced@champion')"
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=empty,
        env=worker_env(empty.parent),  # no MLflow URI that an earlier test left set
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0 and "no tracking database" in done.stderr
    assert list(empty.iterdir()) == []


@pytest.fixture(scope="module")
def bad_cells(study):
    """Reference files with one bad value each, beside (not in) the study folder."""
    folder = study["workdir"].parent / "cells"
    folder.mkdir()
    cells = load_dataset("pbmc68k_reduced").adata[:60].copy()
    cells.X = np.asarray(cells.X.todense() if hasattr(cells.X, "todense") else cells.X)
    files = {}
    for name, value in (("nan", np.nan), ("inf", np.inf), ("negative", -5.0)):
        bad = cells.copy()
        bad.X[7, 3] = value
        files[name] = folder / f"{name}.h5ad"
        bad.write_h5ad(files[name])
    return files, cells.obs_names[7], cells.var_names[3]


@pytest.mark.slow
@pytest.mark.parametrize("case", ["nan", "inf", "negative"])
@pytest.mark.parametrize("flag", ["--reference", "--query"])
def test_bad_values_in_reference_or_query_exit_2_naming_file_cell_and_gene(
    inside, capsys, bad_cells, case, flag
):
    files, cell, gene = bad_cells
    before = folder_hash(inside)
    done = analyze_here(capsys, *KEGG, flag, str(files[case]), "--out", "a")
    refused(done, files[case].name, repr(cell), repr(gene))
    assert folder_hash(inside) == before


@pytest.mark.slow
def test_bad_values_in_a_real_process(study, bad_cells):
    files, cell, gene = bad_cells
    workdir = study["workdir"]
    before = folder_hash(workdir)
    done = cli(workdir, "melvae.analyze", *KEGG, "--query", str(files["nan"]), "--out", "a")
    refused(done, "nan.h5ad", repr(cell), repr(gene), "NaN")
    assert folder_hash(workdir) == before


def study_file(path: Path, replacements: dict[str, str]) -> Path:
    """The default study file with `replacements` made (each must occur), written to `path`."""
    text = DEFAULT_STUDY.read_text()
    for old, new in replacements.items():
        assert old in text, old
        text = text.replace(old, new, 1)
    path.write_text(text)
    return path


OTHER_SEARCH = {"high = 32": "high = 16"}  # latent_dim searched up to 16, not 32
IDENTITY_CHANGES = {
    "search_space": OTHER_SEARCH,
    "selection_rule": {"loss_tolerance = 0.02": "loss_tolerance = 0.05"},
    "objectives": {
        'metrics = ["val_loss", "bio_score"]': 'metrics = ["val_loss"]',
        'rule = "bio_within_loss"': 'rule = "objective"',
    },
}


@pytest.mark.slow
@pytest.mark.parametrize("changed", list(IDENTITY_CHANGES))
def test_another_study_under_the_same_name_exits_2_before_writing(study, changed):
    workdir = study["workdir"]
    other = study_file(workdir.parent / f"other-{changed}.toml", IDENTITY_CHANGES[changed])
    before, states = folder_hash(workdir), trial_states(study["storage"])
    done = cli(workdir, "melvae.study", "run", "--study", str(other), "--n-trials", "1", *TINY)
    refused(done, changed, "another `name`", str(other))
    assert folder_hash(workdir) == before
    assert trial_states(study["storage"]) == states


@pytest.mark.slow
def test_a_label_key_the_data_lack_is_an_error_not_a_fit_only_study(study):
    workdir = study["workdir"].parent / "typo"
    workdir.mkdir()
    typo = study_file(
        workdir.parent / "typo.toml", {"[data]\n": '[data]\nlabel_key = "bulk_label"\n'}
    )
    done = cli(workdir, "melvae.study", "run", "--study", str(typo), "--n-trials", "1", *TINY)
    refused(done, "'bulk_label'", "label_key", "bulk_labels")
    assert list(workdir.iterdir()) == []


@pytest.mark.slow
def test_two_study_files_with_one_name_at_once_one_is_refused(study):
    workdir = study["workdir"].parent / "twins"
    workdir.mkdir()
    other = study_file(workdir.parent / "twin.toml", OTHER_SEARCH)
    env = worker_env(workdir.parent)
    logs = [workdir.parent / f"twin-{i}.log" for i in range(2)]
    processes = []
    for file, log in zip((None, other), logs, strict=True):
        with log.open("w") as stream:
            processes.append(
                subprocess.Popen(
                    [sys.executable, "-m", "melvae.study", "create"]
                    + (["--study", str(file)] if file else []),
                    cwd=workdir,
                    env=env,
                    stdout=stream,
                    stderr=subprocess.STDOUT,
                )
            )
    codes = [p.wait(timeout=300) for p in processes]
    texts = [log.read_text() for log in logs]
    assert sorted(codes) == [0, 2], texts
    loser = texts[codes.index(2)]
    assert "search_space" in loser and "Traceback" not in loser


@pytest.mark.slow
def test_registry_heals_an_incomplete_champion_and_survives_a_kill_before_the_alias(study):
    workdir, tracking = study["workdir"], study["tracking"]
    client = client_for(tracking)
    good = client.get_model_version_by_alias(MODEL, CHAMPION)
    # What a process killed between tag writes used to leave: a version without its
    # objective_value (and without the completeness marker) holding the alias.
    broken = client.create_model_version(MODEL, good.source, run_id=good.run_id)
    client.set_model_version_tag(MODEL, broken.version, "objective", "bio_score")
    client.set_registered_model_alias(MODEL, CHAMPION, broken.version)

    killed = cli(workdir, "melvae.study", "promote", stop_at="registered")
    assert killed.returncode == -signal.SIGKILL
    assert registry(tracking)["champion"] == broken.version, "killed before the alias moved"

    done = cli(workdir, "melvae.study", "promote")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    state = registry(tracking)
    champion = state["versions"][state["champion"]]
    assert state["champion"] == good.version and champion[COMPLETE_TAG] == "true"
    assert "objective_value" in champion
    assert len(state["versions"]) == 2, "no version registered twice"
    before = registry(tracking)
    assert cli(workdir, "melvae.study", "promote").returncode == 0
    assert registry(tracking) == before, "promote is idempotent"


@pytest.mark.slow
def test_concurrent_promotions_leave_exactly_one_version_and_champion(study):
    workdir, tracking = study["workdir"], study["tracking"]
    mlflow.MlflowClient(tracking_uri=tracking, registry_uri=tracking).delete_registered_model(MODEL)
    env = worker_env(workdir.parent)
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "melvae.study", "promote"],
            cwd=workdir,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    outputs = [p.communicate(timeout=600) for p in processes]
    assert [p.returncode for p in processes] == [0, 0, 0], outputs
    promoted = [out for out, _ in outputs if "promoted to @champion" in out]
    assert len(promoted) == 1, outputs
    state = registry(tracking)
    assert len(state["versions"]) == 1
    assert state["versions"][state["champion"]][COMPLETE_TAG] == "true"


@pytest.mark.slow
def test_a_champion_ranked_by_another_metric_is_never_compared(study, inside):
    from melvae.register import register_and_promote
    from melvae.track import use_backend

    use_backend(None)
    champion = client_for(study["tracking"]).get_model_version_by_alias(MODEL, CHAMPION)
    trials = optuna.load_study(study_name=STUDY, storage=study["storage"]).trials
    other = next(
        t
        for t in trials
        if t.state.name == "COMPLETE" and t.user_attrs["mlflow_run_id"] != champion.run_id
    )
    before = registry(study["tracking"])
    outcome = register_and_promote(
        other.user_attrs["model_uri"],
        name=MODEL,
        objective="val_loss",
        objective_value=-1e9,  # would win any comparison
        direction="minimize",
        tags={"run_id": other.user_attrs["mlflow_run_id"]},
    )
    assert not outcome.promoted and "ranked by 'bio_score'" in outcome.refused
    after = registry(study["tracking"])
    assert after["champion"] == before["champion"]
    assert after["versions"][after["champion"]] == before["versions"][before["champion"]]


@pytest.mark.slow
def test_runs_and_staging_left_by_killed_processes_are_closed_by_the_next(study):
    workdir, tracking, storage = study["workdir"], study["tracking"], study["storage"]
    killed = cli(workdir, "melvae.study", "run", "--n-trials", "1", *TINY, stop_at="baseline")
    assert killed.returncode == -signal.SIGKILL
    left = running(tracking)
    assert any(name.startswith("run-") for name in left), left
    assert any(name.startswith("baseline-") for name in left), left

    out = workdir / "analysis"
    staged = cli(workdir, "melvae.analyze", *KEGG, "--out", "analysis", stop_at="analysis-staged")
    assert staged.returncode == -signal.SIGKILL
    assert not out.exists() and list(workdir.glob(".analysis.staging-*"))

    logged = cli(workdir, "melvae.analyze", *KEGG, "--out", "analysis", stop_at="analysis-logged")
    assert logged.returncode == -signal.SIGKILL
    assert not list(workdir.glob(".analysis.*")), "the killed analysis' staging is removed"
    manifest = json.loads((out / "melvae-analysis.json").read_text())
    assert set(manifest["files"]) == {p.name for p in out.iterdir()} - {"melvae-analysis.json"}
    assert any(name.startswith("analysis-") for name in running(tracking))

    refused(cli(workdir, "melvae.analyze", *KEGG, "--out", "analysis"), "--overwrite")
    done = cli(workdir, "melvae.analyze", *KEGG, "--out", "analysis", "--overwrite")
    assert done.returncode == 0, done.stderr[-3000:]
    assert running(tracking) == []
    client = client_for(tracking)
    experiment = client.get_experiment_by_name(STUDY).experiment_id
    failed = client.search_runs([experiment], filter_string="attributes.status = 'FAILED'")
    reasons = {run.info.run_name: run.data.tags.get("failure_reason", "") for run in failed}
    assert sum("ended without closing it" in reason for reason in reasons.values()) >= 3, reasons
    assert "RUNNING" not in trial_states(storage), "the killed run's trial had completed"


def test_values_far_outside_the_training_range_warn_with_the_fraction_clipped(caplog):
    from melvae.data.validate import warn_outside_training_range

    cells = ad.AnnData(np.full((10, 4), 5000.0, dtype=np.float32))
    cells.var_names = list("ABCD")
    low, high = np.zeros(4), np.full(4, 8.0)
    assert warn_outside_training_range(cells, list("ABCD"), low=low, high=high, source="q") == 1
    assert "100.0% of the values lie outside the model's training range" in caplog.text
    caplog.clear()
    cells.X[:] = 4.0
    assert warn_outside_training_range(cells, list("ABCD"), low=low, high=high, source="q") == 0
    assert caplog.text == ""
