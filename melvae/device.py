"""Where training and inference run: the one place that turns `--device auto|cpu|cuda` into a
torch device."""

from __future__ import annotations

import torch

from melvae.errors import InputError

DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` → CUDA when a GPU is present, else CPU; `cuda` without a GPU is an InputError."""
    if name not in DEVICES:
        raise InputError(
            f"unknown device {name!r}", where="device", fix=f"use one of {', '.join(DEVICES)}"
        )
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError(
            "device 'cuda' was asked for but torch sees no CUDA GPU",
            where="device",
            fix="use --device cpu (or auto), or install a CUDA build of torch on a GPU machine",
        )
    return torch.device(name)
