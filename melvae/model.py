"""User-facing model: fit on AnnData, encode/embed/decode/reconstruct new cells, save and load.

A MelVAE carries everything needed to apply it to new data: the fitted Preprocessor (gene list
and training-split statistics), the torch module, and the hyperparameters it was built with.
New data are aligned to the model's genes by name before the fitted transform is applied.

A model fitted with a `batch_key` is conditioned on each cell's batch (patient, sample; see
`melvae.module`) and keeps the batch names it trained on. With the default decoder-only
conditioning, `encode` needs no batch, so cells of a patient the model never saw encode like any
others; decoding needs a batch it knows: the cells' own, or one named by `transform_batch`.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import torch

from melvae import params
from melvae.adversary import label_codes
from melvae.data.loader import coded_batches, dense, row_sums
from melvae.data.validate import validate_batches
from melvae.errors import InputError
from melvae.folder_swap import recover, replacing
from melvae.likelihoods import LikelihoodName, check_pair, get_likelihood
from melvae.module import VAEModule
from melvae.preprocess import (
    Matrix,
    PreprocessConfig,
    Preprocessor,
    align_genes,
    fit_preprocessor,
)
from melvae.train import EpochCallback, History, TrainConfig, train_vae

logger = logging.getLogger(__name__)

MODEL_FILE = "melvae.json"
WEIGHTS_FILE = "weights.pt"
FORMAT_VERSION = 1


class MelVAE:
    """A fitted VAE together with its preprocessing; build with `MelVAE.fit` or `MelVAE.load`.

    Parameters
    ----------
    module
        The torch module (`melvae.module.VAEModule`).
    preprocessor
        The fitted preprocessing: gene list and training-split statistics.
    hyperparameters
        What the module was built with (`melvae.params`), as stored in `melvae.json`.
    label_key, label_names
        The obs column of cell-type labels it was trained next to, and the labels seen.
    batch_key, batch_names
        The obs column of each cell's batch the module is conditioned on (None: none), and the
        batches it was trained on, in the order of their codes.
    library_size
        Median total counts of the training cells (for likelihoods that decode counts).
    history
        Per-epoch losses of training.
    origin
        Where the training cells came from, as a study records it: dataset key, label key,
        split seed and fractions, preprocessing settings (None for a model fitted by hand).

    Examples
    --------
    >>> model = MelVAE.fit(train, val, latent_dim=5, activation="gelu")  # doctest: +SKIP
    >>> model.embed(adata).obsm["X_melvae"].shape  # doctest: +SKIP
    (700, 5)
    >>> MelVAE.load(model.save("my_model")).genes == model.genes  # doctest: +SKIP
    True
    """

    def __init__(
        self,
        module: VAEModule,
        preprocessor: Preprocessor,
        *,
        hyperparameters: dict[str, Any],
        label_key: str | None = None,
        label_names: list[str] | None = None,
        batch_key: str | None = None,
        batch_names: list[str] | None = None,
        library_size: float | None = None,
        history: History | None = None,
        origin: dict[str, Any] | None = None,
    ) -> None:
        self.module = module
        self.preprocessor = preprocessor
        self.hyperparameters = hyperparameters
        self.label_key = label_key
        self.label_names = list(label_names or [])
        self.batch_key = batch_key
        self.batch_names = list(batch_names or [])
        self.library_size = library_size
        self.history = history
        self.origin = origin

    @property
    def genes(self) -> list[str]:
        """The model's input genes, in order."""
        return self.preprocessor.genes

    def __repr__(self) -> str:
        hp = self.hyperparameters
        return (
            f"MelVAE(genes={len(self.genes)}, hidden_dim={hp['hidden_dim']}, "
            f"latent_dim={hp['latent_dim']}, likelihood={hp['likelihood']!r}, "
            f"transform={self.preprocessor.transform!r})"
        )

    @classmethod
    def fit(
        cls,
        train_cells: ad.AnnData,
        val_cells: ad.AnnData,
        /,
        *,
        preprocess: PreprocessConfig | Preprocessor | None = None,
        likelihood: LikelihoodName = "bernoulli",
        train: TrainConfig | None = None,
        label_key: str | None = None,
        batch_key: str | None = None,
        on_epoch: EpochCallback | None = None,
        progress: bool = True,
        origin: dict[str, Any] | None = None,
        **architecture: Any,
    ) -> MelVAE:
        """Fit the preprocessor on the training cells only (unless one is given), then train.

        Parameters
        ----------
        train_cells, val_cells
            Cells x genes (positional-only, so that `train=` can name the TrainConfig).
            `val_cells` drive early stopping and the reported validation loss; they never
            influence the preprocessing. AnnData opened backed (`anndata.read_h5ad(path,
            backed="r")`, or views of its rows) stay on disk and are read a window at a time
            (`melvae.data.backed`).
        preprocess
            A PreprocessConfig to fit on `train_cells`, or an already fitted Preprocessor.
        likelihood
            The decoder's likelihood: "bernoulli" (min-max data), "gaussian" or
            "negative_binomial" (raw counts).
        train
            Optimisation settings (epochs, batch size, learning rate, KL weight and warm-up,
            early stopping, seed, device); default `TrainConfig()`.
        label_key
            An obs column of cell-type labels kept with the model (None: none).
        batch_key
            An obs column naming each cell's batch (patient, sample): the module is conditioned
            on it (`batch_conditioning` says where) and keeps the training cells' batch names;
            every validation cell must belong to one of them. None: no batch covariate.
        on_epoch
            Called as `on_epoch(epoch, metrics)` after every epoch.
        progress
            Show a progress bar.
        origin
            Where the cells came from (JSON-safe), kept in `melvae.json`; a study sets it.
        **architecture
            The module's hyperparameters, declared in `melvae.params`; each is listed below.
        {architecture}

        Returns
        -------
        MelVAE
            The trained model, with its `history`.

        Examples
        --------
        >>> model = MelVAE.fit(train, val, hidden_dim=64, latent_dim=5)  # doctest: +SKIP
        >>> model.encode(test).shape  # doctest: +SKIP
        (120, 5)
        """
        preprocess = PreprocessConfig() if preprocess is None else preprocess
        training = TrainConfig() if train is None else train
        if isinstance(preprocess, Preprocessor):
            preprocessor, preprocess_config = preprocess, None
        else:
            preprocessor = fit_preprocessor(train_cells, preprocess)
            preprocess_config = asdict(preprocess)
        check_pair(
            likelihood, preprocessor.transform, where="MelVAE.fit(likelihood=..., preprocess=...)"
        )
        hyperparameters = {
            "n_genes": len(preprocessor.genes),
            **params.module_values(architecture, where="MelVAE.fit"),
            "likelihood": likelihood,
            "training": asdict(training),
            "preprocess": preprocess_config,
        }
        batch_names = _batch_names(train_cells, batch_key, label_key)
        label_names = _label_names(train_cells, label_key)
        model = cls(
            _new_module(
                hyperparameters,
                seed=training.seed,
                n_batches=len(batch_names),
                n_labels=len(label_names),
            ),
            preprocessor,
            hyperparameters=hyperparameters,
            label_key=label_key,
            label_names=label_names,
            batch_key=batch_key,
            batch_names=batch_names,
            origin=origin,
        )
        train_x = model._prepare(train_cells, "training cells")
        val_x = model._prepare(val_cells, "validation cells")
        if get_likelihood(likelihood, where="MelVAE.fit").uses_library:
            model.library_size = float(np.median(row_sums(train_x)))
        model.history = train_vae(
            model.module,
            train_x,
            val_x,
            training,
            on_epoch=on_epoch,
            progress=progress,
            train_batches=model._training_codes(train_cells, "training cells"),
            val_batches=model._training_codes(val_cells, "validation cells"),
        )
        return model

    def _training_codes(self, adata: ad.AnnData, what: str) -> np.ndarray | None:
        """The per-cell codes training gives the module: the batch codes, with the label codes
        as a second column for an adversary that reads labels (`melvae.adversary`)."""
        codes = self.batch_codes(adata, what=what)
        if not self.module.reads_labels:
            return codes
        labels = label_codes(adata.obs[self.label_key].to_numpy(), self.label_names)
        return np.column_stack([codes, labels])

    def batch_codes(
        self,
        adata: ad.AnnData,
        *,
        transform_batch: str | None = None,
        what: str = "input cells",
    ) -> np.ndarray | None:
        """Each cell's batch code (the index of its batch in `batch_names`), None for a model
        without a batch covariate.

        `transform_batch` (one of `batch_names`) gives every cell that batch instead of its
        own; otherwise each cell's batch is read from `adata.obs[batch_key]` and must be one the
        model was trained on (an InputError names the others).
        """
        if transform_batch is not None or self.batch_key is None:
            index = self._batch_index(transform_batch, what)
            return None if index is None else np.full(adata.n_obs, index, dtype=np.int64)
        known = f"the model's batches ({', '.join(map(repr, self.batch_names))})"
        if self.batch_key not in adata.obs:
            raise InputError(
                f"the cells have no obs column {self.batch_key!r}, the batch each cell came "
                "from, which this model decodes with",
                where=f"{what}, obs columns",
                fix=f"add obs[{self.batch_key!r}] naming one of {known} per cell, or pass "
                "transform_batch= to decode every cell as one of them",
            )
        names = adata.obs[self.batch_key].astype(str).to_numpy()
        codes = pd.Categorical(names, categories=self.batch_names).codes.astype(np.int64)
        unseen = pd.unique(names[codes < 0])
        if len(unseen):
            raise InputError(
                f"{int((codes < 0).sum())} cell(s) belong to {len(unseen)} batch(es) the model "
                f"never saw: {', '.join(map(repr, unseen[:5]))}",
                where=f"{what}, obs column {self.batch_key!r}",
                fix=f"decode them as one of {known} with transform_batch=...; a model with "
                "batch_conditioning = 'decoder' (the default) encodes them without a batch",
            )
        return codes

    def _batch_index(self, transform_batch: str | None, what: str) -> int | None:
        """The code of batch `transform_batch` (None: none asked for); an InputError where the
        model has no batch covariate to decode as, or no such batch."""
        if transform_batch is None:
            return None
        if self.batch_key is None:
            raise InputError(
                f"transform_batch={transform_batch!r}, but this model has no batch covariate",
                where=what,
                fix="leave transform_batch unset for a model fitted without batch_key",
            )
        if transform_batch not in self.batch_names:
            raise InputError(
                f"transform_batch={transform_batch!r} is not one of the model's batches "
                f"({', '.join(map(repr, self.batch_names))})",
                where=what,
                fix="name one of the batches the model was trained on",
            )
        return self.batch_names.index(transform_batch)

    def _prepare(self, adata: ad.AnnData, what: str = "input cells") -> Matrix:
        """Align `adata` to the model's genes by name and apply the fitted transform."""
        X, n_missing = align_genes(adata, self.genes)
        if n_missing:
            logger.warning(
                "%s: %d of the model's %d genes are missing and were filled with zeros",
                what,
                n_missing,
                len(self.genes),
            )
        return self.preprocessor.transform_matrix(X)

    def _predict(
        self,
        fn: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor],
        x: Matrix,
        batch_size: int,
        codes: np.ndarray | None = None,
    ) -> np.ndarray:
        """`fn(rows, their batch codes)` over batches of `x` on the module's device (where it
        was trained); numpy out."""
        self.module.eval()
        device = self.device
        with torch.no_grad():
            out = [
                fn(xb, bb).cpu().numpy()
                for xb, bb in coded_batches(x, codes, batch_size, device=device)
            ]
            if not out:  # no cells: still return the right number of columns
                none = None if codes is None else torch.zeros(0, dtype=torch.int64, device=device)
                return fn(torch.zeros((0, x.shape[1]), device=device), none).cpu().numpy()
        return np.concatenate(out)

    @property
    def device(self) -> torch.device:
        """Where the module's weights live: the training device, CPU after `load`."""
        return next(self.module.parameters()).device

    def encode(self, adata: ad.AnnData, *, batch_size: int = 1024) -> np.ndarray:
        """Latent means (cells x latent_dim) for the cells of `adata`, genes matched by name.

        Needs no batch unless the encoder is conditioned too (`batch_conditioning =
        "encoder_decoder"`): cells of a patient the model never saw encode as any others.
        """
        codes = self.batch_codes(adata) if self.module.encoder_conditioned else None
        return self._predict(
            lambda xb, bb: self.module.encode(xb, bb)[0], self._prepare(adata), batch_size, codes
        )

    def embed(self, adata: ad.AnnData, key: str = "X_melvae") -> ad.AnnData:
        """Write the latent means to `adata.obsm[key]` and return `adata`."""
        adata.obsm[key] = self.encode(adata)
        return adata

    def decode(
        self,
        latent: np.ndarray,
        *,
        library_size: float | None = None,
        batch_size: int = 1024,
        transform_batch: str | None = None,
    ) -> np.ndarray:
        """Expected expression (in the transformed space) for latent codes.

        For negative_binomial this is counts at `library_size` total counts per cell (default:
        the median of the training cells). A model with a batch covariate decodes every code as
        the batch `transform_batch` (required there: one of `batch_names`).
        """
        latent = np.asarray(latent, dtype=np.float32)
        latent_dim = self.hyperparameters["latent_dim"]
        if latent.ndim != 2 or latent.shape[1] != latent_dim:
            raise InputError(
                f"latent array has shape {latent.shape}, expected (cells, {latent_dim})",
                where="MelVAE.decode",
                fix="pass an array like the output of MelVAE.encode",
            )
        if self.batch_key is not None and transform_batch is None:
            raise InputError(
                "this model decodes as a batch: name one with transform_batch=",
                where="MelVAE.decode",
                fix=f"pass transform_batch= one of {', '.join(map(repr, self.batch_names))}",
            )
        index = self._batch_index(transform_batch, "MelVAE.decode")
        codes = None if index is None else np.full(len(latent), index, dtype=np.int64)
        size = self.library_size if library_size is None else library_size
        library = None if size is None else torch.tensor([[size]], device=self.device)
        return self._predict(
            lambda z, bb: self.module.decode_mean(z, library=library, batch=bb),
            latent,
            batch_size,
            codes,
        )

    def reconstruct(
        self, adata: ad.AnnData, *, batch_size: int = 1024, transform_batch: str | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(transformed input, reconstruction from the latent mean), both dense cells x genes.

        A model with a batch covariate decodes each cell as its own batch (`obs[batch_key]`,
        one the model knows), or every cell as `transform_batch`.
        """
        _, x, x_hat = self.encode_and_reconstruct(
            adata, batch_size=batch_size, transform_batch=transform_batch
        )
        return x, x_hat

    def encode_and_reconstruct(
        self, adata: ad.AnnData, *, batch_size: int = 1024, transform_batch: str | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(latent means, transformed input, reconstruction) in one pass over the cells: what
        `encode` and `reconstruct` give, for the cost of one."""
        fixed = self._batch_index(transform_batch, "encode_and_reconstruct(transform_batch=)")
        if fixed is None:
            codes = self.batch_codes(adata)
        else:  # decoded as one batch; a conditioned encoder reads the cells' own
            codes = self.batch_codes(adata) if self.module.encoder_conditioned else None
        x = self._prepare(adata)
        latent_dim = self.hyperparameters["latent_dim"]

        def both(xb: torch.Tensor, bb: torch.Tensor | None) -> torch.Tensor:
            mu, _ = self.module.encode(xb, bb)
            library = xb.sum(dim=-1, keepdim=True)
            if fixed is not None:
                bb = torch.full((len(xb),), fixed, dtype=torch.int64, device=xb.device)
            return torch.cat([mu, self.module.decode_mean(mu, library, bb)], dim=1)

        out = self._predict(both, x, batch_size, codes)
        return out[:, :latent_dim], dense(x), out[:, latent_dim:]

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write weights and JSON metadata to `directory` atomically; return the directory.

        Files are written to a temporary sibling directory that is renamed into place, so
        `directory` never holds a half-written model. An existing saved model (its two files and
        nothing else) is replaced; any other non-empty directory, including a model folder a user
        added files to (the swap would delete them), is refused.
        """
        directory = Path(directory)
        recover(directory)  # a save killed mid-swap: the previous model is put back first
        if directory.is_file() or (directory.exists() and any(directory.iterdir())):
            held = set() if directory.is_file() else {p.name for p in directory.iterdir()}
            if MODEL_FILE not in held or not held <= {MODEL_FILE, WEIGHTS_FILE}:
                foreign = sorted(held - {MODEL_FILE, WEIGHTS_FILE})
                raise InputError(
                    "refusing to overwrite a path that is not a saved melvae model"
                    + (f" (it also holds {', '.join(foreign[:5])})" if foreign else ""),
                    where=str(directory),
                    fix="choose a new or empty directory, or move those files out first",
                )
        with replacing(directory) as staging:
            # CPU tensors: the file reads the same on any machine, whatever device trained it.
            weights = {name: t.detach().cpu() for name, t in self.module.state_dict().items()}
            torch.save(weights, staging / WEIGHTS_FILE)
            (staging / MODEL_FILE).write_text(json.dumps(self._metadata(), indent=1))
        return directory

    def _metadata(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "hyperparameters": self.hyperparameters,
            "preprocessor": self.preprocessor.to_dict(),
            "label_key": self.label_key,
            "label_names": self.label_names,
            "batch_key": self.batch_key,
            "batch_names": self.batch_names,
            "library_size": self.library_size,
            "history": None if self.history is None else self.history.to_dict(),
            "origin": self.origin,
        }

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> MelVAE:
        """Load a model written by `save`.

        Every way the folder can be damaged (missing or truncated files, invalid JSON, missing
        keys, weights of the wrong shape, anything but plain tensors in the weights file) is an
        InputError naming the file and what is wrong; nothing is ever unpickled.
        """
        directory = Path(directory)
        if not directory.is_dir():
            raise InputError(
                f"cannot read a saved melvae model: {directory} is not a folder",
                where=str(directory),
                fix="pass a directory written by MelVAE.save",
            )
        meta = _read_metadata(directory / MODEL_FILE)
        weights_file = directory / WEIGHTS_FILE
        state = _read_weights(weights_file)
        try:
            hyperparameters = meta["hyperparameters"]
            batch_names = list(meta.get("batch_names") or [])
            module = _new_module(
                hyperparameters,
                seed=0,
                n_batches=len(batch_names),
                n_labels=len(meta.get("label_names") or []),
            )
            preprocessor = Preprocessor.from_dict(meta["preprocessor"])
            history = meta.get("history")
            history = None if history is None else History.from_dict(history)
        except (KeyError, TypeError, ValueError) as err:
            raise _damaged(directory / MODEL_FILE, f"missing or invalid entry {err}") from None
        try:
            module.load_state_dict(state)
        except RuntimeError as err:
            # torch lists every missing key and shape mismatch; its first lines say enough.
            detail = " ".join(str(err).split())[:400]
            what = f"weights do not fit the model's shape: {detail}"
            raise _damaged(weights_file, what) from None
        return cls(
            module,
            preprocessor,
            hyperparameters=hyperparameters,
            label_key=meta.get("label_key"),
            label_names=meta.get("label_names"),
            batch_key=meta.get("batch_key"),
            batch_names=batch_names,
            library_size=meta.get("library_size"),
            history=history,
            origin=meta.get("origin"),
        )


def _damaged(path: Path, what: str) -> InputError:
    return InputError(
        f"damaged saved model: {what}",
        where=str(path),
        fix="save the model again with MelVAE.save (or load the registered version with "
        "melvae.load_model); the folder is not a complete model written by melvae",
    )


def _read_metadata(path: Path) -> dict[str, Any]:
    """The parsed `melvae.json`, checked for the format version this melvae reads."""
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise _damaged(path, "the file is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _damaged(path, f"not readable JSON ({err})") from None
    if not isinstance(meta, dict):
        raise _damaged(path, f"expected a JSON object, found {type(meta).__name__}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise InputError(
            f"unsupported model format {meta.get('format_version')!r}",
            where=str(path),
            fix=f"load it with the melvae version that wrote it (this reads {FORMAT_VERSION})",
        )
    return meta


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of `weights.pt`, read with torch's weights-only loader (never unpickled)."""
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except FileNotFoundError:
        raise _damaged(path, "the file is missing") from None
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as err:
        # torch's own message suggests weights_only=False, i.e. running the file's pickled code.
        reason = str(err).split("\n")[0].split(". ")[0] or f"{type(err).__name__}, empty file?"
        if "weights_only" in str(err) or "Unsupported global" in str(err):
            reason = "it holds pickled Python objects, not only tensors"
        raise _damaged(path, f"not a weights file melvae can read safely: {reason}") from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise _damaged(path, "expected a mapping of parameter names to tensors")
    return state


def _new_module(
    hyperparameters: dict[str, Any], *, seed: int, n_batches: int = 0, n_labels: int = 0
) -> VAEModule:
    """Build the module (conditioned on `n_batches` batches, 0: none; `n_labels` labels for an
    adversary that reads them) with weights initialised from `seed`, leaving the global RNG
    untouched."""
    # A model saved before a module parameter existed gets its default (the original layer).
    architecture = params.module_values(params.select(hyperparameters, "module"), where=MODEL_FILE)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return VAEModule(
            hyperparameters["n_genes"],
            architecture.pop("hidden_dim"),
            architecture.pop("latent_dim"),
            hyperparameters["likelihood"],
            n_batches,
            n_labels,
            **architecture,
        )


def _label_names(adata: ad.AnnData, label_key: str | None) -> list[str]:
    """Sorted distinct non-missing labels of the training cells ([] without a label key)."""
    if label_key is None:
        return []
    if label_key not in adata.obs:
        raise InputError(
            f"label column {label_key!r} not found in the training cells' obs",
            where=f"obs columns: {', '.join(map(str, adata.obs.columns)) or '(none)'}",
            fix="pass an existing obs column as label_key, or None",
        )
    return sorted(map(str, adata.obs[label_key].dropna().unique()))


def _batch_names(adata: ad.AnnData, batch_key: str | None, label_key: str | None) -> list[str]:
    """Sorted distinct batches of the training cells ([] without a batch key), the column
    checked as a study checks it (present, no cell without a batch, at least two)."""
    if batch_key is None:
        return []
    validate_batches(adata, batch_key, source="MelVAE.fit training cells", label_key=label_key)
    return sorted(map(str, adata.obs[batch_key].astype(str).unique()))


MelVAE.fit.__func__.__doc__ = MelVAE.fit.__doc__.replace(
    " " * 8 + "{architecture}", params.numpydoc("module", indent=" " * 8)
)
