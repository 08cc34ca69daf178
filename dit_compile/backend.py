"""``backend="mixcache"``: the torch.compile backend, one linear pipeline of named passes."""
from __future__ import annotations

import copy
import warnings
from typing import Any, Callable

import torch
import torch.fx as fx
from torch._inductor.compile_fx import compile_fx

from .options import Options
from .passes.regions import NoBlockStructure, find_regions
from .passes.split import Plan, split
from .runtime.executor import Executor


def mixcache(gm: fx.GraphModule, example_inputs: list[Any], *, options: dict | None = None,
             mode: str | None = None) -> Callable[..., Any]:
    """Compile one Dynamo graph of a DiT forward into regions stitched by the runtime."""
    opts = Options.parse(options)
    inductor = _inductor_config(mode)

    # 1. regions: prologue, the blocks of each repeated stack, glue, epilogue.
    try:
        rmap = find_regions(gm)
    except NoBlockStructure as why:
        warnings.warn(f"mixcache: {_model_name()}: {why}. Compiling the whole graph with plain "
                      "Inductor, without caching.", stacklevel=2)
        return compile_fx(gm, example_inputs, config_patches=inductor)

    # 2. guards: split at the region boundaries into pieces over one value table.
    plan = split(gm, rmap)

    # 3. compile: each distinct piece once; identical blocks share the artifact.
    fns = compile_pieces(plan, opts, inductor)

    # 4. stitch: the executor runs the pieces, asking the runtime at each guard point.
    return Executor(plan, fns)


def compile_pieces(plan: Plan, opts: Options, inductor: dict[str, Any]) -> list[Callable[..., Any]]:
    compiled: dict[str, Callable[..., Any]] = {}
    fns = []
    for i, piece in enumerate(plan.pieces):
        key = piece.signature() if opts.share_blocks else str(i)
        if key not in compiled:
            if opts.regions == "eager":
                compiled[key] = piece.module
            else:
                # compile_fx owns and may mutate the graph it is given.
                compiled[key] = compile_fx(copy.deepcopy(piece.module), piece.example_inputs,
                                           config_patches=inductor)
        fns.append(compiled[key])
    return fns


def _inductor_config(mode: str | None) -> dict[str, Any]:
    if mode is None or mode == "default":
        return {}
    return dict(torch._inductor.list_mode_options(mode))


def traced_module() -> torch.nn.Module | None:
    """The nn.Module whose forward Dynamo is tracing right now, if any."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator
        tx = InstructionTranslator.current_tx()
        frame = tx.f_locals
    except Exception:  # outside a trace, or Dynamo internals moved
        return None
    # A diffusers forward is traced with its module as `self`; a plain nn.Module through a
    # wrapper that holds it as `fn`.
    for key in ("self", "fn"):
        if isinstance(frame.get(key), torch.nn.Module):
            return frame[key]
    return None


def _model_name() -> str:
    mod = traced_module()
    return type(mod).__name__ if mod is not None else "the traced function"
