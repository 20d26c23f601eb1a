"""How `tune(..., workers=N)` hands a study's data to its worker processes, measured.

Before, each worker read the data file again and repeated validate -> split -> preprocess (and
data that existed only in the caller's memory could not reach a worker at all). Now the caller
prepares them once and writes one job file (`melvae.study.workers.write_job`) that each worker
reads. For each data set, side by side in this one process, best of `--repeats`:

- prepare: what each worker did before (read the file if there is one, then `prepare_data`);
- write: the caller writing the job file once (atomically, in a private temporary folder);
- read: what each worker does now (`read_job`), and read / prepare;

and, once, what every worker pays to start either way: a fresh `python` importing `melvae.study`.

Data: scanpy's PBMC 700 (the offline default), the shared melanoma T-cell subset (if
/work/shared/data is there) and a synthetic 20,000-cell x 5,000-gene sparse count matrix in
memory (10 % non-zero).

    python bench/worker_handoff.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from melvae.data.datasets import Dataset, load_dataset
from melvae.study import workers
from melvae.study.runner import prepare_data
from melvae.tuning import study_config

SHARED = Path("/work/shared/data/sadefeldman2018_gse120575_tcells_subset.h5ad")


def _synthetic(n_cells: int = 20_000, n_genes: int = 5_000) -> Dataset:
    rng = np.random.default_rng(0)
    x = sp.random(n_cells, n_genes, density=0.1, format="csr", random_state=rng, dtype=np.float32)
    x.data = np.ceil(x.data * 10)
    labels = np.array(list("ABCDE"))[rng.integers(0, 5, n_cells)]
    adata = ad.AnnData(
        x,
        obs=pd.DataFrame({"cell_type": labels}, index=[f"c{i}" for i in range(n_cells)]),
        var=pd.DataFrame(index=[f"g{j}" for j in range(n_genes)]),
    )
    return Dataset("synthetic", adata, "cell_type", "synthetic counts in memory")


def _best(repeats: int, step: Callable[[], object]) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = step()
        times.append(time.perf_counter() - started)
    return min(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    config = study_config()
    cases: list[tuple[str, Callable[[], Dataset]]] = [
        ("PBMC 700 (scanpy)", lambda: load_dataset("pbmc68k_reduced"))
    ]
    if SHARED.exists():
        cases.append(("melanoma T cells (h5ad file)", lambda: load_dataset(str(SHARED))))
    synthetic = _synthetic()
    cases.append(("synthetic 20k x 5k (in memory)", lambda: synthetic))
    print(
        f"{'data':32} {'cells x genes':>14} {'prepare s':>9} {'write s':>8} {'read s':>7} "
        f"{'job MB':>7} {'read/prepare':>12}"
    )
    for label, load in cases:
        prepare, data = _best(args.repeats, lambda load=load: prepare_data(config, dataset=load()))
        job = workers.Job(config, data, {"storage": "sqlite:///unused.db"})
        with tempfile.TemporaryDirectory() as folder:
            write, path = _best(
                args.repeats, lambda job=job, folder=folder: workers.write_job(job, Path(folder))
            )
            read, _ = _best(args.repeats, lambda path=path: workers.read_job(path))
            size = path.stat().st_size / 1e6
        shape = f"{data.train.n_obs + data.val.n_obs + data.test.n_obs} x {data.train.n_vars}"
        print(
            f"{label:32} {shape:>14} {prepare:9.3f} {write:8.3f} {read:7.3f} {size:7.1f} "
            f"{read / prepare:12.2f}"
        )
    imports = [sys.executable, "-c", "import melvae.study.__main__"]
    start, _ = _best(args.repeats, lambda: subprocess.run(imports, check=True))
    print(f"a worker's start (python importing melvae.study): {start:.2f} s")


if __name__ == "__main__":
    main()
