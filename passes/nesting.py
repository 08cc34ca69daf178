"""Block stacks as nested compile regions, so that Dynamo traces one block of a stack, not all.

Dynamo inlines every block of a model's stack before any backend sees the graph: at 30 blocks that
trace is most of a first call. ``torch.compiler.nested_compile_region`` on a block's forward makes
Dynamo trace it once and stamp out the other calls as ``invoke_subgraph`` nodes, which the region
pass reads as blocks. Marking the block *class* would change every model of that class in the
process; ``nest_blocks`` marks this model's blocks only, by moving each to a subclass that differs
from its class in nothing but the marked forward (same name, so module paths, ``isinstance`` and
diffusers' ``_repeated_blocks`` see the block they saw). A module rewrite before tracing, like the
MoE lowering: no backend can shorten the trace it is handed. Dynamo reuses a traced region from
torch 2.12 on; torch 2.11 traces every call again.

After tracing, once the region pass has found the blocks, ``inline_nested`` puts each region's
nodes back into its piece: nesting shortens the trace and changes nothing the backend compiles.
"""
from __future__ import annotations

import functools
import inspect
import itertools
import operator
import sys
import warnings
from typing import Any, Callable

import torch
import torch.fx as fx
from torch import nn
from torch.utils import _pytree as pytree

from ..checks import expect_module, is_torch_nn
from ..notes import notes
from .mutation import example_value
from .stamping import (OUT, STAMP, flat_output, restamp, stamp_mark, stamped_block,
                       stamping, tensor_leaves)

NESTED_FROM = "_dit_compile_nested_from"    # on a nested subclass: the class it stands in for
NESTED_FORWARD = "_dit_compile_nested_forward"  # on a nested subclass: the forward it wraps
# Traces Dynamo may keep of nested blocks in one compile (torch's default is 8, then it fails the
# compile). A block that cannot reuse another's trace (a Python constant that differs from block
# to block) is traced again, as if inlined: slower, never a failed compile at the ninth block.
# The blocks of every nested class share one count: their regions share code objects.
MAX_TRACES = 4096
_subclasses: dict[type, type] = {}          # one subclass per block class, so blocks share it


def block_stacks(model: nn.Module) -> dict[str, nn.ModuleList | nn.Sequential]:
    """The model's repeated block stacks, as the region pass finds them: every ``nn.ModuleList``
    or ``nn.Sequential`` below the model of two or more modules of one class, not one of
    ``torch.nn``'s own, and not inside another such stack's blocks (an MoE's experts are not a
    stack)."""
    stacks: dict[str, nn.ModuleList | nn.Sequential] = {}
    for name, module in model.named_modules():
        if not name or any(name.startswith(f"{s}.") for s in stacks):
            continue
        if isinstance(module, (nn.ModuleList, nn.Sequential)) and len(module) >= 2:
            classes = {original_class(type(b)) for b in module}
            if len(classes) == 1 and not is_torch_nn(classes.pop()):
                stacks[name] = module
    return stacks


def nest_blocks(model: nn.Module, stamp: bool = False) -> int:
    """Mark every block of ``model``'s stacks as a nested compile region, in place; returns the
    number of blocks now marked (again: the same number, nothing changes). Call before
    ``torch.compile``; ``unnest_blocks`` undoes it. The outputs are the same; the first call
    traces one block per stack where Dynamo reuses nested regions (torch 2.12 on), and warns
    where it does not; under ``dynamic=True`` the blocks trace inlined.

    ``stamp``: under ``backend="mixcache"``, Dynamo traces the first block of each stack and the
    backend stamps its graph out for the blocks alike to it, on any torch (``passes.stamping``)."""
    expect_module(model, "nest_blocks marks the blocks of")
    if not isinstance(stamp, bool):
        raise TypeError(f"nest_blocks: stamp={stamp!r}: must be True or False")
    if not reuses_nested_regions() and not stamp:
        warnings.warn(
            f"dit_compile.nest_blocks: torch {torch.__version__} traces every call of a nested "
            "compile region again (Dynamo reuses a traced region from torch 2.12 on), so nesting "
            "makes the first call slower, not faster (Dynamo's trace of a tiny 30-block Wan on a "
            "CPU: 6.7-7.1 s nested, 5.0-5.3 s inlined); the blocks are nested as asked, "
            "unnest_blocks(model) undoes it; nest_blocks(model, stamp=True) traces one block on "
            "this torch too, under backend='mixcache'",
            stacklevel=2)
    n = 0
    for stack in block_stacks(model).values():
        for block in stack:
            block.__class__ = _nested(original_class(type(block)))
            n += 1
    notes(model).stamp = stamp
    restamp(model)
    return n


def unnest_blocks(model: nn.Module) -> int:
    """Undo ``nest_blocks``: every marked block of ``model`` back to its own class; returns how
    many were marked."""
    expect_module(model, "unnest_blocks unmarks the blocks of")
    restamp(model, on=False)
    notes(model).stamp = None
    n = 0
    for module in model.modules():
        original = type(module).__dict__.get(NESTED_FROM)
        if original is not None:
            module.__class__ = original
            n += 1
    return n


def reuses_nested_regions() -> bool:
    """Whether this torch's Dynamo stamps out a nested region it traced once: its reuse cache
    came with ``nested_compile_region``'s ``max_reuse_entries`` (torch 2.12); torch 2.11 traces
    each call again and only dedupes the graphs."""
    return "max_reuse_entries" in inspect.signature(torch.compiler.nested_compile_region).parameters


def _traced_nested() -> bool:
    """Whether Dynamo is tracing this call as a nested region: compiling, and not under
    ``dynamic=True`` (see ``_flat_region``). Dynamo reads its config as a constant while it
    traces; ``dynamic=True`` clears this flag."""
    return torch.compiler.is_compiling() and torch._dynamo.config.assume_static_by_default


def _unaliased(forward: Callable[..., Any]) -> Callable[..., Any]:
    """``forward`` whose tensor outputs, when compiled, are copies: a nested region's outputs may
    not alias each other or its inputs (Flux's and HunyuanVideo's single-stream blocks return the
    two halves of one tensor as views), and Inductor writes each copy where the viewed tensor would
    have been written. Run eagerly or traced inlined, nothing is copied."""
    @functools.wraps(forward)
    def unaliased(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        out = forward(self, *args, **kwargs)
        if not _traced_nested():
            return out
        return pytree.tree_map_only(torch.Tensor, torch.clone, out)
    return unaliased


def _flat_region(forward: Callable[..., Any]) -> Callable[..., Any]:
    """``forward`` as a nested compile region, called, when compiled, with its arguments laid
    flat and with copies of the tensors that share a tensor with another.

    Flat: a layout string and the leaves, each argument a leaf or a tuple of leaves (Wan's rotary
    pair). Dynamo checks every later call of a region against its first trace, and that check
    takes a fast path for flat arguments; with a tuple or a keyword it flattens them with pytree
    at every call (0.9 s of a 30-block tiny Wan's 3.9 s nested trace on the CPU, torch 2.13).
    Arguments that nest deeper (a dict, a list) go through as they are.

    Copies: a nested region's inputs may not alias each other (CogVideoX hands its first block
    the text and video halves of one tensor). Views that share with no other argument are handed
    on as they are (Wan's text, modulation and rotary tables, every block, every call).

    Under ``dynamic=True`` the block is traced inlined: Dynamo makes every Python float a symbol
    there, and its own trace of a region that reads one fails with any backend (torch 2.13: a
    float argument, ``KeyError``; torch 2.15: a norm's eps too, "Freevar has no source").

    Run eagerly or traced inlined, nothing is laid out or copied."""
    region = _nested_region(_unaliased(forward))
    flat = _nested_region(_from_leaves(_unaliased(forward)))
    from_leaves = _from_leaves(forward)     # the first of stamped blocks: traced inlined

    @functools.wraps(forward)
    def nested(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        if not _traced_nested():
            return forward(self, *args, **kwargs)
        laid_out = _flattened(args, kwargs)
        if laid_out is None:
            args, kwargs = _unshared(args, kwargs)
            return region(self, *args, **kwargs)
        layout, leaves = laid_out
        stamp = self._dit_compile_stamp if stamping() else None
        if stamp is not None:
            split = tensor_leaves(layout, leaves)
            if split is not None:
                key, first, tensors = stamp
                if key != first:
                    outs = stamped_block(key, split[0], split[1], list(tensors))
                    return outs[0] if len(outs) == 1 else tuple(outs)
                # The first block, traced inlined between two marks (passes.stamping).
                marked = iter(stamp_mark(key, split[0], split[1]))
                out = from_leaves(self, layout, *[next(marked) if isinstance(x, torch.Tensor)
                                                  else x for x in leaves])
                outs = flat_output(out)
                if outs is None:
                    return out
                outs = stamp_mark(key, OUT, outs)
                return outs[0] if len(outs) == 1 else tuple(outs)
        return flat(self, layout, *_copied_shared(leaves))
    return nested


# Dynamo traces _flattened, _laid_out and _copied_shared at every nested call of a first call:
# plain loops, tuples and lists, with no pytree and no generator (each costs trace time per call).
def _flattened(args: tuple, kwargs: dict) -> tuple[str, list] | None:
    """``(layout, leaves)`` of a call whose arguments are leaves or tuples of leaves, None where
    one nests deeper. The layout lists the arguments, ``name=`` before a keyword's: ``t`` a leaf,
    a number a tuple of that many."""
    parts: list[str] = []
    leaves: list[Any] = []
    for a in args:
        part = _laid_out(a, leaves)
        if part is None:
            return None
        parts.append(part)
    for name, a in kwargs.items():
        part = _laid_out(a, leaves)
        if part is None:
            return None
        parts.append(name + "=" + part)
    return ",".join(parts), leaves


def _laid_out(a: Any, leaves: list) -> str | None:
    if type(a) is tuple:        # a named tuple would come back as a plain one
        for b in a:
            if isinstance(b, (tuple, list, dict)):
                return None
        leaves.extend(a)
        return str(len(a))
    if isinstance(a, (tuple, list, dict)):
        return None
    leaves.append(a)
    return "t"


def _from_leaves(forward: Callable[..., Any]) -> Callable[..., Any]:
    """``forward`` called with the arguments that ``layout`` and ``leaves`` stand for (inside the
    region: traced once, not per call)."""
    def from_leaves(self: nn.Module, layout: str, *leaves: Any) -> Any:
        args: list[Any] = []
        kwargs: dict[str, Any] = {}
        i = 0
        for part in (layout.split(",") if layout else []):
            name, _, kind = part.rpartition("=")
            if kind == "t":
                value, i = leaves[i], i + 1
            else:
                value, i = tuple(leaves[i:i + int(kind)]), i + int(kind)
            if name:
                kwargs[name] = value
            else:
                args.append(value)
        return forward(self, *args, **kwargs)
    return from_leaves


def _copied_shared(leaves: list) -> list:
    """``leaves`` with a copy of every tensor that shares its tensor with another (by position and
    `is`, never id(): Dynamo would guard on the objects' ids)."""
    tensors: list[int] = []
    roots: list[torch.Tensor] = []
    for i in range(len(leaves)):
        x = leaves[i]
        if isinstance(x, torch.Tensor):
            base = x._base
            tensors.append(i)
            roots.append(x if base is None else base)
    out = None      # a new list only where something is copied
    for a in range(len(roots)):
        for b in range(len(roots)):
            if a != b and roots[a] is roots[b]:
                out = list(leaves) if out is None else out
                out[tensors[a]] = leaves[tensors[a]].clone()
                break
    return leaves if out is None else out


def _unshared(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """``args`` and ``kwargs`` with a copy of every tensor that shares its tensor with another."""
    flat, spec = pytree.tree_flatten((args, kwargs))
    return pytree.tree_unflatten(_copied_shared(flat), spec)


def inline_nested(gm: fx.GraphModule) -> fx.GraphModule:
    """``gm`` with each nested region's call (``invoke_subgraph``, nested ones too) replaced by the
    region's own nodes, and the ``getitem``s of its result by the region's outputs; the same
    placeholders in order, the same outputs. ``gm`` itself where it has no such call, or where a
    result is read other than by ``getitem``.

    The backend inlines every piece it compiles: nesting is for Dynamo's trace, and once the
    region pass has found the blocks, a piece holding the region's nodes is the piece an inlined
    block gives. Inductor then compiles both alike, and FLOP counting and the modulation pass see
    plain ops. A float argument that changed between calls is a symbol in the recompiled graph
    (Dynamo's automatic dynamic), handed to the region as a Python number, which the region reads
    with ``.item()`` as if it were a tensor, and Dynamo's own graph fails in ``invoke_subgraph``
    with any backend: inlined, such a read is the number.
    (torch 2.13 has a pass of its own, ``torch._higher_order_ops.passes.inline_invoke_subgraph``,
    which leaves such reads as they are; torch 2.11 and 2.12 have none.)"""
    invoke = torch.ops.higher_order.invoke_subgraph
    if not any(n.target is invoke for n in gm.graph.nodes):
        return gm
    root, graph = nn.Module(), fx.Graph()
    names = itertools.count()
    results: dict[fx.Node, list[Any]] = {}

    def copy(source: fx.GraphModule, env: dict[fx.Node, Any]) -> Any:
        """``source``'s nodes appended to ``graph``, its placeholders those in ``env`` where given;
        returns what its output node returns."""
        for n in source.graph.nodes:
            if n in env:
                continue
            if n.op == "output":
                return fx.map_arg(n.args[0], env.__getitem__)
            if n.target is invoke:
                region = getattr(source, n.args[0].target)
                operands = [env[a] if isinstance(a, fx.Node) else a for a in n.args[2:]]
                phs = region.graph.find_nodes(op="placeholder")
                results[n] = list(copy(region, dict(zip(phs, operands))))
            elif n.op == "get_attr" and n.users and all(u.target is invoke for u in n.users):
                continue        # a region's graph, inlined where it is called
            elif n.target is operator.getitem and n.args[0] in results:
                env[n] = results[n.args[0]][n.args[1]]
            elif n.op == "call_method" and n.target == "item" and _number(env.get(n.args[0])):
                env[n] = env[n.args[0]]
            else:
                env[n] = graph.node_copy(n, env.__getitem__)
                if n.op in ("get_attr", "call_module"):     # kept in root, under a name of its own
                    env[n].target = f"_inlined_{next(names)}"
                    setattr(root, env[n].target, operator.attrgetter(n.target)(source))
        raise AssertionError("a graph with no output node")

    try:
        graph.output(copy(gm, {}))
    except KeyError:        # a region's result read whole: left as it is
        return gm
    return fx.GraphModule(root, graph, type(gm).__name__)


def _number(x: Any) -> bool:
    if isinstance(x, fx.Node):
        x = example_value(x)
    return isinstance(x, (int, float, torch.SymInt, torch.SymFloat))


def original_class(cls: type) -> type:
    """The class a nested subclass stands in for; any other class itself."""
    return cls.__dict__.get(NESTED_FROM, cls)


def _nested(cls: type) -> type:
    # Made again where the class's forward changed since (patched on the class by a library or
    # a user): nesting hands a block the forward its class has now, as unnested blocks run it.
    # Blocks nested before keep the forward they were nested with (unnest and nest them again):
    # looking the forward up at each call (through super()) cost Dynamo's trace of a nested first
    # call about 0.45 s of 5.2 (tiny 30-block Wan, CPU, four runs each).
    forward = inspect.getattr_static(cls, "forward")    # as stored: the same object each time
    made = _subclasses.get(cls)
    if made is None or made.__dict__[NESTED_FORWARD] is not forward:
        _subclasses[cls] = type(cls.__name__, (cls,), {
            "forward": _flat_region(cls.forward),
            "__reduce_ex__": _reduce_nested, NESTED_FORWARD: forward, STAMP: None,
            NESTED_FROM: cls, "__module__": cls.__module__, "__qualname__": cls.__qualname__})
        _register_with_diffusers(_subclasses[cls], cls)
    return _subclasses[cls]


def _register_with_diffusers(nested: type, cls: type) -> None:
    """``nested`` takes ``cls``'s entry in diffusers' block registry. diffusers' hooks that act on
    a whole block (layer skip, which its skip-layer guiders apply at every such step;
    First-Block-Cache; MagCache) look a block's metadata up by its exact class, and a nested block
    raised "not registered" there. The registry is filled once, on its first use; a diffusers
    model imported has imported every class it names, so filling it here costs nothing more."""
    if "diffusers" not in sys.modules:
        return      # no diffusers block, and no registry to find it in
    try:
        from diffusers.hooks._helpers import TransformerBlockRegistry
        TransformerBlockRegistry._register()
        metadata = TransformerBlockRegistry._registry.get(cls)
    except (ImportError, AttributeError):        # a diffusers without the registry
        return
    if metadata is not None:
        TransformerBlockRegistry._registry[nested] = metadata


def _nested_region(forward: Callable[..., Any]) -> Callable[..., Any]:
    limit = {"max_reuse_entries": MAX_TRACES} if reuses_nested_regions() else {}
    return torch.compiler.nested_compile_region(forward, **limit)


def _reduce_nested(self: nn.Module, protocol: int) -> tuple:
    """A nested block pickles (``torch.save(model)``, ``copy.deepcopy``) by the class it stands in
    for and comes back nested: pickle finds a class by its name, which names the original. It
    comes back unstamped: a stamp names this block (``passes.stamping``); a stamped model's copy
    is stamped anew as mixcache's compile of it starts."""
    _, _, state, *rest = object.__reduce_ex__(self, max(protocol, 2))   # (__newobj__, (cls,), state, ...)
    state = {k: v for k, v in state.items() if k != STAMP}
    return (_new_nested, (original_class(type(self)),), state, *rest)


def _new_nested(cls: type) -> nn.Module:
    nested = _nested(cls)
    return nested.__new__(nested)
