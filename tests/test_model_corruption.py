"""Damaged saved-model folders: every corruption is an InputError naming the file and the fault,
never a traceback and never torch's advice to unpickle (`weights_only=False`)."""

from __future__ import annotations

import collections
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import torch

from melvae.errors import InputError
from melvae.model import MODEL_FILE, WEIGHTS_FILE, MelVAE
from melvae.train import TrainConfig


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    x = np.random.default_rng(0).poisson(1.0, (60, 30)).astype(np.float32)
    cells = ad.AnnData(x)
    cells.var_names = [f"g{i}" for i in range(30)]
    model = MelVAE.fit(
        cells[:40],
        cells[40:],
        hidden_dim=8,
        latent_dim=2,
        train=TrainConfig(epochs=1),
        progress=False,
    )
    return model.save(tmp_path_factory.mktemp("model") / "saved")


def _edit_weights(edit: Callable[[dict], object]) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        state = torch.load(folder / WEIGHTS_FILE, weights_only=True)
        torch.save(edit(state), folder / WEIGHTS_FILE)

    return apply


def _edit_json(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        meta = json.loads((folder / MODEL_FILE).read_text())
        edit(meta)
        (folder / MODEL_FILE).write_text(json.dumps(meta))

    return apply


def _truncate(name: str, size: int) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        (folder / name).write_bytes((folder / name).read_bytes()[:size])

    return apply


class _Payload:
    """Any pickled object: torch's weights-only reader must refuse it."""


CORRUPTIONS: dict[str, tuple[Callable[[Path], None], str, str]] = {
    "truncated weights": (_truncate(WEIGHTS_FILE, 300), WEIGHTS_FILE, "not a weights file"),
    "empty weights": (_truncate(WEIGHTS_FILE, 0), WEIGHTS_FILE, "not a weights file"),
    "missing weights": (lambda f: (f / WEIGHTS_FILE).unlink(), WEIGHTS_FILE, "missing"),
    "wrong-shape weights": (
        _edit_weights(lambda s: {**s, next(iter(s)): torch.zeros(3, 3)}),
        WEIGHTS_FILE,
        "size mismatch",
    ),
    "missing weight key": (
        _edit_weights(lambda s: dict(list(s.items())[1:])),
        WEIGHTS_FILE,
        "Missing key",
    ),
    "pickled object in weights": (
        lambda f: torch.save(_Payload(), f / WEIGHTS_FILE),
        WEIGHTS_FILE,
        "pickled Python objects",
    ),
    "non-tensor values in weights": (
        lambda f: torch.save({"a": collections.OrderedDict()}, f / WEIGHTS_FILE),
        WEIGHTS_FILE,
        "names to tensors",
    ),
    "truncated json": (_truncate(MODEL_FILE, 20), MODEL_FILE, "not readable JSON"),
    "json not an object": (lambda f: (f / MODEL_FILE).write_text("[1]"), MODEL_FILE, "object"),
    "json without preprocessor": (
        _edit_json(lambda m: m.pop("preprocessor")),
        MODEL_FILE,
        "'preprocessor'",
    ),
    "json without n_genes": (
        _edit_json(lambda m: m["hyperparameters"].pop("n_genes")),
        MODEL_FILE,
        "'n_genes'",
    ),
    "missing json": (lambda f: (f / MODEL_FILE).unlink(), MODEL_FILE, "missing"),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_every_corruption_is_an_input_error_naming_the_file(saved, tmp_path, case):
    damage, filename, what = CORRUPTIONS[case]
    folder = tmp_path / "copy"
    shutil.copytree(saved, folder)
    damage(folder)
    with pytest.raises(InputError) as caught:
        MelVAE.load(folder)
    assert caught.value.where == str(folder / filename)
    assert what in caught.value.what
    assert "weights_only" not in str(caught.value)


@pytest.mark.slow
def test_analyze_on_a_damaged_model_exits_2_without_traceback_or_unsafe_advice(saved, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(saved, folder)
    torch.save(_Payload(), folder / WEIGHTS_FILE)
    done = subprocess.run(
        [sys.executable, "-m", "melvae.analyze", "--model", str(folder), "--genesets", "kegg"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr
    assert "pickled Python objects" in done.stderr and "weights.pt" in done.stderr
    assert "Traceback" not in done.stderr and "weights_only" not in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"], "nothing written"
