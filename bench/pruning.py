"""Training CPU per study against champion quality, for pruning and early-stopping settings.

Each candidate is a named set of overrides to the default study file (`[pruner]` options and
`[train] early_stopping_patience`); "file" is the file as it is. For each candidate and seed
the default study runs end to end through `melvae.tune` (as `python -m melvae.study run` does),
in a fresh temporary folder, offline (so on the PBMC fallback), with `--workers 1` and one torch
thread by default, so a seed gives the same trials. A seed is the study's sampler seed and its
`[train] seed` (weight initialisation, batch order); the cells' split stays the file's, so every
run scores its champion on the same held-out test cells.

What it records is what the study records: each trial's training CPU is the sum of the
per-epoch `epoch_cpu_seconds` (training pass + validation loss) its MLflow run logged, its
epochs `runner.epochs_run`; the champion is the study's own, with its `bio_score` and the
held-out test metrics (`champion_test_metrics`). The study's whole CPU (this process and its
worker processes) and wall time are recorded too. Prints, per candidate, the means over seeds
with their spread (min-max) and the ratio to --baseline's ("file"), and one row per run. Training
CPU on a loaded machine moves by +-20 % for the same trials (the epochs do not).

    python bench/pruning.py --seeds 0 1 2 --out /tmp/pruning       # every candidate
    python bench/pruning.py --candidates w20-patience15 file --baseline w20-patience15 \\
        --seeds 0 --out /tmp/pruning
    python bench/pruning.py --workers auto --threads 0 --out /tmp/pruning-auto  # as users run it
    python bench/pruning.py --table-only /tmp/pruning

Runs are saved one JSON each under --out (candidate, seed), so candidates can run as separate
processes and the table be printed again from what they saved. With several candidates and
seeds, runs are interleaved (every candidate for seed 0, then for seed 1, ...) so that the
machine's load falls on all of them alike.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from saved import save_result, saved_results
from study_profile import offline

if TYPE_CHECKING:
    import optuna

# name -> overrides: "pruner" (keys replacing the file's [pruner] options) and
# "early_stopping_patience" ([train]).
CANDIDATES: dict[str, dict[str, Any]] = {
    "file": {},
    "w20-patience15": {  # the default study before issue 16
        "pruner": {"n_warmup_steps": 20, "n_startup_trials": 5},
        "early_stopping_patience": 15,
    },
    "w5-patience10": {"pruner": {"n_warmup_steps": 5}, "early_stopping_patience": 10},
    "w10-patience10": {"pruner": {"n_warmup_steps": 10}, "early_stopping_patience": 10},
    "w5-startup3-patience10": {
        "pruner": {"n_warmup_steps": 5, "n_startup_trials": 3},
        "early_stopping_patience": 10,
    },
}
TEST_METRICS = ("test_knn_accuracy", "test_ari", "test_nmi")


def study_dict(candidate: str, seed: int) -> dict[str, Any]:
    """The default study file's tables with `candidate`'s overrides and `seed` applied."""
    from melvae.study.config import DEFAULT_STUDY

    raw = tomllib.loads(DEFAULT_STUDY.read_text())
    overrides = CANDIDATES[candidate]
    raw["pruner"] |= overrides.get("pruner", {})
    if "early_stopping_patience" in overrides:
        raw["train"]["early_stopping_patience"] = overrides["early_stopping_patience"]
    raw["sampler"]["seed"] = seed
    raw["train"]["seed"] = seed
    return raw


@contextlib.contextmanager
def fresh_folder() -> Iterator[Path]:
    """A temporary folder the run works in, offline; the caller's folder is given back after."""
    here = Path.cwd()
    with tempfile.TemporaryDirectory() as tmp:
        offline(Path(tmp))
        try:
            yield Path(tmp)
        finally:
            os.chdir(here)


def process_cpu_seconds() -> float:
    """CPU seconds (user + system) of this process so far, with its finished worker processes."""
    own, children = (
        resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
    )
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def trial_rows(study: optuna.Study, tracking_uri: str) -> list[dict[str, Any]]:
    """Each trial: state, whether a seed trial, epochs trained, training CPU s, scores."""
    import mlflow  # here, not at the top: --table-only needs neither MLflow nor melvae

    from melvae.study.runner import epochs_run

    client = mlflow.MlflowClient(tracking_uri)
    rows = []
    for trial in study.trials:
        run_id = trial.user_attrs.get("mlflow_run_id")
        history = client.get_metric_history(run_id, "epoch_cpu_seconds") if run_id else []
        rows.append(
            {
                "number": trial.number,
                "state": trial.state.name,
                "seed_trial": bool(trial.user_attrs.get("seed_trial")),
                "epochs": epochs_run(trial) or 0,
                "train_cpu_s": float(sum(m.value for m in history)),
                "bio_score": trial.user_attrs.get("bio_score"),
                "val_loss": trial.values[0] if trial.values else None,
                "params": trial.params,
            }
        )
    return rows


def one_run(
    candidate: str, seed: int, *, workers: int | str, threads: int | None, out: Path, **quick: Any
) -> dict[str, Any]:
    """Run the default study with `candidate`'s settings and `seed`; save and return the record.
    `quick`: `melvae.tune`'s n_trials and epochs (quick looks only)."""
    import melvae

    with fresh_folder() as folder:
        load = os.getloadavg()[0]
        result = melvae.tune(
            None,
            study_dict(candidate, seed),
            workers=workers,
            threads=threads,
            progress=False,
            **quick,
        )
        cpu = process_cpu_seconds()
        trials = trial_rows(result.study, f"sqlite:///{folder}/mlruns/mlflow.db")
    champion = result.champion_trial
    test = result.study.user_attrs.get("champion_test_metrics", {})
    record = {
        "candidate": candidate,
        "seed": seed,
        "overrides": CANDIDATES[candidate],
        "plan": result.plan.describe(),
        "load_start": load,
        "load_end": os.getloadavg()[0],
        "wall_s": result.seconds,
        "process_cpu_s": cpu,
        "trials": trials,
        "champion": None
        if champion is None
        else {
            "number": champion.number,
            "seed_trial": bool(champion.user_attrs.get("seed_trial")),
            "params": champion.params,
            "bio_score": champion.user_attrs["bio_score"],
            **{name: test[name] for name in TEST_METRICS},
        },
    }
    return save_result(record, out, f"{candidate}-seed{seed}")


def summary(record: dict[str, Any]) -> dict[str, Any]:
    """One run's figures for the table."""
    trials = record["trials"]
    champion = record["champion"] or {}
    return {
        "train_cpu_s": sum(t["train_cpu_s"] for t in trials),
        "epochs": sum(t["epochs"] for t in trials),
        "pruned": sum(t["state"] == "PRUNED" for t in trials),
        "process_cpu_s": record["process_cpu_s"],
        "wall_s": record["wall_s"],
        "champion": champion.get("number"),
        "bio_score": champion.get("bio_score", float("nan")),
        **{name: champion.get(name, float("nan")) for name in TEST_METRICS},
    }


COLUMNS = ("train_cpu_s", "epochs", "pruned", "process_cpu_s", "wall_s", "bio_score", *TEST_METRICS)
RATIOS = ("train_cpu_s", "epochs", "process_cpu_s", "wall_s")


def print_table(out: Path, baseline: str = "file") -> None:
    """Per candidate: mean [min-max] over seeds, ratios to `baseline`'s; then one row per run."""
    records = saved_results(out)
    if not records:
        return
    runs = {(r["candidate"], r["seed"]): summary(r) for r in records}
    candidates = list(dict.fromkeys(r["candidate"] for r in records))
    plans = sorted({r["plan"] for r in records})
    loads = [x for r in records for x in (r["load_start"], r["load_end"])]
    print(f"\nplan: {'; '.join(plans)}; load average {min(loads):.1f}-{max(loads):.1f}")
    print(f"== per candidate: mean [min - max] over seeds; ratio: mean / {baseline}'s mean ==")
    reference = [v for (c, _), v in runs.items() if c == baseline]
    for candidate in candidates:
        mine = [v for (c, _), v in runs.items() if c == candidate]
        seeds = sorted(s for c, s in runs if c == candidate)
        print(f"{candidate}  (seeds {', '.join(map(str, seeds))})")
        for column in COLUMNS:
            values = np.array([v[column] for v in mine], dtype=float)
            line = f"  {column:18s}{values.mean():9.3f}  [{values.min():.3f} - {values.max():.3f}]"
            if reference and column in RATIOS:
                ratio = values.mean() / np.mean([v[column] for v in reference])
                line += f"   x{ratio:.2f}"
            print(line)
    print("\n== per run ==")
    header = ["candidate", "seed", *COLUMNS, "champion", f"x {baseline} cpu"]
    print("  ".join(f"{h:>10.10s}" for h in header))
    for (candidate, seed), v in sorted(
        runs.items(), key=lambda i: (i[0][1], candidates.index(i[0][0]))
    ):
        base = runs.get((baseline, seed))
        ratio = v["train_cpu_s"] / base["train_cpu_s"] if base else float("nan")
        cells = [candidate, seed, *(v[c] for c in COLUMNS), v["champion"], ratio]
        print("  ".join(_cell(c) for c in cells))


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:10.3f}"
    return f"{value!s:>10.10s}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", nargs="+", choices=list(CANDIDATES), default=None)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--workers", default="1", help='a number or "auto" (default 1)')
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads per process (0: the plan's)"
    )
    parser.add_argument("--n-trials", type=int, help="default: the study file's (20)")
    parser.add_argument("--epochs", type=int, help="cap epochs (quick looks only)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/melvae-pruning"))
    parser.add_argument("--baseline", default="file", help="the candidate ratios are to")
    parser.add_argument("--table-only", type=Path, metavar="DIR", help="reprint saved runs")
    parser.add_argument("--one", nargs=2, metavar=("CANDIDATE", "SEED"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.table_only is not None:
        print_table(args.table_only, args.baseline)
        return 0
    if args.one is not None:  # one run, in a process of its own (imports count for every run)
        workers = args.workers if args.workers == "auto" else int(args.workers)
        quick = {"n_trials": args.n_trials, "epochs": args.epochs}
        candidate, seed = args.one[0], int(args.one[1])
        threads = args.threads or None
        record = one_run(candidate, seed, workers=workers, threads=threads, out=args.out, **quick)
        print(f"  {record['wall_s']:.0f} s, {record['plan']}", flush=True)
        return 0
    common = ["--workers", args.workers, "--threads", str(args.threads), "--out", str(args.out)]
    for option, value in (("--n-trials", args.n_trials), ("--epochs", args.epochs)):
        common += [option, str(value)] if value is not None else []
    for seed in args.seeds:
        for candidate in args.candidates or CANDIDATES:
            print(f"{time.strftime('%H:%M:%S')} {candidate} seed {seed} ...", flush=True)
            one = [sys.executable, __file__, "--one", candidate, str(seed), *common]
            subprocess.run(one, check=True, stderr=subprocess.DEVNULL)
    print_table(args.out, args.baseline)
    return 0


if __name__ == "__main__":
    sys.exit(main())
