"""dit-compile: a torch.compile backend for diffusion-transformer inference.

    torch.compile(transformer, backend="mixcache")

Installing the package registers the backend through the ``torch_dynamo_backends`` entry point; no
import is needed. Its subpackages live in ``passes/``, ``runtime/`` and ``kernels/`` at the
repository root and are mapped under ``dit_compile`` by the install (``package-dir``), so the source
tree on ``sys.path`` alone is not a working package: install it (``pip install -e .``).
"""
from __future__ import annotations

import numbers
import threading
import time
from typing import Any

import torch

from .backend import mixcache
from .checks import expect_module, unwrap
from .explain import Report, explain
from .export import Exported, export, load
from .frames import compiled_options
from .options import OptionError, Options
from .passes.casting import functional_casting
from .passes.moe import lower_moe, register_moe, restore_moe
from .passes.nesting import nest_blocks, unnest_blocks
from .runtime import background
from .runtime.cache import CacheMemoryError, find_state, model_states
from .runtime.policy import PolicyError
from .sketch import Calibration, OnlineSplit, Settle, calibrate_split, refuse_split, sketch_render
from .teacache import fit_teacache

__all__ = ["mixcache", "explain", "stats", "reset", "wait_for_compiles", "export", "load", "Exported", "lower_moe", "register_moe", "restore_moe",
           "nest_blocks", "unnest_blocks", "functional_casting",
           "calibrate_split", "sketch_render", "Settle", "OnlineSplit", "fit_teacache", "Calibration", "Report", "Options", "OptionError",
           "PolicyError", "CacheMemoryError"]


def stats(model: torch.nn.Module) -> dict[str, Any]:
    """What the cache computed and reused for ``model`` (compiled with caching on):
    calls, computed, reused per granularity, the fraction of FLOPs computed (all since the last
    ``reset``; each call weighed by its forward's FLOPs at its sizes, counted on fake inputs:
    a dynamic-shape graph's, once per size, here), cached bytes, and a per-call trace
    (generation, step, branch, ``t``, action, signal) of the last 16 generations. ``t`` is the call's noise level: its largest timestep,
    or where the timestep rises (``timestep="rising"``, or learned under ``"auto"``) the top of
    its scale (1, or 1000 for Mochi's) minus its smallest. Each thread that generates keeps its
    own state: this is the calling thread's where it has one, else the one that ran last."""
    refuse_split(model, "stats")
    options = compiled_options(model)
    if options is not None and Options.parse(options).cache is None:
        # Its states, if any, are another compile's of the same model (kept on its parameters).
        raise ValueError("this model is compiled with cache=None: mixcache caches nothing for it "
                         "(stats of another compile of the module: pass that compiled model, "
                         "or the module itself for the one that ran last)")
    state = find_state(model, threading.current_thread()) or find_state(model)
    if state is None:
        raise ValueError("this model has no mixcache state: compile it with backend='mixcache' "
                         "with caching on (the default; not cache=None), and run it once; a "
                         "model that runs without caching was warned why (graph breaks, no "
                         "block stack, inputs not found, autograd recording)")
    return state.stats()


def reset(model: torch.nn.Module) -> None:
    """Drop everything cached and counted for ``model`` in the calling thread: its next call
    starts a new generation, and ``stats(model)`` counts from there. Every state of the model's
    in this thread, where graphs of it hold several (compiled again in another form): none of
    them is reused after a reset.

    Each thread that generates keeps its own state, and a reset is the calling thread's: the
    README's own loops, one a thread, each reset between their generations, never in the middle of
    another's (a reset there restarted it, and one under its running call raised). A thread that
    has not called the model has nothing to reset; its first call starts a generation anyway.
    An ``OnlineSplit`` resets both its models and its clock."""
    model = unwrap(model)
    if isinstance(model, OnlineSplit):
        reset(model.large)
        reset(model.small)
        model.clock.reset()
        return
    for state in model_states(model, threading.current_thread()):
        state.reset()
        state.clear_stats()


def wait_for_compiles(model: torch.nn.Module, timeout: float | None = None) -> int:
    """Block until the regions of ``model`` that compile in the background (option
    ``background_compile``) are compiled, and switch them in; returns how many were. For timing the
    compiled model, or a deployment that wants its first request fast: a model runs its regions
    uncompiled until then. ``timeout`` in seconds (``subprocess.TimeoutExpired`` past it). An
    ``OnlineSplit`` waits for both its models."""
    model = unwrap(model)
    expect_module(model, "wait_for_compiles waits for the compiles of")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, numbers.Real)
                                or not timeout >= 0):
        raise ValueError(f"wait_for_compiles: timeout={timeout!r}: seconds (a number >= 0) or None")
    if isinstance(model, OnlineSplit):
        deadline = None if timeout is None else time.monotonic() + timeout
        return sum(wait_for_compiles(m, None if deadline is None else max(0.0, deadline - time.monotonic()))
                   for m in (model.large, model.small))
    return background.wait(model, float(timeout) if timeout is not None else None)
