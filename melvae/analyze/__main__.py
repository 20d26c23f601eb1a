"""Command line: `python -m melvae.analyze [--model URI] [--reference F] [--query F] ...`."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from melvae.analyze.pipeline import DEFAULT_GENESETS, analyze
from melvae.errors import InputError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m melvae.analyze",
        description="Cell-type transfer, latent-dimension genes and Reactome/KEGG enrichment "
        "with a registered melvae model.",
    )
    parser.add_argument("--model", help="model URI (default: the default study's champion)")
    parser.add_argument("--reference", type=Path, help="labelled reference cells (.h5ad/.csv)")
    parser.add_argument("--query", type=Path, help="query cells to label (.h5ad/.csv)")
    parser.add_argument("--label-key", help="cell-type column of the reference/query")
    parser.add_argument(
        "--genesets",
        nargs="+",
        default=list(DEFAULT_GENESETS),
        help="libraries: reactome, kegg, go_bp, comma-separated and/or GMT paths",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("analysis"),
        help="output folder: new or empty (default analysis/)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace --out when it holds a previous melvae analysis (and nothing else)",
    )
    parser.add_argument("--method", choices=("knn", "logreg"), default="knn")
    parser.add_argument("--threshold", type=float, default=0.5, help="confidence to assign")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default mlruns/mlflow.db)")
    parser.add_argument(
        "--batch-key",
        help="patient (batch) column of the reference: report how much of each latent "
        "dimension is patient and how much cell type",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    genesets = [spec for item in args.genesets for spec in item.split(",") if spec]
    try:
        result = analyze(
            args.model,
            reference=args.reference,
            query=args.query,
            label_key=args.label_key,
            genesets=genesets,
            out=args.out,
            overwrite=args.overwrite,
            tracking_uri=args.tracking_uri,
            method=args.method,
            threshold=args.threshold,
            batch_key=args.batch_key,
        )
    except InputError as exc:
        print(f"melvae: error: {exc}", file=sys.stderr)
        return exc.exit_code
    metrics = result.transfer_metrics
    if metrics is not None:
        headline = {k: metrics[k] for k in ("accuracy", "macro_f1", "unassigned_rate")}
        print("transfer:", json.dumps(headline))
        print("unassigned rate by true label:", json.dumps(metrics["unassigned_rate_by_label"]))
    print(f"report: {result.out / 'report.html'} (MLflow run {result.run_id})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
