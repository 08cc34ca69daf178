"""What the public functions share in reading their model argument: ``expect_module``, the one
error for what is not a model, and ``unwrap``, torch.compile's wrapper looked through; and
``is_torch_nn``, the classes a stack of blocks is not made of."""
from __future__ import annotations

from typing import Any

import torch


def expect_module(obj: Any, doing: str, note: str = "") -> None:
    """A ``TypeError`` where ``obj`` is not an ``nn.Module``: "``doing`` an nn.Module``note``, not"
    what it is (a function by its name; a pipeline with the module to pass instead)."""
    if isinstance(obj, torch.nn.Module):
        return
    name = getattr(obj, "__qualname__", None)
    what = type(obj).__name__ + (f" {name!r}" if name else "")
    if isinstance(getattr(obj, "transformer", None), torch.nn.Module):
        what += " (a pipeline: pass its model, pipe.transformer)"
    raise TypeError(f"{doing} an nn.Module{note}, not {what}")


def is_torch_nn(cls: type) -> bool:
    """One of ``torch.nn``'s own classes: a list of those (``nn.Linear``s) is no stack of blocks."""
    return getattr(cls, "__module__", "").startswith("torch.nn")


def unwrap(model: Any) -> Any:
    """The module torch.compile's wrapper (``OptimizedModule``) holds, its ``_orig_mod``: one level,
    as the public functions take a compiled model; anything else as it is. (``frames._innermost``
    looks through wrappers of wrappers.)"""
    return getattr(model, "_orig_mod", model)
