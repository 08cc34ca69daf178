"""Find a block's timestep-modulated input: the signal TeaCache reads to decide step reuse.

Contract: ``modulated_input(plan)`` returns a ``Modulation``: a ``GraphModule`` that computes,
from slots of the value table alive when the first block the latent flows through starts, the
input of that block's first linear layer that depends on both the latent and the timestep (in an
adaLN block, ``norm(x) * (1 + scale) + shift``, what its attention projects), with the slots it
reads and the index of that block's piece (a nested block's piece holds its region's nodes:
split inlines it). None where the block has no such layer (its layers read only one of the two),
or where the latent or the timestep input is unknown. ``plan`` is not changed.

Found by dataflow, with no per-model table: which slots depend on the latent and the timestep is
propagated through the pieces before the block, then through the block's own graph; the module
is the cone of that layer's input inside the block, so running it costs the block's first norm
and modulation, not the block.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from .mutation import written
from .split import Plan

# The layers whose input is the modulated activation: linear projections (matmul-shaped).
_LINEAR = {torch._C._nn.linear, torch.nn.functional.linear, torch.matmul, operator.matmul}
_ROLES = ("latent", "timestep")


@dataclass
class Modulation:
    """The first guarded block's timestep-modulated input as a graph of its own (TeaCache's
    signal): run over the value table before that block's piece."""
    module: fx.GraphModule
    args: tuple[int, ...]       # slots read, in the module's placeholder order
    piece: int                  # the block's piece: the pieces before it run first


def modulated_input(plan: Plan) -> Modulation | None:
    """The first guarded block's modulated input: the input of its first linear layer that is
    computed from both the latent and the timestep (adaLN's normed, shifted and scaled tokens).
    None where the plan has no latent, timestep or guarded block, no such input, or the block
    writes in place into what that input is computed from."""
    roles = plan.rmap.inputs
    if any(r not in roles for r in _ROLES) or not plan.rmap.guarded:
        return None
    first = plan.rmap.guarded[0]
    piece = next(i for i, p in enumerate(plan.pieces) if p.region is first)
    # Per slot, which of the latent and the timestep it depends on.
    depends: dict[int, frozenset[str]] = {
        plan.input_names.index(roles[r]): frozenset([r]) for r in _ROLES}
    for p in plan.pieces[:piece]:
        outs = _propagate(p.module, [depends.get(s, frozenset()) for s in p.args])
        for s, d in zip(p.outs, outs):
            depends[s] = d
    block = plan.pieces[piece]
    gm = block.module
    within = _node_depends(gm, [depends.get(s, frozenset()) for s in block.args])
    target = next((n.args[0] for n in gm.graph.nodes
                   if n.op == "call_function" and n.target in _LINEAR and n.args
                   and isinstance(n.args[0], fx.Node) and within[n.args[0]] >= set(_ROLES)), None)
    if target is None or _written_before(gm, target):
        return None
    module, args = _cone(gm, target, block.args)
    return Modulation(module, args, piece)


def _written_before(gm: fx.GraphModule, target: fx.Node) -> bool:
    """Whether the block writes in place, before ``target``, into a value ``target`` is computed
    from (a custom block's ``x += bias`` ahead of its norm): the cone, run on its own ahead of the
    block, would write it once more (the block's output 1.65 off), or, leaving a write whose result
    nothing reads, read the value unwritten."""
    cone = _cone_nodes(target)
    for n in gm.graph.nodes:
        if n is target:
            return False
        if written(n) in cone:
            return True
    return False


def _cone_nodes(target: fx.Node) -> set[fx.Node]:
    cone: set[fx.Node] = set()
    todo = [target]
    while todo:
        n = todo.pop()
        if n not in cone:
            cone.add(n)
            todo.extend(n.all_input_nodes)
    return cone


# Ops whose arguments after the first lend only their dtype, device or shape, and ops that read
# no values at all: Z-Image casts its timestep embedding with ``type_as(latent)``, which makes
# the embedding no more a function of the latent than before.
_LIKE_METHODS = {"type_as", "expand_as", "view_as", "reshape_as", "to", "new_zeros", "new_ones",
                 "new_empty", "size", "dim"}
_NO_VALUES = {torch.zeros_like, torch.ones_like, torch.empty_like, torch.ops.aten.sym_size.int}


def _data_inputs(n: fx.Node) -> list[fx.Node]:
    """The inputs whose values ``n`` computes with."""
    if n.op == "call_method" and n.target in _LIKE_METHODS:
        first = n.args[0] if n.args else None
        reads = n.target not in ("size", "dim") and not n.target.startswith("new_")
        return [first] if reads and isinstance(first, fx.Node) else []
    if n.op == "call_function" and n.target in _NO_VALUES:
        return []
    return n.all_input_nodes


def _node_depends(gm: fx.GraphModule, placeholder_deps: list[frozenset[str]]
                  ) -> dict[fx.Node, frozenset[str]]:
    deps: dict[fx.Node, frozenset[str]] = {}
    phs = iter(placeholder_deps)
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            deps[n] = next(phs)
        else:
            deps[n] = frozenset().union(*(deps[a] for a in _data_inputs(n)))
    return deps


def _propagate(gm: fx.GraphModule, placeholder_deps: list[frozenset[str]]) -> list[frozenset[str]]:
    """Per output of ``gm`` (as the split plan numbers them), what it depends on."""
    deps = _node_depends(gm, placeholder_deps)
    out = gm.graph.output_node()
    rets = out.args[0] if isinstance(out.args[0], (tuple, list)) else (out.args[0],)
    return [deps[r] if isinstance(r, fx.Node) else frozenset() for r in rets]


def _cone(gm: fx.GraphModule, target: fx.Node, slots: tuple[int, ...]
          ) -> tuple[fx.GraphModule, tuple[int, ...]]:
    """``target`` and what it is computed from inside ``gm``, as a graph of its own."""
    cone = _cone_nodes(target)
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    args = []
    for i, n in enumerate(gm.graph.find_nodes(op="placeholder")):
        if n in cone:
            env[n] = graph.node_copy(n, env.__getitem__)
            args.append(slots[i])
    for n in gm.graph.nodes:
        if n in cone and n.op != "placeholder":
            env[n] = graph.node_copy(n, env.__getitem__)
    graph.output(env[target])
    return fx.GraphModule(gm, graph, "modulated_input"), tuple(args)
