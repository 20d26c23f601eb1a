from __future__ import annotations

import itertools
from dataclasses import dataclass

import matplotlib
import matplotlib.style
import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from threadpoolctl import threadpool_info, threadpool_limits

from melvae import plot
from melvae.errors import InputError

matplotlib.use("Agg")  # no display in CI; melvae.plot itself never picks a backend


@pytest.fixture(autouse=True)
def one_openmp_thread():
    """t-SNE's OpenMP threads spin for seconds when other processes share the cores."""
    with threadpool_limits(limits=1, user_api="openmp"):
        yield


@dataclass
class FakeHistory:
    train_loss: list[float]
    val_loss: list[float]
    train_recon: list[float]
    train_kl: list[float]
    val_recon: list[float]
    val_kl: list[float]
    best_epoch: int


def history(n: int = 12, best: int = 7) -> FakeHistory:
    epochs = np.arange(1, n + 1)
    recon = list(2000 * np.exp(-epochs / 2) + 100)  # spans more than a factor of 5
    kl = list(20 - 5 * np.exp(-epochs / 3))  # narrow range
    total = [r + k for r, k in zip(recon, kl, strict=True)]
    return FakeHistory(total, total, recon, kl, recon, kl, best)


def test_loss_curves_three_panels_with_train_val_and_best_epoch(tmp_path):
    fig = plot.loss_curves(history(best=7))
    axes = fig.get_axes()
    assert [ax.get_title() for ax in axes] == ["total loss", "reconstruction loss", "KL divergence"]
    for ax in axes:
        train, val, best = ax.get_lines()
        assert list(train.get_xdata()) == list(range(1, 13))  # epochs shown 1-based
        assert len(val.get_ydata()) == 12
        assert list(best.get_xdata()) == [8, 8]  # best_epoch indexes the lists
        assert ax.get_xlabel() == "epoch"
    [legend] = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == ["train", "validation", "best epoch (8)"]
    fig.savefig(tmp_path / "loss.png")
    assert (tmp_path / "loss.png").stat().st_size > 0


def test_loss_curves_log_scale_only_for_wide_positive_ranges():
    h = history()
    h.val_recon = [-1.0, *h.val_recon[1:]]  # a non-positive value cannot go on a log axis
    total, recon, kl = plot.loss_curves(h).get_axes()
    assert total.get_yscale() == "log"  # wide, positive
    assert recon.get_yscale() == "linear"  # wide, but not positive
    assert kl.get_yscale() == "linear"  # positive, but narrow


@pytest.mark.parametrize("style", ["default", "ggplot"])  # ggplot: what Optuna's plots set
@pytest.mark.parametrize("scale", [1.0, 1e5, 1e-4])
def test_loss_curves_fixed_margins_fit_their_labels(scale, style):
    """Without a layout engine, every label stays inside the figure, no panel's labels reach into
    its neighbour and the legend sits above the titles, for small and 6-digit losses alike."""
    h = history(n=150, best=100)
    h.train_recon = h.val_recon = [scale * v for v in h.train_recon]
    h.train_loss = h.val_loss = [scale * v for v in h.train_loss]
    with matplotlib.style.context(style):
        fig = plot.loss_curves(h)
    assert fig.get_layout_engine() is None  # saving draws it once
    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)
    inside = fig.bbox
    boxes = [ax.get_tightbbox(renderer) for ax in fig.axes]
    for box in boxes:
        assert inside.x0 <= box.x0 and box.x1 <= inside.x1
        assert inside.y0 <= box.y0 and box.y1 <= inside.y1
    for left, right in itertools.pairwise(boxes):
        assert left.x1 < right.x0
    [legend] = fig.legends
    legend_box = legend.get_window_extent(renderer)
    assert legend_box.y1 <= inside.y1
    assert all(legend_box.y0 > ax.title.get_window_extent(renderer).y1 for ax in fig.axes)


def test_loss_curves_rejects_empty_history():
    with pytest.raises(InputError, match="no epochs"):
        plot.loss_curves(FakeHistory([], [], [], [], [], [], 0))


def test_tsne_coordinates_shape_determinism_and_tiny_inputs():
    latent = np.random.default_rng(0).normal(size=(40, 4))
    coords = plot.tsne_coordinates(latent, seed=1)
    assert coords.shape == (40, 2)
    np.testing.assert_array_equal(coords, plot.tsne_coordinates(latent, seed=1))
    # perplexity is capped for few cells; a 1-D latent cannot use PCA initialisation
    assert plot.tsne_coordinates(latent[:4]).shape == (4, 2)
    assert plot.tsne_coordinates(latent[:, :1]).shape == (40, 2)


def test_tsne_coordinates_runs_in_one_thread_and_gives_the_threads_back(monkeypatch):
    seen = []
    fit = plot.TSNE.fit_transform

    def recording(self, x):
        seen.append({pool["internal_api"]: pool["num_threads"] for pool in threadpool_info()})
        return fit(self, x)

    monkeypatch.setattr(plot.TSNE, "fit_transform", recording)
    with threadpool_limits(limits=2):  # as on a 2-core machine, whatever this one has
        before = {pool["filepath"]: pool["num_threads"] for pool in threadpool_info()}
        plot.tsne_coordinates(np.random.default_rng(0).normal(size=(20, 3)))
        after = {pool["filepath"]: pool["num_threads"] for pool in threadpool_info()}
    assert seen and all(n == 1 for n in seen[0].values())
    assert after == before


def test_tsne_coordinates_rejects_nan():
    latent = np.ones((10, 3))
    latent[2, 1] = np.nan
    with pytest.raises(InputError, match="finite"):
        plot.tsne_coordinates(latent)


def labelled_cells() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    labels = np.array(["T"] * 200 + ["B"] * 100 + ["NK"] * 20, dtype=object)
    offset = {"T": 0.0, "B": 8.0, "NK": -8.0}
    latent = rng.normal(size=(labels.size, 5)) + np.array([offset[v] for v in labels])[:, None]
    return latent, labels


def legend_texts(fig) -> list[str]:
    return [t.get_text() for t in fig.get_axes()[0].get_legend().get_texts()]


def test_tsne_embedding_stratified_subsample_respects_max_cells(tmp_path):
    latent, labels = labelled_cells()
    fig = plot.tsne_embedding(latent, labels, title="val", max_cells=32)
    ax = fig.get_axes()[0]
    [points] = ax.collections
    assert len(points.get_offsets()) == 32
    # each type keeps its share: 200/100/20 of 320 cells -> 20/10/2 of 32
    assert legend_texts(fig) == ["B (10)", "NK (2)", "T (20)"]
    assert ax.get_title() == "val (32 of 320 cells)"
    fig.savefig(tmp_path / "tsne.png")


def test_tsne_embedding_colours_types_and_greys_missing_labels():
    latent, labels = labelled_cells()
    latent, labels = latent[::5], labels[::5].copy()  # 64 cells, below max_cells
    labels[:3] = None
    fig = plot.tsne_embedding(latent, labels, title="val")
    [points] = fig.get_axes()[0].collections
    assert len(points.get_offsets()) == 64
    assert legend_texts(fig) == ["B (20)", "NK (4)", "T (37)", "(no label) (3)"]
    assert len({tuple(c) for c in points.get_facecolors()}) == 4
    assert fig.get_axes()[0].get_title() == "val"


def test_tsne_embedding_without_labels_uses_one_colour_and_no_legend():
    latent, _ = labelled_cells()
    fig = plot.tsne_embedding(latent[:50], None, title="no labels")
    ax = fig.get_axes()[0]
    [points] = ax.collections
    assert len({tuple(c) for c in points.get_facecolors()}) == 1
    assert ax.get_legend() is None


def test_tsne_embedding_rejects_label_count_mismatch():
    latent, labels = labelled_cells()
    with pytest.raises(InputError, match="labels for a latent"):
        plot.tsne_embedding(latent, labels[:-1], title="x")


@pytest.mark.parametrize("n_types", [12, 25])
def test_tsne_embedding_gives_every_type_its_own_colour(n_types):
    latent = np.random.default_rng(0).normal(size=(2 * n_types, 3))
    labels = np.repeat([f"type{i:02d}" for i in range(n_types)], 2)
    fig = plot.tsne_embedding(latent, labels, title="many types")
    [points] = fig.get_axes()[0].collections
    colours = {tuple(c) for c in points.get_facecolors()}
    assert len(colours) == n_types
    assert all(not (r == g == b) for r, g, b, _ in colours)  # grey is kept for "(no label)"
    assert len(legend_texts(fig)) == n_types
