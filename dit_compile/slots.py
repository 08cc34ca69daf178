"""Which graph input or output is which: the slots of a Dynamo graph that the backend, explain and
export read (the relay head's latent, timestep and text, the inputs that may carry its record, the
model's parameters, the computed outputs and their shapes, the first block's modulated input) and
the half-batch recipe built from them."""
from __future__ import annotations

import operator
import warnings
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.fx as fx

from .frames import compiled_model, forward_head, in_forward_wrapper, traced_locals, traced_module
from .passes.inputs import named_inputs, source_name, user_inputs
from .passes.modulation import Modulation, modulated_input
from .passes.mutation import example_value
from .passes.regions import NoBlockStructure, find_regions
from .passes.split import Plan
from .runtime.halves import HalfBatch


def head_slots(gm: fx.GraphModule,
               model: torch.nn.Module | None) -> tuple[int, int, int | None] | None:
    """The graph inputs of the call's latent, timestep and text (None where it takes none) where
    ``gm`` is the first graph of a forward cut by a graph break before its blocks and takes the
    first two by name; else None. A first graph that holds blocks (HiDream's, cut in its
    unpatchify) is a fragment as before: uncached, and said so."""
    if not forward_head(gm, model):
        return None
    latent, timestep, text = (named_slot(gm, role) for role in ("latent", "timestep", "text"))
    if latent is None or timestep is None:
        return None
    try:
        find_regions(gm)
        return None
    except NoBlockStructure:
        return latent, timestep, text


def named_slot(gm: fx.GraphModule, role: str) -> int | None:
    """The graph input that takes ``role`` (``named_inputs``) by name, or None."""
    name = named_inputs(gm).get(role)
    names = [n.name for n in gm.graph.find_nodes(op="placeholder")]
    return None if name is None else names.index(name)


def computed_outputs(gm: fx.GraphModule) -> list[int]:
    """The positions of the graph's outputs that are tensors it computes (not inputs it returns
    as they are, nor numbers)."""
    out = gm.graph.output_node().args[0]
    return [i for i, o in enumerate(out) if isinstance(o, fx.Node) and o.op != "placeholder"
            and isinstance(example_value(o), torch.Tensor)]


def carriers(gm: fx.GraphModule) -> list[int]:
    """The graph inputs that may carry a head's record: the tensors passed to the graph, not
    the model's parameters and buffers."""
    phs = gm.graph.find_nodes(op="placeholder")
    return [phs.index(n) for n in user_inputs(gm)]


def modulation_of(plan: Plan, policy: Any, name: str) -> Modulation | None:
    """The first block's modulated input, where the policy decides on it (TeaCache); where the
    block has none, the policy falls back to the latent's change, with a warning."""
    if not getattr(policy, "reads_modulation", False):
        return None
    found = modulated_input(plan)
    if found is None:
        warnings.warn(f"mixcache: {name}: teacache signal 'modulated': no linear layer of "
                      "the first block reads both the latent and the timestep as this graph has "
                      "them (a forward broken before its blocks hands them over as other "
                      "values), or the block writes in place into what that layer reads, or it "
                      "is one opaque call; deciding on the input latent's change instead "
                      "(signal 'input')", stacklevel=2)
        policy.teacache_signal = "input"
    return found


def parameter_slots(gm: fx.GraphModule) -> list[int]:
    """The graph inputs that are the model's parameters. Dynamo reuses one graph for every
    instance of a model class (parameters are inputs), so the runtime finds the model's cache
    state on one of them, and tells models apart by all of them."""
    phs = gm.graph.find_nodes(op="placeholder")
    return [i for i, n in enumerate(phs)
            if isinstance(getattr(n.meta.get("grapharg"), "example", None), torch.nn.Parameter)]


def anchor_slot(gm: fx.GraphModule) -> int | None:
    """The graph input the model's cache state hangs on: its first parameter."""
    return next(iter(parameter_slots(gm)), None)


def half_batch(gm: fx.GraphModule, example_inputs: list[Any], inputs: Mapping[str, str],
               backend: Callable[..., Callable[..., Any]] | None, samples: Sequence[str] = (),
               sample_outs: Sequence[int] = (), before_break: bool = False) -> HalfBatch | str:
    """The half-batch forward for cfg reuse on batched-CFG calls, or why there is none.
    ``inputs``: the placeholders of the latent, text and timestep, by role; ``samples``: those of
    a latent given as per-sample tensors. ``before_break``: ``gm`` is the first graph of a forward
    cut before its blocks (runtime.relay): the recipe is fitted to its last graph's outputs there.

    Built here because only compile time sees both sides: Dynamo's frame (the module and the real
    arguments of the first call) and the graph (which input each argument became)."""
    phs = gm.graph.find_nodes(op="placeholder")
    if len(phs) != len(example_inputs):
        return "the graph's inputs do not line up with the example inputs"
    if in_forward_wrapper(compiled_model()):
        return ("a hook wraps the model's forward (accelerate's offload hook, as "
                "enable_model_cpu_offload adds) and was added before torch.compile, so the call's "
                "arguments are the hook's; add it after torch.compile to reuse cfg on such calls")
    user = {n.name for n in user_inputs(gm)}
    placeholders = [(source_name(n), n.name not in user) for n in phs]
    numbers = frozenset(i for i, n in enumerate(phs)
                        if getattr(n.meta.get("grapharg"), "pass_arg_as_tensor", False))
    names = [n.name for n in phs]
    roles = [names.index(inputs[r]) for r in ("latent", "text", "timestep") if r in inputs]
    latent = example_inputs[names.index(inputs["latent"])]
    slots = [names.index(n) for n in samples]
    batch = len(slots) if slots else latent.shape[0] if latent.dim() else 0
    traced = example_value(phs[names.index(inputs["latent"])])
    symbol = (traced.shape[0] if isinstance(traced, torch.Tensor) and traced.dim()
              and not isinstance(traced.shape[0], int) else None)
    shapes = [] if before_break else output_shapes(gm, symbol, batch)
    layered = frozenset(i for i, n in enumerate(phs) if n.users and all(
        u.op == "call_function" and u.target is operator.getitem and u.args[0] is n
        and isinstance(u.args[1], int) for u in n.users))
    return HalfBatch.build(traced_module(), traced_locals(), placeholders, example_inputs, roles,
                           batch, shapes, backend, slots, sample_outs, numbers, layered,
                           before_break)


def output_shapes(gm: fx.GraphModule, symbol: Any = None,
                  batch: int = 0) -> list[tuple[int | None, ...] | None]:
    """The shape of each of the graph's node outputs (the executor's outputs; constants stay in
    the output spec), None where not a tensor. Under dynamic shapes the batch is a symbol: a dim
    that is the latent's ``symbol`` is the ``batch``, as a number of the first call."""
    out = gm.graph.output_node()
    return [_static_shape(x.meta.get("example_value"), symbol, batch)
            for x in torch.utils._pytree.tree_leaves(out.args[0]) if isinstance(x, fx.Node)]


def _static_shape(v: Any, symbol: Any = None, batch: int = 0) -> tuple[int | None, ...] | None:
    """``v``'s shape with symbolic sizes None, but for the batch's ``symbol``: ``batch``."""
    if not isinstance(v, torch.Tensor):
        return None
    return tuple(d if isinstance(d, int) else
                 batch if symbol is not None and d.node.expr == symbol.node.expr else None
                 for d in v.shape)
