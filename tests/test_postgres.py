"""Many workers on one study: PostgreSQL storage in a private cluster on a free loopback port."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import optuna
import pytest

from tests.test_study import _closed_port_url

INITDB = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))


def _as_postgres(command: list[str]) -> list[str]:
    """initdb refuses to run as root; run the cluster as the `postgres` user then."""
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *command]
    return command


@pytest.fixture(scope="module")
def postgres_url():
    if not INITDB:
        pytest.skip("PostgreSQL binaries are not installed")
    pytest.importorskip("psycopg")
    bindir = Path(INITDB[-1]).parent
    root = Path(tempfile.mkdtemp(prefix="melvae-pg-", dir="/tmp"))
    root.chmod(0o777)
    data = root / "data"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    subprocess.run(
        _as_postgres([str(bindir / "initdb"), "-D", str(data), "-U", "melvae", "--auth=trust"]),
        check=True,
        capture_output=True,
    )
    options = f"-h 127.0.0.1 -p {port} -k {root}"
    subprocess.run(
        _as_postgres(
            [
                str(bindir / "pg_ctl"),
                "-D",
                str(data),
                "-o",
                options,
                "-l",
                str(root / "log"),
                "-w",
                "start",
            ]
        ),
        check=True,
        capture_output=True,
    )
    try:
        subprocess.run(
            _as_postgres(
                [
                    str(bindir / "createdb"),
                    "-h",
                    "127.0.0.1",
                    "-p",
                    str(port),
                    "-U",
                    "melvae",
                    "optuna",
                ]
            ),
            check=True,
            capture_output=True,
        )
        yield f"postgresql://melvae@127.0.0.1:{port}/optuna"
    finally:
        subprocess.run(
            _as_postgres([str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "stop"]),
            capture_output=True,
        )
        shutil.rmtree(root, ignore_errors=True)


def test_two_workers_share_one_study_in_postgres(tmp_path, postgres_url):
    env = {
        **os.environ,
        "MELVAE_DATA_DIR": str(tmp_path / "cache"),
        "MELVAE_GEO_URL": _closed_port_url(),
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    study_cli = [sys.executable, "-m", "melvae.study"]
    created = subprocess.run(
        [*study_cli, "create", "--storage", postgres_url],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert created.returncode == 0, created.stderr
    worker = [
        *study_cli,
        "run",
        "--storage",
        postgres_url,
        "--n-trials",
        "2",
        "--epochs",
        "2",
        "--quiet",
        "--threads",
        "1",
    ]
    workers = [
        subprocess.Popen(
            worker, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outputs = [w.communicate(timeout=600) for w in workers]
    for w, (_, err) in zip(workers, outputs, strict=True):
        assert w.returncode == 0, err[-3000:]

    study = optuna.load_study(study_name="melanoma-vae-pbmc68k_reduced", storage=postgres_url)
    assert len(study.trials) == 4
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    seeds = [t for t in study.trials if t.user_attrs.get("seed_trial")]
    assert len(seeds) == 3, "each documented experiment runs once across workers"
    assert len({t.params["latent_dim"] for t in seeds}) == 3
