"""Training loop: Adam, KL warm-up, early stopping on validation loss, per-epoch callback.

Batches are cut from the (possibly sparse CSR) matrix on the fly, so only one batch is ever dense
(a sparse matrix small enough is made dense once, `melvae.data.loader.densified`); cells of a
backed file stay on disk and are read a window at a time (`melvae.data.backed`).
Runs are deterministic for a seed: shuffling and the reparameterisation noise come from private
generators seeded from `TrainConfig.seed`; dropout's draws from torch's global generator are
seeded from it too, and the caller's global generator state is restored afterwards.
The validation loss is the negative ELBO with the full `kl_weight` and the same noise every
epoch, so epochs compare without sampling noise or warm-up drift.

Speed: Adam runs fused (one kernel over all weights instead of a loop over tensors, `FusedAdam`,
without torch.optim's per-step bookkeeping), the KL term and the sample share one autograd node
(`melvae.losses.sample_and_kl`), losses are summed on the device, read back once per epoch
rather than once per batch, and the gene-facing layers lay out their products for the CPU's BLAS
(`melvae.layers.WideLinear`), so a step is the matrix products plus little else. Subnormal floats
are flushed to zero while training (`_subnormals_flushed`): Adam's moments of dead units' weights
otherwise halve the speed of every epoch after the first few dozen. The device
(`TrainConfig.device`) is chosen in `melvae.device.resolve_device` only.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from tqdm.auto import tqdm

from melvae.data.loader import Matrix, coded_batches, densified, epoch_order
from melvae.device import DEVICES, resolve_device
from melvae.errors import InputError
from melvae.fused import Plan, loss_sums, plan_of, train_step
from melvae.module import VAEModule
from melvae.params import PARAMS, names

logger = logging.getLogger(__name__)

METRIC_NAMES: tuple[str, ...] = (
    "train_loss",
    "val_loss",
    "train_recon",
    "train_kl",
    "val_recon",
    "val_kl",
    "epoch_seconds",
    "epoch_cpu_seconds",
)

EpochCallback = Callable[[int, dict[str, float]], None]


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings. `kl_warmup_epochs` > 0 ramps the KL weight linearly from
    kl_weight / kl_warmup_epochs to kl_weight; early stopping waits for the warm-up to end."""

    # The searchable settings: type, default and range declared once in melvae.params.
    epochs: int = PARAMS["epochs"].default
    batch_size: int = PARAMS["batch_size"].default
    learning_rate: float = PARAMS["learning_rate"].default
    kl_weight: float = PARAMS["kl_weight"].default
    kl_warmup_epochs: int = PARAMS["kl_warmup_epochs"].default
    early_stopping_patience: int | None = 10
    seed: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        for name in names("train"):
            PARAMS[name].check(getattr(self, name), where=f"TrainConfig {name}")
        problems = [
            f"{name}={getattr(self, name)}"
            for name, ok in [
                (
                    "early_stopping_patience",
                    self.early_stopping_patience is None or self.early_stopping_patience >= 1,
                ),
                ("device", self.device in DEVICES),
            ]
            if not ok
        ]
        if problems:
            raise InputError(
                f"invalid training settings: {', '.join(problems)}",
                where="TrainConfig",
                fix="early_stopping_patience must be >= 1 or None, "
                f"device one of {', '.join(DEVICES)}",
            )

    def kl_weight_at(self, epoch: int) -> float:
        """KL weight used for the training loss in `epoch` (0-based)."""
        if self.kl_warmup_epochs == 0:
            return self.kl_weight
        return self.kl_weight * min(1.0, (epoch + 1) / self.kl_warmup_epochs)


@dataclass
class History:
    """Per-epoch losses (0-based epochs; each value averaged over cells) and wall time."""

    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    train_recon: list[float] = field(default_factory=list)
    train_kl: list[float] = field(default_factory=list)
    val_recon: list[float] = field(default_factory=list)
    val_kl: list[float] = field(default_factory=list)
    # Wall and process CPU seconds per epoch (training + validation); CPU time shows the work
    # done even on a machine shared with other jobs. Machine-dependent, so not part of equality.
    epoch_seconds: list[float] = field(default_factory=list, compare=False)
    epoch_cpu_seconds: list[float] = field(default_factory=list, compare=False)
    best_epoch: int = -1
    stopped_early: bool = False

    def epoch_metrics(self, i: int) -> dict[str, float]:
        """The six losses and the wall and CPU time of epoch `i`, keyed by their names."""
        return {name: getattr(self, name)[i] for name in METRIC_NAMES}

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe representation."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> History:
        """Rebuild a History written by `to_dict`."""
        return cls(**d)


class FusedAdam:
    """Adam with torch's defaults (betas 0.9, 0.999, eps 1e-8), run as `torch.optim.Adam(...,
    fused=True)` runs it: the same fused kernel over all weights, so the same numbers.

    Fused, Adam takes ~3.6 ms a step for the original 9.2 M-weight model on two cores against
    ~29 ms for the per-tensor loop. What is left is torch.optim's per-step Python bookkeeping
    (grouping tensors by device, state look-ups), ~0.3 ms a step: measured 1.02 against 0.72 ms
    for the default study's 2,000-gene model, a tenth of its step; this class skips it.
    """

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],
        *,
        lr: float,
        scales: Mapping[torch.nn.Parameter, float] | None = None,
    ) -> None:
        """`scales`: parameters updated at a multiple of `lr` (the others at `lr` itself)."""
        self.params = list(params)
        self.lr = lr
        scales = scales or {}
        self.lrs = [lr * scales.get(p, 1.0) for p in self.params]
        self.one_rate = set(self.lrs) <= {lr}
        self.exp_avgs = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sqs = [torch.zeros_like(p) for p in self.params]
        # torch.optim.Adam's fused state: one float32 step counter per parameter, here the
        # entries of one tensor, so a step that updates every parameter counts in one call
        # (3 instead of 21 us for ten counters).
        device = self.params[0].device if self.params else None
        self.step_counts = torch.zeros(len(self.params), dtype=torch.float32, device=device)
        self.steps = list(self.step_counts.unbind())

    def zero_grad(self) -> None:
        """Drop every gradient (the next backward writes them afresh)."""
        for p in self.params:
            p.grad = None

    def step(self) -> None:
        """One Adam update of every parameter that has a gradient."""
        grads = [p.grad for p in self.params]
        if grads and self.one_rate and all(g is not None for g in grads):  # the fused path
            self.step_counts.add_(1)
            self._fused(self.params, self.exp_avgs, self.exp_avg_sqs, self.steps, self.lr, grads)
            return
        have = [i for i, g in enumerate(grads) if g is not None]
        if not have:
            return
        lists = (self.params, self.exp_avgs, self.exp_avg_sqs, self.steps)
        params, exp_avgs, exp_avg_sqs, steps = ([values[i] for i in have] for values in lists)
        if len(have) == len(self.params):
            self.step_counts.add_(1)
        else:
            torch._foreach_add_(steps, 1)
        rates = [self.lrs[i] for i in have]
        if len(set(rates)) == 1:  # the common case: one fused call over every weight
            self._fused(params, exp_avgs, exp_avg_sqs, steps, rates[0])
            return
        for lr in dict.fromkeys(rates):  # one fused call per learning rate
            group = [j for j, rate in enumerate(rates) if rate == lr]
            chosen = (
                [values[j] for j in group] for values in (params, exp_avgs, exp_avg_sqs, steps)
            )
            self._fused(*chosen, lr)

    @staticmethod
    def _fused(
        params: list[torch.Tensor],
        exp_avgs: list[torch.Tensor],
        exp_avg_sqs: list[torch.Tensor],
        steps: list[torch.Tensor],
        lr: float,
        grads: list[torch.Tensor] | None = None,
    ) -> None:
        """torch's fused Adam kernel over `params` at learning rate `lr` (`grads`: their
        `.grad` tensors, where the caller has them at hand)."""
        torch._fused_adam_(
            params,
            [p.grad for p in params] if grads is None else grads,
            exp_avgs,
            exp_avg_sqs,
            [],
            steps,
            amsgrad=False,
            lr=lr,
            beta1=0.9,
            beta2=0.999,
            weight_decay=0.0,
            eps=1e-8,
            maximize=False,
            grad_scale=None,
            found_inf=None,
        )


class NonFiniteLossError(RuntimeError):
    """A loss became NaN or infinite (diverged training or NaN/inf in the input)."""

    def __init__(self, epoch: int, which: str, parts: dict[str, float]) -> None:
        self.epoch = epoch
        self.which = which
        values = ", ".join(f"{k}={v}" for k, v in parts.items())
        super().__init__(
            f"{which} loss is not finite in epoch {epoch} ({values}); lower the learning rate "
            "or check the input for NaN/inf values"
        )


def evaluate_loss(
    module: VAEModule,
    x: Matrix,
    *,
    kl_weight: float = 1.0,
    seed: int = 0,
    batch_size: int = 1024,
    batch_codes: np.ndarray | None = None,
) -> dict[str, float]:
    """Negative ELBO of `x` averaged over cells: {"loss", "recon", "kl"}.

    Uses noise from a generator seeded with `seed`, so the same weights give the same value.
    Runs on the module's device. `batch_codes`: each cell's batch code, for a module
    conditioned on the batch.
    """
    return _loss_per_cell(
        module,
        plan_of(module),  # the hand-written loss where it covers the module
        x,
        kl_weight=kl_weight,
        seed=seed,
        batch_size=batch_size,
        batch_codes=batch_codes,
    )


def _loss_per_cell(
    module: VAEModule,
    plan: Plan | None,
    x: Matrix,
    *,
    kl_weight: float,
    seed: int,
    batch_size: int,
    batch_codes: np.ndarray | None,
) -> dict[str, float]:
    """`evaluate_loss` given the module's `plan_of` (None: the plain path), which the training
    loop works out once a run rather than twice an epoch. The hand-written loss is told to leave
    dropout out, so only the plain path switches the module to evaluation mode and back (the two
    walks over its layers and `plan_of` were ~0.1 ms of a 26 ms epoch at 765 genes)."""
    device = _device_of(module)
    generator = torch.Generator(device=device).manual_seed(seed)
    sums = _Sums()
    cut = coded_batches(x, batch_codes, batch_size, device=device)
    with torch.no_grad():
        if plan is not None:
            for xb, _ in cut:
                sums.add(*loss_sums(module, plan, xb, generator, training=False))
        else:
            was_training = module.training
            module.eval()
            try:
                for xb, bb in cut:
                    parts = module.loss(xb, kl_weight, generator=generator, batch=bb)
                    sums.add_means(parts.recon, parts.kl, len(xb))
            finally:
                module.train(was_training)
    return sums.per_cell(kl_weight, x.shape[0])


class _Sums:
    """A pass's reconstruction and KL terms, batch by batch, kept on the device and added up
    once at the end: no call per batch beyond the loss's own, and one host sync a pass."""

    def __init__(self) -> None:
        self.recon: list[torch.Tensor] = []
        self.kl: list[torch.Tensor] = []

    def add(self, recon: torch.Tensor, kl: torch.Tensor) -> None:
        """A batch's terms, each summed over its cells."""
        self.recon.append(recon)
        self.kl.append(kl)

    def add_means(self, recon: torch.Tensor, kl: torch.Tensor, n_cells: int) -> None:
        """A batch's terms, each averaged over its `n_cells` cells."""
        self.add(recon.detach() * n_cells, kl.detach() * n_cells)

    def per_cell(self, kl_weight: float, n_cells: int) -> dict[str, float]:
        """{"loss", "recon", "kl"} averaged over the pass's `n_cells` cells, the loss being
        recon + kl_weight * kl."""
        recon, kl = (torch.stack(terms).double().sum() for terms in (self.recon, self.kl))
        totals = torch.stack([recon + kl_weight * kl, recon, kl]) / n_cells
        return dict(zip(("loss", "recon", "kl"), totals.tolist(), strict=True))


def _device_of(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def train_vae(
    module: VAEModule,
    train_x: Matrix,
    val_x: Matrix,
    config: TrainConfig,
    *,
    on_epoch: EpochCallback | None = None,
    progress: bool = True,
    eval_batch_size: int = 1024,
    train_batches: np.ndarray | None = None,
    val_batches: np.ndarray | None = None,
) -> History:
    """Train `module` in place with Adam on `config.device`; return the loss history.

    After each epoch `on_epoch(epoch, metrics)` is called with the six losses; exceptions it raises
    (e.g. optuna.TrialPruned) propagate. Training stops after `early_stopping_patience` epochs
    without a lower validation loss, and the weights of the best epoch are restored at the end,
    also when training is interrupted by an exception. A NaN/inf loss raises NonFiniteLossError.
    `train_batches`, `val_batches`: each cell's batch code (int64), for a module conditioned on
    the batch (None without).
    """
    train_x, val_x = (
        densified(_checked(module, x, name)) for x, name in [(train_x, "train"), (val_x, "val")]
    )
    device = resolve_device(config.device)
    module.to(device)
    order_rng = np.random.default_rng(config.seed)
    noise = torch.Generator(device=device).manual_seed(config.seed)
    optimizer = FusedAdam(
        module.parameters(), lr=config.learning_rate, scales=module.learning_rate_scales()
    )
    plan = plan_of(module)  # None for a batch-conditioned module
    history = History()
    best_state: dict[str, torch.Tensor] | None = None
    epochs_since_best = 0
    bar = tqdm(  # leave=None: stays as the only bar, vanishes under the study's trial bar
        range(config.epochs),
        desc="training",
        unit="epoch",
        leave=None,
        disable=None if progress else True,
    )
    with _seeded_global_rng(config.seed, device), _subnormals_flushed():
        try:
            for epoch in bar:
                started, cpu_started = time.perf_counter(), time.process_time()
                train = _train_epoch(
                    module, plan, optimizer, train_x, config, epoch, order_rng, noise, train_batches
                )
                val = _loss_per_cell(
                    module,
                    plan,
                    val_x,
                    kl_weight=config.kl_weight,
                    seed=config.seed,
                    batch_size=eval_batch_size,
                    batch_codes=val_batches,
                )
                if not math.isfinite(val["loss"]):
                    raise NonFiniteLossError(epoch, "validation", val)
                for prefix, parts in (("train", train), ("val", val)):
                    getattr(history, f"{prefix}_loss").append(parts["loss"])
                    getattr(history, f"{prefix}_recon").append(parts["recon"])
                    getattr(history, f"{prefix}_kl").append(parts["kl"])
                history.epoch_seconds.append(time.perf_counter() - started)
                history.epoch_cpu_seconds.append(time.process_time() - cpu_started)
                if history.best_epoch < 0 or val["loss"] < history.val_loss[history.best_epoch]:
                    history.best_epoch = epoch
                    best_state = _kept(module, best_state)
                    epochs_since_best = 0
                else:
                    epochs_since_best += 1
                metrics = history.epoch_metrics(epoch)
                bar.set_postfix(train=f"{train['loss']:.4g}", val=f"{val['loss']:.4g}")
                logger.debug("epoch %d: %s", epoch, metrics)
                if on_epoch is not None:
                    on_epoch(epoch, metrics)
                patience = config.early_stopping_patience
                warmed_up = epoch + 1 >= config.kl_warmup_epochs
                if patience is not None and warmed_up and epochs_since_best >= patience:
                    history.stopped_early = True
                    logger.info(
                        "early stop after epoch %d; best epoch %d", epoch, history.best_epoch
                    )
                    break
        finally:
            bar.close()
            if best_state is not None:
                module.load_state_dict(best_state)
    return history


def _kept(module: torch.nn.Module, kept: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """A copy of `module`'s state, written into `kept` (the previous copy) where there is one:
    no new memory for every better epoch."""
    state = module.state_dict()
    if kept is None:
        return {k: v.detach().clone() for k, v in state.items()}
    torch._foreach_copy_(list(kept.values()), list(state.values()))  # one call, not one a tensor
    return kept


# Elements per piece of an element-wise operation that torch splits over its intra-op threads
# (at::internal::GRAIN_SIZE): an operation on this many per thread reaches every thread.
PARALLEL_GRAIN = 32768
UNFLUSHED_THREADS = (
    "torch's intra-op threads were started before training and do not flush subnormal floats, "
    "so epochs can get up to 2x slower once dead units' Adam moments turn subnormal (after ~750 "
    "steps); call torch.set_flush_denormal(True) before the session's first torch operation "
    "(the command line does), or train with torch.set_num_threads(1)"
)


def _flushing_subnormals(threads: int = 1) -> bool:
    """Whether CPU arithmetic treats subnormal floats as zero (`torch.set_flush_denormal`), read
    from the arithmetic itself (torch has no getter): on this thread, or with `threads` > 1 on
    every one of that many intra-op threads, each of which keeps its own setting."""
    size = PARALLEL_GRAIN * threads if threads > 1 else 1
    # 2**-129 written as its bits: a float written on this thread would be flushed already.
    subnormal = torch.full((size,), 1 << 20, dtype=torch.int32).view(torch.float32)
    return int((subnormal * 2).count_nonzero()) == 0


@contextlib.contextmanager
def _subnormals_flushed() -> Iterator[None]:
    """CPU arithmetic on this thread (and threads it starts) flushes subnormal floats to zero for
    the block, then is put back as it was.

    Why: Adam's first moment of a weight whose gradient stays exactly zero (the weights of a dead
    ReLU unit) shrinks by 0.9 a step and reaches the subnormal range (< 1.2e-38) after ~750
    steps, where every operation on it takes a microcode assist. On the PBMC fallback (765
    genes, hidden 512, batch 32) an epoch then took 72 instead of 35 ms from epoch ~40 on, with
    246,316 such moments, and 200 epochs 13.0 instead of 7.0 s (`bench/subnormals.py`).
    Flushed, those moments are zero, which changes no weight by more than ~1e-33 a step (the
    same losses to every printed digit there). torch's intra-op threads started before the block
    keep their own setting: one thread a trial (`--workers auto` for a small model) is covered
    whole; for more threads the CLI flushes for its whole process before torch starts any, and
    elsewhere a RuntimeWarning (`UNFLUSHED_THREADS`) says what to do where threads do not.
    """
    was = _flushing_subnormals()
    supported = torch.set_flush_denormal(True)  # False where the CPU has no such mode
    threads = torch.get_num_threads()
    if supported and threads > 1 and not _flushing_subnormals(threads):
        warnings.warn(UNFLUSHED_THREADS, RuntimeWarning, stacklevel=3)
    try:
        yield
    finally:
        torch.set_flush_denormal(was)


@contextlib.contextmanager
def _seeded_global_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch's global generator, from which dropout draws, for one training run, and give
    the caller's generator state back afterwards: a seed then gives the same weights."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def _train_epoch(
    module: VAEModule,
    plan: Plan | None,
    optimizer: FusedAdam,
    x: Matrix,
    config: TrainConfig,
    epoch: int,
    order_rng: np.random.Generator,
    noise: torch.Generator,
    codes: np.ndarray | None = None,
) -> dict[str, float]:
    """One pass over `x` in a fresh random order; losses averaged over cells. `plan`: the
    module's `plan_of` (None: the plain autograd path). `codes`: each cell's batch code, cut
    into the same minibatches.

    Loss sums stay on the device (no per-batch host sync); a non-finite loss in any batch makes
    the epoch's sum non-finite and raises once the epoch ends (the best weights are restored).
    """
    kl_weight = config.kl_weight_at(epoch)
    module.train()
    device = _device_of(module)
    sums = _Sums()
    order = epoch_order(x, order_rng)
    for xb, bb in coded_batches(x, codes, config.batch_size, order=order, device=device):
        if plan is None:
            parts = module.loss(xb, kl_weight, generator=noise, batch=bb)
            optimizer.zero_grad()
            parts.total.backward()
            sums.add_means(parts.recon, parts.kl, len(xb))
        else:  # the common architecture: loss and gradients by hand, no autograd graph
            sums.add(*train_step(module, plan, xb, kl_weight, noise))
        optimizer.step()
    result = sums.per_cell(kl_weight, x.shape[0])
    if not all(map(math.isfinite, result.values())):
        raise NonFiniteLossError(epoch, "training", result)
    return result


def _checked(module: VAEModule, x: Matrix | sp.spmatrix, name: str) -> Matrix:
    """`x` as CSR (if sparse) after checking it is non-empty and has the module's gene count."""
    n_genes = module.encoder[0].in_features
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] != n_genes:
        raise InputError(
            f"{name} matrix has shape {x.shape}, expected (cells >= 1, {n_genes} genes)",
            where=f"train_vae({name}_x)",
            fix="pass the preprocessed matrix aligned to the model's genes, with at least one cell",
        )
    return sp.csr_matrix(x) if sp.issparse(x) else x
