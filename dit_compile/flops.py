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


def piece_flops(plan: Plan, graph_inputs: list[Any] | None = None,
                sizes: dict[Any, int] | None = None) -> list[float]:
    """Each piece's FLOPs, counted on fake inputs (nothing runs). Where they cannot be counted,
    each block weighs one FLOP and the rest nothing: blocks weighed equally within the forward,
    and beside a counted graph's calls, its calls weigh nothing in ``stats``.

    The inputs are made afresh in their own fake mode, with concrete sizes (a dynamic dimension at
    its hint, the size of the call being compiled, or as ``sizes`` gives its symbol's value):
    under symbolic sizes a piece's broadcasts
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
                              else _concrete(x, sizes) for s, x in zip(p.args, p.example_inputs)]
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


class SizedFlops:
    """A dynamic-shape graph's forward FLOPs at the sizes of a call, counted when ``stats`` first
    asks for them (nothing at run time but reading the sizes): its calls at other sizes than the
    compile's (a negative prompt of another length than the prompt, served by one graph under
    Dynamo's automatic dynamic shapes) weigh what they cost."""

    def __init__(self, plan: Plan, graph_inputs: list[Any], symbols: list[tuple[int, int, Any]]):
        # Only the 0-d graph inputs (piece_flops takes them as the constants they are): the rest
        # are a call's tensors, not to be kept alive.
        self.plan, self.symbols = plan, symbols
        self.scalars = [x if isinstance(x, torch.Tensor) and x.dim() == 0 else None
                        for x in graph_inputs]
        self._counted: dict[tuple[int, ...], list[float]] = {}

    def key(self, env: list[Any]) -> tuple[int, ...]:
        """The call's values of the graph's size symbols (``env``: the call's graph inputs)."""
        return tuple(env[slot].shape[dim] for slot, dim, _ in self.symbols)

    def pieces(self, key: tuple[int, ...]) -> list[float]:
        """Each piece's FLOPs at the sizes ``key``."""
        if key not in self._counted:
            sizes = {symbol: v for (_, _, symbol), v in zip(self.symbols, key)}
            self._counted[key] = piece_flops(self.plan, self.scalars, sizes)
        return self._counted[key]


def sized_flops(plan: Plan, graph_inputs: list[Any]) -> SizedFlops | None:
    """Where the graph's inputs have symbolic sizes (dynamic shapes), its FLOPs at each call's
    sizes; None for a static graph, whose FLOPs are its compile's."""
    symbols, seen = [], set()
    for p in plan.pieces:
        for slot, x in zip(p.args, p.example_inputs):
            if slot >= plan.n_inputs or not isinstance(x, torch.Tensor):
                continue
            for dim, d in enumerate(x.shape):
                expr = d.node.expr if isinstance(d, torch.SymInt) else None
                if expr is not None and expr.is_Symbol and expr not in seen:
                    seen.add(expr)
                    symbols.append((slot, dim, expr))
    return SizedFlops(plan, graph_inputs, symbols) if symbols else None


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


def _concrete(x: Any, sizes: dict[Any, int] | None = None) -> Any:
    """``x`` with its symbolic sizes at their values in ``sizes`` (symbol: value), else at their
    hints: a tensor of the current fake mode, or a number."""
    def hint(d: Any) -> int:
        if isinstance(d, int):
            return d
        expr = d.node.expr
        if sizes and expr.free_symbols <= sizes.keys():
            return int(expr.xreplace(sizes))
        return int(d.node.hint)
    if isinstance(x, torch.Tensor):
        return torch.empty_strided([hint(d) for d in x.shape], [hint(d) for d in x.stride()],
                                   dtype=x.dtype, device=x.device)
    return hint(x) if isinstance(x, torch.SymInt) else x
