"""Training loop: losses per epoch, determinism, callback, early stopping, NaN handling."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import scipy.sparse as sp
import torch

import melvae.train
from melvae.errors import InputError
from melvae.module import VAEModule
from melvae.train import (
    METRIC_NAMES,
    FusedAdam,
    History,
    NonFiniteLossError,
    TrainConfig,
    evaluate_loss,
    train_vae,
)


def _clustered(n_cells: int = 200, n_genes: int = 30, seed: int = 0) -> np.ndarray:
    """Three groups of cells with different mean profiles, values in [0, 1]."""
    rng = np.random.default_rng(seed)
    centres = rng.random((3, n_genes))
    groups = rng.integers(0, 3, n_cells)
    X = centres[groups] + 0.1 * rng.standard_normal((n_cells, n_genes))
    return np.clip(X, 0, 1).astype(np.float32)


def _module(likelihood: str = "bernoulli", n_genes: int = 30) -> VAEModule:
    torch.manual_seed(0)
    return VAEModule(n_genes=n_genes, hidden_dim=16, latent_dim=3, likelihood=likelihood)


def _params_equal(a: VAEModule, b: VAEModule) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_training_lowers_the_validation_loss_and_reports_six_losses_per_epoch() -> None:
    X = _clustered()
    history = train_vae(_module(), X[:150], X[150:], TrainConfig(epochs=6), progress=False)
    assert all(len(getattr(history, name)) == 6 for name in METRIC_NAMES)
    assert history.val_loss[history.best_epoch] < history.val_loss[0]
    metrics = history.epoch_metrics(2)
    assert set(metrics) == set(METRIC_NAMES)
    assert metrics["val_loss"] == history.val_loss[2]
    assert metrics["train_loss"] == pytest.approx(metrics["train_recon"] + metrics["train_kl"])


def test_same_seed_gives_identical_weights_and_losses_for_sparse_or_dense_input() -> None:
    X = _clustered()
    config = TrainConfig(epochs=3, seed=7)
    first, second, sparse_run = _module(), _module(), _module()
    h1 = train_vae(first, X[:150], X[150:], config, progress=False)
    h2 = train_vae(second, X[:150], X[150:], config, progress=False)
    h3 = train_vae(
        sparse_run, sp.csr_matrix(X[:150]), sp.csr_matrix(X[150:]), config, progress=False
    )
    assert h1 == h2 == h3
    assert _params_equal(first, second) and _params_equal(first, sparse_run)
    other = _module()
    h4 = train_vae(other, X[:150], X[150:], TrainConfig(epochs=3, seed=8), progress=False)
    assert h4.train_loss != h1.train_loss and not _params_equal(first, other)


def test_same_seed_gives_identical_weights_with_dropout_whatever_the_global_rng() -> None:
    """Dropout draws from torch's global generator: a seed must fix those draws too."""
    X = _clustered()
    config = TrainConfig(epochs=3, seed=7)
    runs = []
    for global_seed in (1, 2):
        torch.manual_seed(0)
        module = VAEModule(n_genes=30, hidden_dim=16, latent_dim=3, dropout=0.2)
        torch.manual_seed(global_seed)  # the caller's generator differs between the two runs
        runs.append((module, train_vae(module, X[:150], X[150:], config, progress=False)))
    (first, h1), (second, h2) = runs
    assert h1 == h2 and _params_equal(first, second)


def test_training_leaves_the_global_torch_rng_alone() -> None:
    X = _clustered()
    module = _module()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    train_vae(module, X[:150], X[150:], TrainConfig(epochs=1), progress=False)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("caller_flushes", [False, True])
def test_training_flushes_subnormals_and_gives_the_callers_setting_back(
    caller_flushes: bool,
) -> None:
    """Subnormal Adam moments (dead units' weights) slow a late epoch 2x; training flushes them,
    and the caller's own arithmetic is left as it was."""
    X = _clustered()
    session = melvae.train._flushing_subnormals()
    torch.set_flush_denormal(caller_flushes)
    try:
        during: list[bool] = []
        train_vae(
            _module(),
            X[:150],
            X[150:],
            TrainConfig(epochs=2),
            on_epoch=lambda epoch, metrics: during.append(melvae.train._flushing_subnormals()),
            progress=False,
        )
        assert during == [True, True]
        assert melvae.train._flushing_subnormals() is caller_flushes
        assert ((torch.full((1,), 1e-39) * 2).item() == 0.0) is caller_flushes
    finally:
        torch.set_flush_denormal(session)


TRAIN_UNDER_TWO_THREADS = """
import warnings, numpy as np, torch
from melvae.module import VAEModule
from melvae.train import TrainConfig, train_vae
torch.set_num_threads(2)
{before}
torch.manual_seed(0)
x = np.random.default_rng(0).random((40, 30), dtype=np.float32)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    train_vae(VAEModule(30, 16, 3), x[:30], x[30:], TrainConfig(epochs=1), progress=False)
a = torch.full((1 << 22,), 1 << 20, dtype=torch.int32).view(torch.float32) * 2
print(int((a != 0).sum()), sum("flush" in str(w.message) for w in caught))
"""


@pytest.mark.parametrize(
    ("before", "expected"),
    [
        # The command line sets it before torch starts its threads, which then inherit it.
        (
            "from melvae.study.__main__ import main; main(['best', '--study', 'missing.toml'])",
            "0 0",
        ),
        # Threads started first keep their own setting: training says so and what to do.
        ("torch.ones(1 << 22).mul_(2)", f"{1 << 22} 1"),
    ],
)
def test_under_several_threads_subnormals_flush_everywhere_or_training_warns(
    tmp_path, before: str, expected: str
) -> None:
    """Subnormal floats doubled after training: all flushed where every thread flushes; where
    torch's second thread was started first none is (the caller's setting is given back), and
    training warned."""
    done = subprocess.run(
        [sys.executable, "-c", TRAIN_UNDER_TWO_THREADS.format(before=before)],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
    )
    assert done.stdout.split("\n")[-2] == expected


def test_callback_sees_every_epoch_and_its_exceptions_propagate() -> None:
    X = _clustered()
    seen: list[tuple[int, dict[str, float]]] = []
    history = train_vae(
        _module(),
        X[:150],
        X[150:],
        TrainConfig(epochs=3, early_stopping_patience=None),
        on_epoch=lambda epoch, metrics: seen.append((epoch, metrics)),
        progress=False,
    )
    assert [e for e, _ in seen] == [0, 1, 2]
    assert [m for _, m in seen] == [history.epoch_metrics(i) for i in range(3)]

    class Pruned(Exception):
        pass

    def prune_at_epoch_one(epoch: int, metrics: dict[str, float]) -> None:
        if epoch == 1:
            raise Pruned

    calls = []
    with pytest.raises(Pruned):
        train_vae(
            _module(),
            X[:150],
            X[150:],
            TrainConfig(epochs=10),
            on_epoch=lambda e, m: (calls.append(e), prune_at_epoch_one(e, m)),
            progress=False,
        )
    assert calls == [0, 1]


def test_early_stopping_restores_the_weights_of_the_best_epoch() -> None:
    X = _clustered()
    module = VAEModule(n_genes=30, hidden_dim=64, latent_dim=3)
    config = TrainConfig(epochs=300, learning_rate=1e-2, early_stopping_patience=3, seed=1)
    # Eight training cells: the model overfits quickly and the validation loss turns up.
    history = train_vae(module, X[:8], X[100:], config, progress=False)
    assert history.stopped_early
    assert len(history.val_loss) == history.best_epoch + 1 + 3
    assert min(history.val_loss) == history.val_loss[history.best_epoch]
    restored = evaluate_loss(module, X[100:], kl_weight=config.kl_weight, seed=config.seed)
    assert restored["loss"] == pytest.approx(history.val_loss[history.best_epoch], rel=1e-6)


@pytest.mark.parametrize("hand_written", [True, False])
def test_the_loss_of_a_dropout_module_leaves_dropout_and_the_modules_mode_alone(
    hand_written: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not hand_written:
        monkeypatch.setattr(melvae.train, "plan_of", lambda module: None)
    X = _clustered()
    torch.manual_seed(0)
    module = VAEModule(n_genes=30, hidden_dim=16, latent_dim=3, dropout=0.5)
    module.train()
    in_training_mode = [evaluate_loss(module, X, seed=2) for _ in range(2)]
    assert module.training
    module.eval()
    assert in_training_mode == [evaluate_loss(module, X, seed=2)] * 2
    assert not module.training


def test_kl_warmup_ramps_the_training_weight_and_validation_uses_the_full_weight() -> None:
    X = _clustered()
    config = TrainConfig(epochs=5, kl_weight=2.0, kl_warmup_epochs=4, early_stopping_patience=None)
    history = train_vae(_module(), X[:150], X[150:], config, progress=False)
    for epoch, weight in enumerate([0.5, 1.0, 1.5, 2.0, 2.0]):
        assert config.kl_weight_at(epoch) == weight
        expected = history.train_recon[epoch] + weight * history.train_kl[epoch]
        assert history.train_loss[epoch] == pytest.approx(expected)
        full = history.val_recon[epoch] + 2.0 * history.val_kl[epoch]
        assert history.val_loss[epoch] == pytest.approx(full)


def test_nan_in_the_input_raises_non_finite_loss_error_naming_the_loss() -> None:
    X = _clustered()
    bad = X.copy()
    bad[3, 5] = np.nan
    with pytest.raises(NonFiniteLossError, match="training loss") as info:
        train_vae(_module(), bad[:150], X[150:], TrainConfig(epochs=2), progress=False)
    assert info.value.epoch == 0
    with pytest.raises(NonFiniteLossError, match="validation loss"):
        train_vae(_module(), X[:150], bad[:50], TrainConfig(epochs=2), progress=False)


def test_an_absurd_learning_rate_raises_non_finite_loss_error() -> None:
    X = _clustered()
    with pytest.raises(NonFiniteLossError, match="lower the learning rate"):
        train_vae(
            _module("gaussian"), X[:150], X[150:], TrainConfig(learning_rate=1e4), progress=False
        )


def test_bad_settings_and_shapes_are_input_errors() -> None:
    with pytest.raises(InputError, match="learning_rate"):
        TrainConfig(learning_rate=0)
    with pytest.raises(InputError, match="batch_size"):
        TrainConfig(batch_size=0)
    X = _clustered()
    with pytest.raises(InputError, match="30 genes"):
        train_vae(_module(), X[:, :20], X, TrainConfig(epochs=1), progress=False)
    with pytest.raises(InputError, match="val matrix"):
        train_vae(_module(), X, X[:0], TrainConfig(epochs=1), progress=False)


def test_the_history_survives_a_json_round_trip() -> None:
    X = _clustered()
    history = train_vae(_module(), X[:150], X[150:], TrainConfig(epochs=2), progress=False)
    assert History.from_dict(json.loads(json.dumps(history.to_dict()))) == history


def test_fused_adam_gives_exactly_torchs_fused_adam_updates() -> None:
    X = torch.from_numpy(_clustered())
    ours, theirs = _module(), _module()
    reference = torch.optim.Adam(theirs.parameters(), lr=3e-3, fused=True)
    optimizer = FusedAdam(ours.parameters(), lr=3e-3)
    for step in range(4):
        for module, opt in ((ours, optimizer), (theirs, reference)):
            opt.zero_grad()
            noise = torch.Generator().manual_seed(step)
            module.loss(X[step * 32 : (step + 1) * 32], generator=noise).total.backward()
            if step == 2:  # a parameter without a gradient is skipped and its step not counted
                next(module.parameters()).grad = None
            opt.step()
        assert _params_equal(ours, theirs)
