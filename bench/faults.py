"""Every malformed input and fault melvae is tested against, run once, tallied by family.

    python bench/faults.py            # about 10 minutes on 2 cores: real processes, real kills

Runs the fault tests (real `python -m melvae.*` processes, `kill -9` at exact steps, damaged
files) through pytest and prints, per family, how many cases were tried and how many were
handled: the expected exit code, melvae's message without a traceback, and nothing changed that
should not (folder hashes, registry aliases and tags, no run left RUNNING, trial states).
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TESTS = ["tests/test_faults.py", "tests/test_model_corruption.py", "tests/test_enrichment.py"]
TESTS += ["tests/test_subsample.py", "tests/test_bad_input.py", "tests/test_analysis_output.py"]

# Test function (name prefix) -> family of faults it covers.
FAMILIES = {
    "test_analyze_never_writes_over": "1 outputs: analyze --out",
    "test_commands_that_only_read": "1 outputs: read-only commands create no DB",
    "test_a_kill_while_swapping": "1 outputs: kill -9 mid-swap, foreign file",
    "test_a_file_added_to_a_previous": "1 outputs: kill -9 mid-swap, foreign file",
    "test_runs_and_staging_left_by_killed": "2 registry/runs: kill -9 mid-run/analysis",
    "test_registry_heals": "2 registry/runs: incomplete version, kill before alias",
    "test_concurrent_promotions": "2 registry/runs: concurrent promotions",
    "test_a_champion_ranked_by_another": "3 lineage compares one metric",
    "test_another_study_under": "3 study identity",
    "test_two_study_files": "3 study identity",
    "test_a_label_key_the_data_lack": "3 study identity",
    "test_bad_values_in": "5 analysis edge: NaN/inf/negative cells",
    "test_values_far_outside": "5 analysis edge: wrong units",
    "test_analyze_rejects_a_bad_tracking_uri": "5 analysis edge: bad --tracking-uri",
    "test_every_corruption": "6 saved model folders",
    "test_analyze_on_a_damaged_model": "6 saved model folders",
    "test_ranked_enrichment_is_identical": "8 enrichment/subsample",
    "test_ranked_leading_edge": "8 enrichment/subsample",
    "test_many_small_classes": "8 enrichment/subsample",
    "test_shares_by_largest_remainder": "8 enrichment/subsample",
    "test_bad_study_file_values": "earlier: study-file values",
    "test_non_positive_command_line": "earlier: command-line numbers",
    "test_bad_storage_or_tracking_uri": "earlier: --storage / --tracking-uri",
    "test_duplicate_cell_names": "earlier: duplicate cell names",
}


class Tally:
    """A pytest plugin counting each test case's outcome under its family."""

    def __init__(self) -> None:
        self.tried: Counter[str] = Counter()
        self.handled: Counter[str] = Counter()
        self.failed: list[str] = []

    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        items[:] = [item for item in items if _family(item.name) is not None]

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        family = _family(report.nodeid.rsplit("::", 1)[-1])
        if family is None or report.skipped:
            return
        if report.when == "call" or report.failed:
            self.tried[family] += 1
            if report.passed:
                self.handled[family] += 1
            else:
                self.failed.append(report.nodeid)


def _family(name: str) -> str | None:
    return next((family for prefix, family in FAMILIES.items() if name.startswith(prefix)), None)


def main() -> int:
    tally = Tally()
    sys.path.insert(0, str(ROOT))
    code = pytest.main(
        [*(str(ROOT / path) for path in TESTS), "-q", "-p", "no:cacheprovider"], plugins=[tally]
    )
    width = max(map(len, FAMILIES.values()))
    print(f"\n{'family':<{width}}  {'cases tried':>11}  {'handled':>7}")
    for family in sorted(tally.tried):
        print(f"{family:<{width}}  {tally.tried[family]:>11}  {tally.handled[family]:>7}")
    total, handled = sum(tally.tried.values()), sum(tally.handled.values())
    print(f"{'all':<{width}}  {total:>11}  {handled:>7}")
    for nodeid in tally.failed:
        print(f"not handled: {nodeid}")
    return int(code)


if __name__ == "__main__":
    sys.exit(main())
