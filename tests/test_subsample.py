"""The one stratified subsampler: exactly `max_cells` cells, shares kept, every class present."""

from __future__ import annotations

import numpy as np
import pytest

from melvae.subsample import stratified_subsample


def test_shares_by_largest_remainder_and_every_class_keeps_a_cell():
    labels = np.array(["a"] * 900 + ["b"] * 90 + ["c"] * 10)
    keep = stratified_subsample(labels, 100, seed=0)
    assert keep.size == 100
    counts = dict(zip(*np.unique(labels[keep], return_counts=True), strict=True))
    assert counts == {"a": 90, "b": 9, "c": 1}
    assert np.array_equal(keep, stratified_subsample(labels, 100, seed=0))
    assert np.array_equal(stratified_subsample(labels, 5000), np.arange(1000))


@pytest.mark.parametrize("n_small", [1, 40, 99, 150])
def test_many_small_classes_never_exceed_max_cells(n_small):
    # The case the old metrics-side subsampler got wrong: 133 cells for max_cells = 100.
    labels = np.array(["big"] * 2000 + [f"s{i}" for i in range(n_small) for _ in range(3)])
    keep = stratified_subsample(labels, 100, seed=1)
    assert keep.size == 100
    assert np.all(np.diff(keep) > 0)
    if n_small + 1 <= 100:
        assert len(set(labels[keep])) == n_small + 1, "every class keeps at least one cell"
