"""Shared fixtures: a loopback HTTP server, a private PostgreSQL, the shared real-data folder."""

from __future__ import annotations

import contextlib
import functools
import glob
import http.server
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

# As the command line does before torch starts its threads (melvae.study.__main__.main), so that
# training under several threads flushes subnormal floats on all of them and does not warn.
torch.set_flush_denormal(True)


@pytest.fixture
def unreachable_url() -> str:
    """A loopback URL on a port that was just free, so connecting to it is refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@dataclass
class Served:
    """A folder served over HTTP on 127.0.0.1; ``requests`` lists the paths asked for."""

    root: Path
    url: str
    server: http.server.ThreadingHTTPServer
    requests: list[str] = field(default_factory=list)

    def stop(self) -> None:
        """Shut the server down (idempotent), e.g. to prove a later call needs no network."""
        if self.server.socket.fileno() != -1:
            self.server.shutdown()
            self.server.server_close()


@pytest.fixture
def http_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """Serve a fresh tmp folder (``.root``) at ``.url`` from a thread; stopped at teardown."""
    root = tmp_path_factory.mktemp("served")
    requests: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
            requests.append(self.path)

        def log_message(self, *args: object) -> None:
            """Keep test output quiet."""

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Handler, directory=str(root))
    )
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    served = Served(root, f"http://127.0.0.1:{server.server_address[1]}", server, requests)
    yield served
    served.stop()
    thread.join(timeout=5)


@pytest.fixture
def shared_data() -> Path:
    """The shared real-data folder (../shared/data from the repo root); skip when absent."""
    path = Path(__file__).parents[2] / "shared" / "data"
    if not path.is_dir():
        pytest.skip(f"shared data folder {path} is not available")
    return path


@pytest.fixture(scope="module")
def pbmc():
    """scanpy's shipped real PBMC set: 700 cells × 765 genes, log-normalised, sparse.

    Labels in obs["bulk_labels"] (and obs["cell_type"]). One fresh copy per test module.
    """
    from melvae.data.read import read_pbmc68k_reduced

    return read_pbmc68k_reduced()


INITDB = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))


def _as_postgres(command: list[str]) -> list[str]:
    """initdb refuses to run as root; run the cluster as the `postgres` user then."""
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *command]
    return command


@dataclass
class Postgres:
    """A private PostgreSQL cluster on 127.0.0.1:`port` (user melvae, trust authentication)."""

    bindir: Path
    port: int

    def database(self, name: str) -> str:
        """Create database `name`; return its URL (Optuna's form; MLflow wants +psycopg)."""
        createdb = [str(self.bindir / "createdb"), "-h", "127.0.0.1", "-p", str(self.port)]
        subprocess.run(_as_postgres([*createdb, "-U", "melvae", name]), check=True)
        return f"postgresql://melvae@127.0.0.1:{self.port}/{name}"


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """Start a throw-away cluster with initdb/pg_ctl on a free loopback port; skip without one."""
    if not INITDB:
        pytest.skip("PostgreSQL binaries are not installed (.ci/run installs them with apt)")
    pytest.importorskip("psycopg")
    bindir = Path(INITDB[-1]).parent
    root = Path(tempfile.mkdtemp(prefix="melvae-pg-", dir="/tmp"))
    root.chmod(0o777)
    data = root / "data"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    initdb = [str(bindir / "initdb"), "-D", str(data), "-U", "melvae", "--auth=trust"]
    subprocess.run(_as_postgres(initdb), check=True, capture_output=True)
    pg_ctl = [str(bindir / "pg_ctl"), "-D", str(data)]
    options = f"-h 127.0.0.1 -p {port} -k {root}"
    start = [*pg_ctl, "-o", options, "-l", str(root / "log"), "-w", "start"]
    subprocess.run(_as_postgres(start), check=True, capture_output=True)
    try:
        yield Postgres(bindir, port)
    finally:
        subprocess.run(_as_postgres([*pg_ctl, "-m", "fast", "stop"]), capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def process_group(command: list[str], **popen: object) -> Iterator[subprocess.Popen]:
    """Run a server command in a session of its own and end the whole group on exit.

    `mlflow ui/server/models serve` start uvicorn workers and job consumers; ending only the
    top process leaves them running (orphaned) for the rest of the suite.
    """
    process = subprocess.Popen(command, start_new_session=True, **popen)
    try:
        yield process
    finally:
        for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, sig)
            try:
                process.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # stragglers of an already-ended leader
