"""Each piece's FLOPs, counted on fake inputs: what the executor records a call's computed
fraction by (a block span reused is its pieces' share of the forward), and weighs the call by in
the fraction ``dit_compile.stats`` reports (the forward's FLOPs)."""
from __future__ import annotations

import logging
from typing import Any

import torch

from .frames import model_name
from .passes.regions import BLOCK
from .passes.split import Plan

log = logging.getLogger("dit_compile")


def flop_counter() -> Any:
    """torch's ``FlopCounterMode`` (no display), counting attention on the CPU too: torch counts
    the CUDA kernels of ``scaled_dot_product_attention`` (flash, efficient, cuDNN) but not the
    flash kernel the CPU runs for it, so on the CPU a forward's attention counted as no FLOPs (a
    fifth to a quarter of the trained reference models'), and the shares differed from the GPU's.
    It counts the total alone (``get_total_flops``), with no per-module table: see ``_GlobalOnly``."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    def sdpa(query: Any, key: Any, value: Any, *_: Any, out_shape: Any = None, **__: Any) -> int:
        return sdpa_flop_count(query, key, value)
    cpu = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    counter = FlopCounterMode(display=False, custom_mapping={cpu: sdpa} if cpu is not None else None)
    counter.mod_tracker = _GlobalOnly()
    return counter


def piece_flops(plan: Plan, graph_inputs: list[Any] | None = None) -> list[float]:
    """Each piece's FLOPs, counted on fake inputs (nothing runs). Where they cannot be counted,
    each block weighs one FLOP and the rest nothing: blocks weighed equally within the forward,
    and beside a counted graph's calls, its calls weigh nothing in ``stats``.

    The inputs are made afresh in their own fake mode, with concrete sizes (a dynamic dimension at
    its hint, the size of the call being compiled): under symbolic sizes a piece's broadcasts
    fail in the fake kernels, which log an error with a traceback before raising. A 0-d graph input
    is taken as the constant it is (``graph_inputs``: the real ones): under dynamic=True a module's
    float (a norm's eps) is such an input, and its ``.item()`` would be data-dependent. A piece may
    hold real constants (Wan's rotary frequencies, made in its forward): the mode converts them."""
    from torch._guards import detect_fake_mode
    counts = []
    mode = detect_fake_mode([x for p in plan.pieces for x in p.example_inputs])
    # A fake kernel that fails logs an error with its traceback before raising (constant_pad_nd
    # on a size only known at run time: Mochi's nonzero); the failure is handled below.
    fake_log = logging.getLogger("torch._subclasses.fake_tensor")
    fake_log_disabled, fake_log.disabled = fake_log.disabled, True
    allowed = mode is not None and mode.allow_non_fake_inputs
    try:
        if mode is None:
            raise RuntimeError("no fake inputs")
        mode.allow_non_fake_inputs = True
        with mode:
            counted: dict[str, float] = {}    # identical pieces (the blocks) are counted once
            for p in plan.pieces:
                key = p.signature()
                if key not in counted:
                    inputs = [_constant(mode, graph_inputs[s]) if _scalar(graph_inputs, s, plan)
                              else _concrete(x) for s, x in zip(p.args, p.example_inputs)]
                    with flop_counter() as fc:
                        p.module(*inputs)
                    counted[key] = float(fc.get_total_flops())
                counts.append(counted[key])
    except Exception as why:  # a piece fake execution cannot count: weigh blocks equally instead
        log.info("mixcache: %s: FLOPs not counted (%s: %s); blocks weighed equally", model_name(),
                 type(why).__name__, str(why).splitlines()[0] if str(why) else "")
        counts = [1.0 if p.region.kind == BLOCK else 0.0 for p in plan.pieces]
    finally:
        if mode is not None:
            mode.allow_non_fake_inputs = allowed
        fake_log.disabled = fake_log_disabled
    return counts


class _GlobalOnly:
    """FlopCounterMode's module tracker, for the total alone. Its own registers process-wide
    module hooks while it counts (for a per-module table): another thread calling a compiled
    model meanwhile runs them inside its compiled call, and Dynamo, tracing them there, fails
    ("already tracked for mutation"). The counter files every op under its parents; here only
    "Global", the total ``get_total_flops`` reads."""
    parents = frozenset({"Global"})

    def __enter__(self) -> "_GlobalOnly":
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


def _scalar(graph_inputs: list[Any] | None, slot: int, plan: Plan) -> bool:
    return (graph_inputs is not None and slot < plan.n_inputs
            and isinstance(graph_inputs[slot], torch.Tensor) and graph_inputs[slot].dim() == 0
            and not isinstance(graph_inputs[slot], torch._subclasses.FakeTensor))


def _constant(mode: Any, x: torch.Tensor) -> torch.Tensor:
    return mode.fake_tensor_converter.from_real_tensor(mode, x, make_constant=True)


def _concrete(x: Any) -> Any:
    """``x`` with its symbolic sizes at their hints: a tensor of the current fake mode, or a number."""
    def hint(d: Any) -> int:
        return d if isinstance(d, int) else int(d.node.hint)
    if isinstance(x, torch.Tensor):
        return torch.empty_strided([hint(d) for d in x.shape], [hint(d) for d in x.stride()],
                                   dtype=x.dtype, device=x.device)
    return hint(x) if isinstance(x, torch.SymInt) else x
