"""Stamped blocks: Dynamo traces the first block of a stack, the backend stamps it out for the rest.

Nesting (``nesting.py``) makes Dynamo trace one block per stack only where Dynamo reuses a nested
region (torch 2.12 on); torch 2.11 traces every call again. ``nest_blocks(model, stamp=True)``
shortens the trace on any torch. Under ``backend="mixcache"`` the first block of a stack is traced
inlined between two ``dit_compile::stamp_mark`` calls (copies of its tensor arguments, then of its
outputs), and every later block that is *alike* to it (below) is one opaque call,
``dit_compile::stamped_block``, handed the block's arguments and its parameters and buffers; its
fake implementation runs the block on the fake tensors (once for each layout of them: the blocks
are alike), so Dynamo learns the output's shape without tracing the block's Python. First thing
in the backend, ``stamp_blocks`` puts a copy of the nodes between the first block's marks in
place of each call: the first block's ``k``-th argument (the first mark's ``k``-th output)
becomes the call's ``k``-th, a graph input that is one of the first block's weights (by the
identity of its example) the call's weight of the same name, anything else (a global) is read as
it is; then it removes the marks. What the region pass, the FLOP count, Inductor and the runtime
see is the graph an inlined model gives.

Alike, standing in for the guards Dynamo would have checked had it traced each block (``unlike``):
the same class, the same submodules by name and class, parameters and buffers of the same names,
shapes, strides, dtypes, devices and ``requires_grad``, shared among its layers alike, no hooks,
and every other attribute of every submodule equal (numbers, strings, dtypes; objects of one class
by their own attributes, the corresponding module for a module; a tensor attribute, or a function
that is not the same object, is not alike). Decided as each mixcache compile starts (``restamp``); a block that is not
alike is traced as a nested region, as without ``stamp``. What Dynamo's guards would do and this
does not: notice a stamped block's attribute changed after the compile while the first block's
did not (the first block's are guarded). A weight, buffer or submodule *assigned* inside a stamped
block drops its stamp (torch's registration hooks), so the next call traces again.

Stamps are mixcache's: the wrapper asks whether the trace is (``stamping``), and any other
backend's trace (a user's ``torch.compile``, ``export``, ``explain``, the half-batch
forward's Inductor) takes the blocks as nested regions. The op's real implementation runs the block
eagerly, what a call that was not replaced does (with a warning).

State: what ``nest_blocks`` asked is the model's (``notes(model).stamp``), a block's stamp and its
stack's fake layouts the block's own. Two tables are process-wide, each because what reads it is
handed no model: the op gets a block by a number (a custom op takes tensors and numbers, never a
module), so the stamped blocks are found by key in ``_blocks``; torch's registration hooks get
the submodule assigned into, and find its stamped block in ``_owners``. Both hold weakly.
"""
from __future__ import annotations

import ast
import contextlib
import functools
import itertools
import logging
import math
import operator
import types
import warnings
import weakref
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.nn.utils.stateless import _reparametrize_module

from ..notes import notes

log = logging.getLogger("dit_compile")

STAMP = "_dit_compile_stamp"    # on a block: (its key, its stack's first block's key, its state)
UNSTAMPABLE = "_dit_compile_unstampable"    # on a block: why stamp_blocks could not replace it
# On a stack's first block: the layouts of its stamped calls' outputs, by the calls' (``_fake``).
FAKE_LAYOUTS = "_dit_compile_fake_layouts"
_OURS = frozenset({STAMP, UNSTAMPABLE, FAKE_LAYOUTS})
# Key -> stamped block: global, as the op is handed a number, never the block (module docstring).
_blocks: "weakref.WeakValueDictionary[int, nn.Module]" = weakref.WeakValueDictionary()
_keys = itertools.count()
_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs",
          "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called", "_backward_hooks",
          "_backward_pre_hooks")
_STATE_DICT_HOOKS = ("_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
                     "_load_state_dict_post_hooks")     # not run by a forward


@torch._dynamo.assume_constant_result
def stamping() -> bool:
    """Whether the trace under way is mixcache's, which stamps blocks; any other backend's (the
    half-batch forward's Inductor, ``export``'s and ``explain``'s recorders, a user's) traces them
    as nested regions. Found on the stack, where Dynamo's frame converter holds the backend.
    Read by the traced block wrapper as a constant Dynamo does not guard on: a guard would fail at
    every call of one compile after another backend's compile (the half-batch forward's, compiled
    from inside mixcache's runtime)."""
    from ..frames import mixcache_options
    return mixcache_options() is not None


def state(block: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The block's parameters and buffers by name, in the order a stamped call hands them on."""
    return [*block.named_parameters(), *((n, b) for n, b in block.named_buffers() if b is not None)]


def restamp(model: nn.Module, on: bool = True) -> int:
    """Stamp (or, ``on=False``, unstamp) the nested blocks of ``model``, where
    ``nest_blocks(model, stamp=True)`` asked for it; returns how many blocks are stamped. The
    first block of each stack is the one traced; a later one is stamped where it is alike. A
    block's stamp is kept, the same object, where nothing in it changed: Dynamo guards on it,
    and each compile of the model (the half-batch forward's too) starts here."""
    from .nesting import NESTED_FROM, block_stacks
    asked = notes(model).stamp
    if asked is None:
        return 0        # never nested: nothing to undo
    on = on and asked
    n = 0
    stacks = block_stacks(model).values()
    # A block out of every stack now (its stack's classes mixed since: one block wrapped) keeps
    # no stamp of before: its traced wrapper would still hand it over as its first's nodes.
    held = {id(b) for stack in stacks for b in stack}
    for m in model.modules():
        if id(m) not in held:
            m.__dict__.pop(STAMP, None)
    for stack in stacks:
        if not on or len(stack) < 2 or not all(NESTED_FROM in type(b).__dict__ for b in stack):
            for b in stack:
                b.__dict__.pop(STAMP, None)
            continue
        keys = [_key(b) for b in stack]
        _set(stack[0], (keys[0], keys[0], ()))
        # The layouts a stamped call's fake kept are this compile's: an attribute of every block
        # changed since (Dynamo's guard on the first block made this compile) may change them.
        stack[0].__dict__.pop(FAKE_LAYOUTS, None)
        for block, key in zip(list(stack)[1:], keys[1:]):
            why = block.__dict__.get(UNSTAMPABLE) or unlike(stack[0], block)
            if why is None:
                _set(block, (key, keys[0], tuple(t for _, t in state(block))))
                n += 1
            else:
                log.info("mixcache: %s not stamped (traced as a nested region): %s",
                         type(block).__name__, why)
                block.__dict__.pop(STAMP, None)
    return n


def _set(block: nn.Module, stamp: tuple) -> None:
    old = block.__dict__.get(STAMP)
    if (old is None or old[:2] != stamp[:2] or len(old[2]) != len(stamp[2])
            or any(a is not b for a, b in zip(old[2], stamp[2]))):
        block.__dict__[STAMP] = stamp
    _watch(block)


# A parameter, buffer or submodule assigned inside a stamped block after the compile (weights
# loaded with ``assign=True``, an adapter injected into some blocks): Dynamo guards the first
# block's, not the stamped ones'. Dropping the block's stamp fails the guard on it, so the next
# call traces again, and the compile's start stamps the block anew, or not where it is no longer
# alike. torch's registration hooks are process-wide; installed at the first stamp. Handed only the
# submodule, they find its block in a global table: a reference held on each submodule instead
# would be among the attributes ``unlike`` compares, and copy and pickle with it (a weakref does
# not pickle, and a copy's would name the original's block).
_owners: "weakref.WeakKeyDictionary[nn.Module, weakref.ref]" = weakref.WeakKeyDictionary()
_hooks: list = []


def _watch(block: nn.Module) -> None:
    if not _hooks:
        from torch.nn.modules import module
        _hooks.extend([module.register_module_parameter_registration_hook(_assigned),
                       module.register_module_buffer_registration_hook(_assigned),
                       module.register_module_module_registration_hook(_assigned)])
    ref = weakref.ref(block)
    for m in block.modules():
        _owners[m] = ref


def _assigned(module: nn.Module, name: str, value: Any) -> None:
    if torch.compiler.is_compiling():
        # A container a forward builds as it runs (Motif-Video slices its stack): traced into,
        # its table lookups gave the blocks it holds a source in the table, not in the model.
        return
    owner = _owners.get(module)
    block = owner() if owner is not None else None
    if block is not None:
        block.__dict__.pop(STAMP, None)


def _key(block: nn.Module) -> int:
    for k, b in _blocks.items():
        if b is block:
            return k
    k = next(_keys)
    _blocks[k] = block
    return k


def unlike(a: nn.Module, b: nn.Module) -> str | None:
    """Why block ``b`` might run other code than block ``a`` on the same inputs; None where the
    two are alike (module docstring)."""
    ma, mb = list(a.named_modules()), list(b.named_modules())
    if [(n, type(m)) for n, m in ma] != [(n, type(m)) for n, m in mb]:
        return "its submodules differ"
    if _ties(a) != _ties(b):
        # A stamped call hands the weights on once each (``state``), by position.
        return "its weights are shared among its layers otherwise"
    # A submodule of one block stands for the other's at its path (an MoE lowering's bound
    # dispatch holds its own module).
    pairs: dict[int, Any] = {id(x): y for (_, x), (_, y) in zip(ma, mb)}
    for (name, x), (_, y) in zip(ma, mb):
        if x.__dict__.keys() - _OURS != y.__dict__.keys() - _OURS:
            return f"{name or 'the block'} has other attributes"
        for attr, v in x.__dict__.items():
            if attr in _OURS or attr in _STATE_DICT_HOOKS:
                continue
            w = y.__dict__[attr]
            where = f"{name + '.' if name else ''}{attr}"
            if attr in ("_parameters", "_buffers"):
                if v.keys() != w.keys() or not all(_same_tensor(v[k], w[k]) for k in v):
                    return f"{where}: other names, shapes, strides or dtypes"
            elif attr in _HOOKS:
                if v or w:
                    return f"{where}: a hook"
            elif attr != "_modules" and not _same_value(v, w, pairs):
                return f"{where} differs"
    return None


def _ties(block: nn.Module) -> list[str]:
    """For each weight's name (a weight under several names: each), the first name of its
    tensor: which of a block's layers share one."""
    first: dict[int, str] = {}
    named = itertools.chain(block.named_parameters(remove_duplicate=False),
                            block.named_buffers(remove_duplicate=False))
    return [first.setdefault(id(t), n) for n, t in named if t is not None]


def _same_tensor(x: Any, y: Any) -> bool:
    if x is None or y is None:
        return x is None and y is None
    return (type(x) is type(y) and x.shape == y.shape and x.stride() == y.stride()
            and x.dtype == y.dtype and x.device == y.device and x.requires_grad == y.requires_grad)


def _same_value(v: Any, w: Any, pairs: dict[int, Any], depth: int = 0) -> bool:
    """Whether ``v`` (of the first block) and ``w`` (of another) would make a forward compute
    alike: equal plain values; objects of one class with such attributes (compared to a depth of
    six, each pair once: a hook refers to itself through its function references); the
    corresponding module (``pairs``); never two distinct functions or tensors."""
    if type(v) is not type(w):
        return False
    if v is w or isinstance(v, (type(None), bool, int, float, complex, str, bytes, torch.dtype,
                                torch.device, torch.Size, torch.memory_format)):
        return v is w or v == w
    if isinstance(v, nn.Module):
        return pairs.get(id(v)) is w
    if isinstance(v, torch.utils.hooks.RemovableHandle):
        return True         # a handle to remove a hook with: the hooks themselves are compared
    if isinstance(v, torch.Tensor):
        return False        # a tensor attribute is read as a constant of the first block
    if isinstance(v, (tuple, list)):
        return len(v) == len(w) and all(_same_value(p, q, pairs, depth) for p, q in zip(v, w))
    if isinstance(v, (set, frozenset)):
        return v == w
    if isinstance(v, dict):
        return v.keys() == w.keys() and all(_same_value(v[k], w[k], pairs, depth) for k in v)
    if isinstance(v, types.MethodType):     # a method bound to corresponding objects
        return v.__func__ is w.__func__ and _same_value(v.__self__, w.__self__, pairs, depth)
    if depth >= 6 or isinstance(v, (type, types.FunctionType, types.BuiltinFunctionType)):
        return False
    if pairs.get(id(v)) is w:
        return True         # compared already, or being compared further up
    pairs[id(v)] = w
    if isinstance(v, functools.partial) and not (
            _same_value(v.func, w.func, pairs, depth + 1)
            and _same_value(v.args, w.args, pairs, depth + 1)
            and _same_value(v.keywords, w.keywords, pairs, depth + 1)):
        return False
    if hasattr(v, "__dict__"):
        # an attention processor, a config, a hook, a callable object: its attributes
        return _same_value(vars(v), vars(w), pairs, depth + 1)
    return False


# --- the two ops ---------------------------------------------------------------------------------

def _rebuild(spec: str, tensors: list[torch.Tensor]) -> list[Any]:
    """The leaves a stamped call stands for: ``spec``'s marks after ``|``, each ``t`` a tensor
    (the next of ``tensors``), ``n`` None, or ``=`` and a number's repr."""
    it = iter(tensors)
    return [next(it) if m == "t" else None if m == "n" else ast.literal_eval(m[1:])
            for m in spec.rpartition("|")[2].split(";") if m]


def _run(key: int, spec: str, leaves: list[torch.Tensor], tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    from .nesting import NESTED_FORWARD, _from_leaves
    block = _blocks.get(key)
    if block is None:
        raise RuntimeError(f"dit_compile::stamped_block: block {key} is gone (its model was freed)")
    own = state(block)
    forward = _from_leaves(type(block).__dict__[NESTED_FORWARD])
    swap = (_reparametrize_module(block, {n: t for (n, _), t in zip(own, tensors)})
            if len(own) != len(tensors) or any(a is not b for (_, a), b in zip(own, tensors))
            else contextlib.nullcontext())      # run eagerly on its own weights: as they are
    with swap:
        out = forward(block, spec.rpartition("|")[0], *_rebuild(spec, leaves))
    outs = flat_output(out)
    if outs is None:
        raise TypeError(f"dit_compile: a stamped {type(block).__name__} returned "
                        f"{type(out).__name__}: stamping takes blocks that return a tensor or a "
                        "tuple of two or more; nest_blocks(model) without stamp traces each block")
    return [o.clone() for o in outs]     # an op's outputs alias none of its inputs


def flat_output(out: Any) -> list[torch.Tensor] | None:
    """A block's output as the list a stamped call returns: a tensor, or a tuple of two or more
    (``len`` tells them apart again); None for any other."""
    if isinstance(out, torch.Tensor):
        return [out]
    if type(out) is tuple and len(out) > 1 and all(isinstance(o, torch.Tensor) for o in out):
        return list(out)
    return None


@torch.library.custom_op("dit_compile::stamped_block", mutates_args=())
def stamped_block(key: int, spec: str, leaves: list[torch.Tensor],
                  tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """One block's forward (its arguments ``leaves``, laid out as ``spec`` says; its parameters and
    buffers ``tensors``, in ``state`` order), run eagerly; the backend replaces the call by the
    first block's traced nodes."""
    return _run(key, spec, leaves, tensors)


@stamped_block.register_fake
def _(key: int, spec: str, leaves: list[torch.Tensor], tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    # Blocks alike to their stack's first give outputs laid out alike for arguments and weights
    # laid out alike: the block is run on fake tensors once per layout, not once per block
    # (about a tenth of a stamped trace, bench/RESULTS.md). Symbolic sizes: run each time.
    block = _blocks.get(key)
    stamp = getattr(block, STAMP, None)
    layout = _layout([*leaves, *tensors])
    if stamp is None or layout is None:
        return _fake_run(key, spec, leaves, tensors)
    first = _blocks.get(stamp[1])
    seen = first.__dict__.setdefault(FAKE_LAYOUTS, _Layouts()) if first is not None else {}
    if (spec, layout) not in seen:
        outs = _fake_run(key, spec, leaves, tensors)
        kept = _layout(outs)
        if kept is None:
            return outs
        seen[spec, layout] = kept
    return [torch.empty_strided(size, stride, dtype=dtype, device=device)
            for size, stride, dtype, device in seen[spec, layout]]


def _fake_run(key: int, spec: str, leaves: list[torch.Tensor],
              tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The block run on fake tensors. Sizes it computes from data inside (Mochi's attention
    selects its text tokens with ``nonzero``) stay inside: Dynamo fails an op whose fake makes a
    size its outputs do not hold, and the call is replaced by the first block's nodes, which
    compute their own."""
    mode = torch._guards.detect_fake_mode([*leaves, *tensors])
    shape_env = getattr(mode, "shape_env", None)
    with (shape_env.ignore_fresh_unbacked_symbols() if shape_env is not None
          else contextlib.nullcontext()):
        return _run(key, spec, leaves, tensors)


class _Layouts(dict):
    """``FAKE_LAYOUTS``: {(spec, layout of a call's tensors): its outputs' layouts}. A compile's,
    not the model's: a copy of the model (``copy.deepcopy``, ``torch.save``) gets none."""

    def __reduce__(self) -> tuple:
        return _Layouts, ()


def _layout(xs: list[torch.Tensor]) -> tuple | None:
    """Sizes, strides, dtypes and devices of ``xs``; None where any size or stride is symbolic."""
    out = tuple((tuple(x.shape), x.stride(), x.dtype, x.device) for x in xs)
    concrete = all(type(d) is int for size, stride, _, _ in out for d in (*size, *stride))
    return out if concrete else None


@torch.library.custom_op("dit_compile::stamp_mark", mutates_args=())
def stamp_mark(key: int, what: str, xs: list[torch.Tensor]) -> list[torch.Tensor]:
    """A copy of the first block's arguments (``what``: their spec) or outputs (``"out"``): marks
    where the block's nodes begin and end (``stamp_blocks`` removes it)."""
    return [x.clone() for x in xs]


@stamp_mark.register_fake
def _(key: int, what: str, xs: list[torch.Tensor]) -> list[torch.Tensor]:
    return [torch.empty_like(x) for x in xs]


def tensor_leaves(layout: str, leaves: list) -> tuple[str, list] | None:
    """``(spec, tensors)`` for a call's flat arguments, where each is a tensor, None, or a Python
    number (the spec holds it: the first block's trace holds it as a constant, and a stamped
    block is stamped from a first block called with the same); else None. Traced by Dynamo at
    each block call: a plain loop."""
    marks = []
    tensors = []
    for x in leaves:
        if x is None:
            marks.append("n")
        elif isinstance(x, torch.Tensor):
            marks.append("t")
            tensors.append(x)
        elif type(x) in (bool, int) or (type(x) is float and math.isfinite(x)):
            marks.append("=" + repr(x))
        else:
            return None
    return layout + "|" + ";".join(marks), tensors


# --- the pass ------------------------------------------------------------------------------------

OUT = "out"


def stamp_blocks(gm: fx.GraphModule) -> bool:
    """Replace each ``stamped_block`` call of ``gm`` by a copy of the first block's nodes on the
    block's arguments and state (module docstring), and remove the marks; returns whether the
    graph changed. A call it cannot replace is left to run its block eagerly, with a warning."""
    op, mark = torch.ops.dit_compile.stamped_block.default, torch.ops.dit_compile.stamp_mark.default
    if not any(n.target in (op, mark) for n in gm.graph.nodes):
        return False
    starts: dict[int, fx.Node] = {}
    ends: dict[int, fx.Node] = {}      # by the first block's key: its latest marks
    for n in list(gm.graph.nodes):
        if n.target is mark:
            (ends if n.args[1] == OUT else starts)[n.args[0]] = n
        elif n.target is op:
            why = _stamp(gm, n, starts, ends)
            block = _blocks.get(n.args[0])
            if why is not None and block is not None:
                # Not read by the trace (no guard): the next compile of the model nests it.
                block.__dict__[UNSTAMPABLE] = why
                warnings.warn(f"mixcache: a stamped {type(block).__name__} runs eagerly in this "
                              f"graph ({why}); a later compile of the model traces it as a "
                              "nested region", stacklevel=3)
    for m in [n for n in gm.graph.nodes if n.target is mark]:
        for item in list(m.users):
            if _item_of(item) is m:
                item.replace_all_uses_with(m.args[2][item.args[1]])
                gm.graph.erase_node(item)
        if not m.users:
            gm.graph.erase_node(m)
    gm.graph.lint()
    gm.recompile()
    return True


def _item_of(n: Any) -> fx.Node | None:
    """The node ``n`` takes an item of (``x[k]``), or None."""
    if isinstance(n, fx.Node) and n.target is operator.getitem and isinstance(n.args[0], fx.Node):
        return n.args[0]
    return None


def _stamp(gm: fx.GraphModule, n: fx.Node, starts: dict[int, fx.Node],
           ends: dict[int, fx.Node]) -> str | None:
    key, spec, leaves, tensors = n.args
    block = _blocks.get(key)
    stamp = None if block is None else block.__dict__.get(STAMP)
    start, end = (None, None) if stamp is None else (starts.get(stamp[1]), ends.get(stamp[1]))
    if start is None or end is None:
        return "the first block of its stack was not traced before it"
    if start.args[1] != spec:
        return "its arguments are laid out otherwise than the first block's"
    first = _blocks.get(stamp[1])
    index = {id(t): i for i, (_, t) in enumerate(state(first))} if first is not None else {}
    # The first block's nodes: all Dynamo recorded between its marks (writes into a tensor made
    # there too, as a rotary table's ``out[..., 0::2] = ...``, which no output depends on).
    nodes = list(gm.graph.nodes)
    body = nodes[nodes.index(start) + 1:nodes.index(end)]
    inside = set(body)
    env: dict[fx.Node, Any] = {x: leaves[x.args[1]] for x in body if _item_of(x) is start}
    for x in body:
        if x in env:
            continue
        for a in x.all_input_nodes:
            if a in inside or a in env:
                continue
            if a.op == "placeholder":
                env[a] = tensors[index[id(_example(a))]] if id(_example(a)) in index else a
            elif a.op == "get_attr":
                env[a] = a
            else:
                return f"the first block reads '{a.name}', computed outside it"
        if x.target in (n.target, torch.ops.dit_compile.stamp_mark.default):
            return "the first block's nodes hold another stamped block"
    if any(_item_of(u) is not n for u in n.users):
        return "its result is read whole"
    with gm.graph.inserting_before(n):
        for x in body:
            if x in env:
                continue
            env[x] = gm.graph.node_copy(x, env.__getitem__)
            env[x].meta["nn_module_stack"] = dict(n.meta.get("nn_module_stack", {}))
    for item in list(n.users):
        item.replace_all_uses_with(env.get(end.args[2][item.args[1]], end.args[2][item.args[1]]))
        gm.graph.erase_node(item)
    gm.graph.erase_node(n)
    return None


def _example(n: fx.Node) -> Any:
    return getattr(n.meta.get("grapharg"), "example", None)
