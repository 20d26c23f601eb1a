"""What a benchmark keeps of its jobs: one JSON file per job under its --out folder, so jobs can
be added later and the table printed again from what is saved."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def save_result(result: dict[str, Any], out: Path, name: str) -> dict[str, Any]:
    """Write `result` to OUT/NAME.json and return it."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=1))
    return result


def saved_results(out: Path) -> list[dict[str, Any]]:
    """Every result saved under `out`, in file-name order; says so when there is none."""
    results = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]
    if not results:
        print(f"no results under {out}")
    return results
