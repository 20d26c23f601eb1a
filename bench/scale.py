"""Scaling: a one-trial, one-epoch `run --data` on synthetic atlases of 100 k, 300 k and 1 M cells.

Each size is a sparse 2,000-gene matrix (~8 % non-zero, integer counts, eight cell types in
unequal shares) written to an .h5ad in chunks, so the generator itself stays small. Each run is
`python -m melvae.study run --data FILE --n-trials 1 --epochs 1` in its own subprocess with fresh
Optuna/MLflow stores; peak memory is the child's maximum resident set size as the kernel
accounts it (`os.wait4`), seconds per epoch is the trial's `epoch_seconds` metric (training +
validation pass) read back from MLflow. Each file is run twice, read into memory and with
`--backed` (X left on disk, read a window at a time: `melvae.data.backed`), and the table puts
the two side by side with their ratios.

Baseline on main (a365491, same machine): 100 k cells 2.25 GB, 300 k 5.0 GB, 1 M 14.1 GB
(5 min 16 s).

    python bench/scale.py [--cells 100000 300000 1000000] [--dir /tmp/melvae-scale] [--keep]
                          [--threads 1] [--modes memory backed]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

GENES, DENSITY, CELL_TYPES, CHUNK = 2000, 0.08, 8, 20_000
MODES = ("memory", "backed")


def write_atlas(path: Path, n_cells: int, seed: int = 0) -> None:
    """Write a synthetic n_cells × GENES count matrix to `path` (.h5ad), CHUNK cells at a time."""
    rng = np.random.default_rng(seed)
    shares = rng.dirichlet(np.full(CELL_TYPES, 2.0))
    types = rng.choice(CELL_TYPES, size=n_cells, p=shares)
    gene_density = np.clip(rng.lognormal(np.log(DENSITY), 0.5, GENES), 0.005, 0.5)
    gene_density *= DENSITY / gene_density.mean()
    type_means = rng.lognormal(0.5, 1.0, (CELL_TYPES, GENES)).astype(np.float32)
    tmp = path.with_suffix(".partial")
    with h5py.File(tmp, "w") as file:
        for start in range(0, n_cells, CHUNK):
            rows = types[start : start + CHUNK]
            present = rng.random((rows.size, GENES), dtype=np.float32) < gene_density
            r, c = np.nonzero(present)
            counts = (1 + rng.poisson(type_means[rows[r], c])).astype(np.float32)
            chunk = sp.csr_matrix((counts, (r, c)), shape=present.shape)
            if start == 0:
                ad.io.write_elem(file, "X", chunk)
                matrix = ad.io.sparse_dataset(file["X"])
            else:
                matrix.append(chunk)
        obs = pd.DataFrame(
            {"cell_type": pd.Categorical([f"type_{t}" for t in types])},
            index=[f"cell{i}" for i in range(n_cells)],
        )
        var = pd.DataFrame(index=[f"gene{j}" for j in range(GENES)])
        for key, value in (("obs", obs), ("var", var)):
            ad.io.write_elem(file, key, value)
        for key in ("obsm", "varm", "obsp", "varp", "layers", "uns"):
            ad.io.write_elem(file, key, {})
        file.attrs["encoding-type"], file.attrs["encoding-version"] = "anndata", "0.1.0"
    tmp.rename(path)


def run_once(data: Path, threads: int, backed: bool) -> dict[str, float]:
    """Seconds per epoch (wall and CPU), wall and CPU seconds of the whole run, and peak resident
    GB of one `run --data` subprocess (`--backed` if `backed`)."""
    import mlflow

    with tempfile.TemporaryDirectory(prefix="melvae-scale-run-") as work:
        tracking = f"sqlite:///{work}/mlflow.db"
        command = [sys.executable, "-m", "melvae.study", "run", "--data", str(data)]
        command += ["--n-trials", "1", "--epochs", "1", "--quiet", "--device", "cpu"]
        command += ["--threads", str(threads), *(["--backed"] if backed else [])]
        command += ["--storage", f"sqlite:///{work}/optuna.db", "--tracking-uri", tracking]
        started = time.perf_counter()
        child = subprocess.Popen(command, cwd=work, stdout=subprocess.DEVNULL)
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - started
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"run on {data} failed (exit {os.waitstatus_to_exitcode(status)})")
        mlflow.set_tracking_uri(tracking)
        runs = mlflow.search_runs(
            search_all_experiments=True, filter_string="metrics.epoch_seconds > 0"
        )
        trial = runs.iloc[0]
    return {
        "epoch": float(trial["metrics.epoch_seconds"]),
        "epoch_cpu": float(trial["metrics.epoch_cpu_seconds"]),
        "wall": wall,
        "cpu": usage.ru_utime + usage.ru_stime,
        "peak": usage.ru_maxrss * 1024 / 1e9,  # ru_maxrss is in KiB on Linux
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, nargs="+", default=[100_000, 300_000, 1_000_000])
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "melvae-scale")
    parser.add_argument("--keep", action="store_true", help="keep the generated .h5ad files")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads of each run (1: on a shared machine two threads of a small model "
        "spin against other jobs and an epoch gets many times slower)",
    )
    parser.add_argument(
        "--modes", nargs="+", choices=MODES, default=list(MODES), help="how runs read the file"
    )
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        for n_cells in args.cells:
            path = args.dir / f"cells-{n_cells}.h5ad"
            if not path.exists():
                write_atlas(path, n_cells)
            for mode in args.modes:
                result = run_once(path, args.threads, backed=mode == "backed")
                rows.append((n_cells, mode, path.stat().st_size / 1e9, result))
                print(f"{n_cells} cells, {mode}: {result}", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(args.dir, ignore_errors=True)
    print(
        f"\none trial of one epoch, `run --data`, {GENES} genes, {DENSITY:.0%} non-zero "
        f"(train 70 % / val 15 % / test 15 %), torch threads {args.threads}"
    )
    print(
        "epoch: wall and process-CPU seconds of the trial's one epoch (training + validation); "
        "run: the whole subprocess (read, preprocess, train, evaluate, log, register)"
    )
    header = ("cells", "X", "file GB", "epoch wall s", "epoch CPU s", "CPU s/100k cells")
    header += ("run wall s", "run CPU s", "peak GB")
    print("".join(f"{h:>17s}" for h in header))
    for n_cells, mode, size, r in rows:
        values = (f"{n_cells:,}", mode, f"{size:.2f}", f"{r['epoch']:.1f}", f"{r['epoch_cpu']:.1f}")
        values += (f"{r['epoch_cpu'] / n_cells * 1e5:.1f}", f"{r['wall']:.0f}", f"{r['cpu']:.0f}")
        values += (f"{r['peak']:.2f}",)
        print("".join(f"{v:>17s}" for v in values))
    results = {(n_cells, mode): r for n_cells, mode, _, r in rows}
    both = [n for n in args.cells if all((n, m) in results for m in MODES)]
    if both:
        print("\nbacked / memory, same file")
        header = ("cells", "epoch wall", "run wall", "peak")
        print("".join(f"{h:>17s}" for h in header))
        for n_cells in both:
            disk, memory = results[n_cells, "backed"], results[n_cells, "memory"]
            ratios = (disk[key] / memory[key] for key in ("epoch", "wall", "peak"))
            print(f"{n_cells:>17,}" + "".join(f"{r:>17.2f}" for r in ratios))


if __name__ == "__main__":
    main()
