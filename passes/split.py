"""Split a graph at its region boundaries into pieces and a flat plan that stitches them.

Contract: ``split(gm, rmap)`` returns a ``Plan`` whose pieces are the regions of ``rmap`` as
``GraphModule``s of their own (made by ``torch.fx.passes.split_module``; a nested block's
``invoke_subgraph`` call inlined, see ``nesting.inline_nested``), each with the slots it reads and
writes in one value table. Running the pieces in order over that table computes exactly
what ``gm`` computes: this is the invariant the property tests check. ``gm`` computes the same
after as before, but is rewritten in place by ``localize_numbers`` first: a float read in a region
other than its own is computed again there, and that region of ``rmap`` gains the node.

The table is the executor's whole state per call: slot ``i < n_inputs`` is graph input ``i``
(Dynamo's calling convention), later slots are region outputs. Resolving names to slots here, once,
is what keeps the per-step work of the executor to indexing.

``pruned_twins(plan)`` finds the blocks that compute some of what a mate computes (a last block
whose other outputs nothing reads): they run the mate's compile and keep those outputs.
"""
from __future__ import annotations

import hashlib
import itertools
import math
import operator
import re
from dataclasses import dataclass, field
from typing import Any, Container

import torch
import torch.fx as fx
from torch.fx.passes.split_module import split_module
from torch.utils import _pytree as pytree

from .mutation import example_value, written_inputs
from .nesting import inline_nested
from .regions import BLOCK, RegionMap, Region


@dataclass
class Piece:
    """One region as a graph of its own, with the value-table slots it reads and writes."""
    region: Region
    module: fx.GraphModule
    args: tuple[int, ...]           # slots read, in the piece's placeholder order
    outs: tuple[int, ...]           # slots written, one per output of the piece
    example_inputs: list[Any]       # fake tensors / symints for compiling the piece
    single: bool                    # the piece returns one value, not a tuple
    _signature: str | None = field(default=None, repr=False, compare=False)

    def signature(self) -> str:
        """Structural hash: pieces with equal signatures compute the same function of their args.
        Taken once, as split made the piece (sharing and the FLOP count both key on it)."""
        if self._signature is None:
            self._signature = graph_signature(self.module, self.example_inputs)
        return self._signature

    def writes_in_place(self) -> bool:
        """Whether the piece writes into a tensor it is given (a block doing ``x += f(x)``):
        then a value read before it ran is not the value after, unless copied."""
        return bool(written_inputs(self.module))


@dataclass
class Plan:
    """A graph as pieces over one value table (``split``): running them in order computes what
    the graph computes. The executor is built from it; export saves its layout."""
    n_inputs: int
    n_slots: int
    pieces: list[Piece]
    out_spec: pytree.TreeSpec
    out_leaves: list[int | tuple[str, Any]]   # slot, or ("const", value)
    rmap: RegionMap
    input_names: list[str]                   # graph input i's placeholder name
    slot_examples: dict[int, Any]            # fake value of each slot read or returned
    computation: str                         # computation_key of the graph


def _number(n: Any) -> bool:
    """Whether ``n`` computes a float: a tensor read with ``.item()``, or arithmetic on one."""
    return (isinstance(n, fx.Node) and n.op in ("call_method", "call_function")
            and isinstance(example_value(n), (float, torch.SymFloat)))


def localize_numbers(gm: fx.GraphModule, rmap: RegionMap) -> None:
    """Each region reads the floats it uses itself: a float computed in one region and read in
    another (a LoRA scale passed in the call, a graph input once Dynamo saw it change, read with
    ``.item()`` before the blocks) is computed again in each region reading it, from the tensor it
    was read from. Handed across a boundary, it was a region's output, which Inductor cannot
    return, and a later region's symbolic float input, which it compiled wrong."""
    region_of = rmap.region_of()
    copies: dict[tuple[fx.Node, int], fx.Node] = {}

    def local(n: Any, r: int, anchor: fx.Node) -> Any:
        if not _number(n) or region_of.get(n) == r:
            return n
        if (n, r) not in copies:
            args = fx.map_arg((n.args, n.kwargs), lambda a: local(a, r, anchor))
            with gm.graph.inserting_before(anchor):
                new = gm.graph.create_node(n.op, n.target, *args, name=f"{n.name}_r{r}")
            new.meta = dict(n.meta)
            region_of[new] = r
            rmap.regions[r].nodes.append(new)
            copies[n, r] = new
        return copies[n, r]

    moved = []
    for n in [n for n in gm.graph.nodes if _number(n)]:
        for user in list(n.users):
            r = region_of.get(user)
            if r is not None and r != region_of.get(n):
                user.replace_input_with(n, local(n, r, user))
                moved.append(n)
    for n in reversed(list(dict.fromkeys(moved))):     # read elsewhere only: now read nowhere
        if not n.users and n in region_of:
            rmap.regions[region_of[n]].nodes.remove(n)
            gm.graph.erase_node(n)
    if copies:
        gm.recompile()


def split(gm: fx.GraphModule, rmap: RegionMap) -> Plan:
    """``gm`` as pieces, one per region of ``rmap``, over one value table (the module's
    contract)."""
    localize_numbers(gm, rmap)
    region_of = rmap.region_of()
    parent = split_module(gm, None, lambda n: region_of[n], keep_original_order=True)
    examples = {n.name: example_value(n) for n in gm.graph.nodes}

    slot: dict[fx.Node, int] = {}
    input_names: list[str] = []
    slot_examples: dict[int, Any] = {}
    n_inputs = 0
    pieces: list[Piece] = []
    calls: dict[fx.Node, tuple[int, ...]] = {}   # parent call -> slot of its output i
    out_node = None
    next_slot = 0
    for node in parent.graph.nodes:
        if node.op == "placeholder":
            slot[node] = next_slot
            input_names.append(node.name)
            next_slot += 1
            n_inputs += 1
        elif node.op == "call_module":
            sub = inline_nested(getattr(parent, node.target))
            _drop_unread_attributes(sub)
            idx = int(node.target.rsplit("_", 1)[1])
            sub_out = sub.graph.output_node()
            single = not isinstance(sub_out.args[0], (tuple, list))
            n_out = 1 if single else len(sub_out.args[0])
            calls[node] = tuple(range(next_slot, next_slot + n_out))
            next_slot += n_out
            outs = calls[node] if single else _canonical_outputs(sub, sub_out, calls[node])
            phs = sub.graph.find_nodes(op="placeholder")
            piece = Piece(rmap.regions[idx], sub, tuple(slot[a] for a in node.args), outs,
                          [examples[p.target] for p in phs], single)
            if single:
                slot[node] = outs[0]
            slot_examples.update(zip(piece.args, piece.example_inputs))
            pieces.append(piece)
        elif node.op == "call_function" and node.target is operator.getitem:
            src, i = node.args
            slot[node] = calls[src][i]
        elif node.op == "output":
            out_node = node
        else:  # pragma: no cover - split_module emits nothing else
            raise AssertionError(f"unexpected node in split parent: {node.format_node()}")

    leaves, spec = pytree.tree_flatten(out_node.args[0])
    out_leaves = [slot[x] if isinstance(x, fx.Node) else ("const", x) for x in leaves]
    # split_module keeps the output's structure: leaf i here is leaf i of the traced graph's.
    gm_out = gm.graph.output_node()
    for x, g in zip(leaves, pytree.tree_leaves(gm_out.args[0])):
        if isinstance(x, fx.Node) and isinstance(g, fx.Node):
            slot_examples.setdefault(slot[x], example_value(g))
    return Plan(n_inputs, next_slot, pieces, spec, out_leaves, rmap, input_names, slot_examples,
                computation_key(gm))


def _drop_unread_attributes(sub: fx.GraphModule) -> None:
    """Remove attribute reads nothing uses (``getattr`` has no side effect). Dynamo records
    ``t._base`` where ``t`` is a view, read or not: ``nest_blocks`` reads it of every argument,
    and where only the first block is handed a view (Wan before diffusers 0.40), that block would
    no longer be identical to the others and would compile apart."""
    dead = [n for n in sub.graph.nodes
            if n.op == "call_function" and n.target is getattr and not n.users]
    for n in reversed(dead):
        sub.graph.erase_node(n)
    if dead:
        sub.recompile()


def _canonical_outputs(sub: fx.GraphModule, out: fx.Node, slots: tuple[int, ...]) -> tuple[int, ...]:
    """Return a piece's outputs in the order its graph defines them, not the order later pieces
    happen to read them: identical blocks then have identical graphs, and stream i of one block is
    stream i of the next. ``slots[i]`` is where split_module's output i goes; the result says
    where each reordered output goes."""
    rets = list(out.args[0])
    pos = {n: i for i, n in enumerate(sub.graph.nodes)}
    perm = sorted(range(len(rets)), key=lambda j: pos.get(_made(rets[j]), -1))
    out.args = (tuple(rets[j] for j in perm),)
    sub.recompile()
    return tuple(slots[j] for j in perm)


def _made(n: Any) -> Any:
    """The node that computes ``n``, past the copies a nested block returns (its outputs may not
    alias, so each is cloned, in the block's return order: Flux's joint block returns the text
    first, and its piece would list the text stream first where the inlined block lists the
    image's, probed by the block guard)."""
    while (isinstance(n, fx.Node) and n.op == "call_function" and len(n.args) == 1
           and n.target in (torch.clone, torch.ops.aten.clone.default)
           and isinstance(n.args[0], fx.Node)):
        n = n.args[0]
    return n


def with_outputs(piece: Piece, keep: tuple[int, ...], single: bool) -> fx.GraphModule:
    """``piece``'s graph returning only its outputs ``keep`` (one value where ``single``), dead
    code eliminated: the graph a block gets where what follows it reads only some of what its
    mates return (which Dynamo eliminated, or left dead: both sides are eliminated to compare)."""
    graph, env = fx.Graph(), {}
    for n in piece.module.graph.nodes:
        if n.op == "output":
            rets = n.args[0] if isinstance(n.args[0], (tuple, list)) else (n.args[0],)
            kept = [env[rets[k]] if isinstance(rets[k], fx.Node) else rets[k] for k in keep]
            graph.output(kept[0] if single else tuple(kept))
        else:
            env[n] = graph.node_copy(n, lambda x: env[x])
    gm = fx.GraphModule(piece.module, graph)
    gm.graph.eliminate_dead_code()     # with its module: a call_module's purity is the module's
    gm.recompile()
    return gm


def pruned_twins(plan: Plan,
                 taken: Container[int] = ()) -> dict[int, tuple[int, tuple[int, ...]]]:
    """Blocks whose graph is a stack-mate's with some outputs dropped, where the model reads only
    some of what that block returns (the image tokens of Flux's and HunyuanVideo's last
    single-stream block, the video tokens of CogVideoX's last block): piece -> (the mate whose
    compile, or exported program, it shares; the mate's outputs it returns). The mate's compile
    computes the dropped outputs too (Flux: the text half's slice; CogVideoX: the text's gated
    residual add, over its text tokens), against a compile of a block of its own. Pieces in
    ``taken`` (twins already) are neither twins nor mates here."""
    firsts: dict[str | None, list[int]] = {}       # stack -> the first block of each signature
    seen: set[str] = set()
    for i, piece in enumerate(plan.pieces):
        if piece.region.kind == BLOCK and i not in taken and piece.signature() not in seen:
            seen.add(piece.signature())
            firsts.setdefault(piece.region.stack, []).append(i)
    twins = {}
    for blocks in firsts.values():
        for i in blocks[1:]:
            piece = plan.pieces[i]
            for m in blocks:
                mate = plan.pieces[m]
                if m == i or m in twins:
                    continue
                keep = _outputs_of_mate(mate, piece)
                if keep is not None:
                    twins[i] = (m, keep)
                    break
    return twins


def _outputs_of_mate(mate: Piece, piece: Piece) -> tuple[int, ...] | None:
    """Which of ``mate``'s outputs ``piece`` computes, where ``piece`` is ``mate``'s graph with the
    others dropped (both without what nothing they return needs); None where it is not."""
    k, n = len(piece.outs), len(mate.outs)
    if len(mate.args) != len(piece.args) or not 0 < k < n or math.comb(n, k) > 16:
        return None
    want = graph_signature(with_outputs(piece, tuple(range(k)), piece.single), piece.example_inputs)
    for keep in itertools.combinations(range(n), k):
        if graph_signature(with_outputs(mate, keep, piece.single), mate.example_inputs) == want:
            return keep
    return None


def graph_signature(gm: fx.GraphModule, example_inputs: list[Any]) -> str:
    """Hash of a graph's ops and wiring plus its inputs' metadata, blind to node names and to
    the names of sizes known only at run time (unbacked symbols: Mochi's blocks each select
    their text tokens with ``nonzero``, u0 in the first, u1 in the second; named in order of
    first appearance here, and a runtime assertion's message, which names them, left out)."""
    index: dict[fx.Node, int] = {}
    unbacked: dict[str, str] = {}
    h = hashlib.sha1()

    def enc(a: Any) -> Any:
        return pytree.tree_map(lambda x: ("%", index[x]) if isinstance(x, fx.Node) else x, a)

    def named(text: str) -> str:
        return _UNBACKED.sub(lambda m: unbacked.setdefault(m.group(), f"u_{len(unbacked)}"), text)

    for i, n in enumerate(gm.graph.nodes):
        index[n] = i
        args = n.args[:1] if n.target is torch.ops.aten._assert_scalar.default else n.args
        h.update(repr((n.op, _target(gm, n), enc(args), enc(n.kwargs))).encode())
    for v in example_inputs:
        if isinstance(v, torch.Tensor):
            # A size-1 dimension's stride is never read (Inductor's input check skips it too):
            # the first block of a batch-1 call, handed a slice, is its mates' graph.
            strides = tuple(None if isinstance(d, int) and d == 1 else st
                            for d, st in zip(v.shape, v.stride()))
            # Whether it requires grad: AOTAutograd compiles a frozen block's graph without a
            # backward, and a trainable mate running it would get no gradients.
            h.update(named(repr((tuple(v.shape), strides, v.dtype, v.device.type,
                                 v.requires_grad))).encode())
        else:
            h.update(repr(type(v)).encode())
    return h.hexdigest()


_UNBACKED = re.compile(r"\bu\d+\b")


# Arithmetic on tensors: an integer operand is a value (a hook's `out * 2`), not a size.
_ARITHMETIC = {operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv,
               operator.mod, operator.pow, torch.add, torch.sub, torch.mul, torch.div, torch.pow,
               torch.remainder, "add", "sub", "mul", "div", "pow", "remainder", "__add__",
               "__sub__", "__mul__", "__truediv__", "__floordiv__", "__mod__", "__pow__",
               "__radd__", "__rsub__", "__rmul__", "__rtruediv__"}


def computation_key(gm: fx.GraphModule) -> str:
    """Hash of what a graph computes, blind to sizes: its tensor ops in order, their wiring and
    their constants. A recompile of one forward for other sizes (a text of another length, where
    Dynamo turns to dynamic shapes) keys the same, so a cache carries over to it; another forward
    (a block hooked away, extra outputs, another scale baked in, an integer one too) keys
    otherwise. Integers are sizes or dims, which a dynamic graph takes from symbolic nodes
    instead, except as operands of arithmetic."""
    index: dict[fx.Node, int] = {}
    h = hashlib.sha1()

    def enc(a: Any, values: bool = False) -> Any:
        if isinstance(a, fx.Node):
            return ("%", index[a]) if a in index else "int"
        if isinstance(a, (int, torch.SymInt)) and not isinstance(a, bool):
            return a if values and isinstance(a, int) else "int"
        if isinstance(a, slice):    # no pytree node: its bounds are sizes too (Qwen's text split)
            return ("slice", enc(a.start), enc(a.stop), enc(a.step))
        return a

    for n in gm.graph.nodes:
        if n.op == "output":
            h.update(repr(pytree.tree_map(enc, n.args)).encode())
        elif isinstance(example_value(n), torch.Tensor):
            index[n] = len(index)
            values = n.op in ("call_function", "call_method") and _hashable_in(n.target, _ARITHMETIC)
            h.update(repr((n.op, _target(gm, n) if n.op != "placeholder" else None,
                           pytree.tree_map(lambda a: enc(a, values), n.args),
                           pytree.tree_map(lambda a: enc(a, values), n.kwargs))).encode())
    return h.hexdigest()


def _hashable_in(target: Any, targets: set) -> bool:
    try:
        return target in targets
    except TypeError:           # an unhashable callable: no arithmetic of ours
        return False


def output_keys(gm: fx.GraphModule) -> list[str]:
    """Per output of ``gm``, a hash of the computation that produces it from the graph's
    arguments (by position), blind to node names and to everything else in the graph. Equal keys in
    two graphs: the same function of the same argument positions, even where one graph lost other
    outputs (the last block of a stack, whose unused outputs were pruned)."""
    out = gm.graph.output_node()
    rets = out.args[0] if isinstance(out.args[0], (tuple, list)) else (out.args[0],)
    position = {n: i for i, n in enumerate(gm.graph.find_nodes(op="placeholder"))}
    keys = []
    for r in rets:
        cone: set[fx.Node] = set()
        todo = [r] if isinstance(r, fx.Node) else []
        while todo:
            n = todo.pop()
            if n not in cone:
                cone.add(n)
                todo.extend(n.all_input_nodes)
        index: dict[fx.Node, Any] = {}
        h = hashlib.sha1(repr(r if not isinstance(r, fx.Node) else None).encode())
        for n in gm.graph.nodes:
            if n not in cone:
                continue
            if n.op == "placeholder":
                index[n] = ("arg", position[n])
                continue
            index[n] = len(index)
            h.update(repr((n.op, _target(gm, n), pytree.tree_map(
                lambda x: ("%", index[x]) if isinstance(x, fx.Node) else x, (n.args, n.kwargs)))
            ).encode())
        if isinstance(r, fx.Node):
            h.update(repr(index[r]).encode())
        keys.append(h.hexdigest())
    return keys


# Ops a residual stream passes through unchanged in role: the residual add itself, and the
# casts, copies and clamps around it (Wan's ``(x.float() + f).type_as(x)``, fp16 clipping).
_RESIDUAL_ADDS = {operator.add, operator.iadd, operator.sub, operator.isub, torch.add, torch.sub,
                  "add", "add_", "sub", "sub_"}
_STREAM_KEEPING = {"float", "to", "type", "type_as", "contiguous", "clone", "clamp", "clip",
                   "half", "bfloat16", torch.clamp, torch.clip}


def residual_sources(gm: fx.GraphModule) -> list[int | None]:
    """Per output of ``gm``, the argument (by position) it is a residual update of: reached from
    the output through residual adds and casts only, one argument and no other; else None.
    Read off the block's own graph, so that a block computing something its neighbours do not (a
    LoRA on one block's projection) still says which stream each output carries."""
    out = gm.graph.output_node()
    rets = out.args[0] if isinstance(out.args[0], (tuple, list)) else (out.args[0],)
    position = {n: i for i, n in enumerate(gm.graph.find_nodes(op="placeholder"))}

    def reached(n: Any, seen: set) -> set[int]:
        if not isinstance(n, fx.Node) or n in seen:
            return set()
        seen.add(n)
        if n.op == "placeholder":
            return {position[n]}
        if n.op not in ("call_function", "call_method"):
            return set()
        if n.target in _RESIDUAL_ADDS:
            return set().union(*(reached(a, seen) for a in n.args[:2]))
        if n.target in _STREAM_KEEPING:
            return reached(n.args[0], seen) if n.args else set()
        return set()

    sources = [reached(r, set()) for r in rets]
    return [next(iter(s)) if len(s) == 1 else None for s in sources]


def _target(gm: fx.GraphModule, n: fx.Node) -> str:
    if n.op in ("call_function", "call_method"):
        return f"{getattr(n.target, '__module__', '')}.{getattr(n.target, '__qualname__', n.target)}"
    if n.op == "get_attr":  # a constant baked into the piece: equal only if equal values
        return _constant_key(getattr(gm, n.target))
    return n.op


def _constant_key(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        if value.numel() <= 4096 and not value.is_meta:
            return f"t{tuple(value.shape)}{value.dtype}" + hashlib.sha1(
                value.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
        return f"id{id(value)}"
    # A subgraph (torch.cond's branches, a checkpointed body) holds its own constants: equal only
    # if its graph is; any other module is equal only to itself (its repr says nothing).
    if isinstance(value, fx.GraphModule):
        return "g" + graph_signature(value, [])
    if isinstance(value, torch.nn.Module):
        return f"id{id(value)}"
    return repr(value)
