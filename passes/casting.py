"""diffusers' layerwise casting, in a form Dynamo traces.

``enable_layerwise_casting(storage_dtype=..., compute_dtype=...)`` keeps a model's weights in a
small dtype (fp8, bf16) and hooks each of its linear and conv layers: before the layer runs,
``Module.to(compute_dtype)``; after, ``Module.to(storage_dtype)``. ``Module.to`` makes new
``nn.Parameter`` objects, which Dynamo cannot trace, so the forward breaks at every hooked layer and
no backend ever sees a block (the model runs as a few hundred fragments, uncached).

The same cast is a pure function of the weights: run the layer's forward with each floating
parameter and buffer replaced by its copy in the compute dtype
(``torch.nn.utils.stateless._reparametrize_module``, what ``torch.func.functional_call`` does),
or, for a plain ``nn.Linear`` or ``nn.Conv1d/2d/3d``, its functional form on the cast weights
(Dynamo traces every hooked layer at every call, and the swap was most of what one cost it).
Dynamo traces that as ``to`` nodes on the parameters, which are graph inputs; nothing is written
back, and the weights stay stored in the storage dtype. Only the traced path changes: a call that
is not compiled takes the hook's own ``Module.to`` round trip, so eager results are as before, and
any backend that traces a rewritten layer computes what its hook computes.

``functional_casting(model) -> int``
    Give every layerwise-casting hook in ``model`` the traceable path (idempotent); the count of
    hooks changed now. ``backend="mixcache"`` calls it as a compile starts (and
    ``dit_compile.explain`` and ``dit_compile.export`` before their traces); public as
    ``dit_compile.functional_casting`` for other backends, which it leaves alone otherwise.
``find_casts(model) -> dict[str, bool]``
    Every layer with a layerwise-casting hook, by module path, and whether it has that path.
``cast_only(layer) -> torch.dtype | None``
    The dtype a layer whose only hook is layerwise casting computes in (None otherwise): the MoE
    lowering (passes/moe.py) casts stacked expert weights as the experts' hooks would.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Iterator

import torch
from torch._subclasses.fake_tensor import FakeTensor

from ..checks import expect_module

try:    # private, though torch.func.functional_call's own (torch 2.0 to 2.15 at least)
    from torch.nn.utils.stateless import _reparametrize_module
except ImportError:     # then no hook is rewritten: the forward breaks, and the backend says why
    _reparametrize_module = None

HOOK = "layerwise_casting"      # the name diffusers' apply_layerwise_casting registers it under


def functional_casting(model: torch.nn.Module) -> int:
    """Make each layerwise-casting hook in ``model`` traceable (module docstring); how many changed."""
    expect_module(model, "functional_casting rewrites the layerwise-casting hooks of")
    changed = 0
    if _reparametrize_module is None:
        return changed
    for _, module, ref, hook in _casting_hooks(model):
        if ref is None or _is_functional(ref):
            continue
        # The registry's wrapper calls pre_forward, forward, post_forward in turn and reads them
        # from this reference at each call: the hook's two casts move inside forward.
        wrapper = module.__dict__.get("forward")
        ref.forward = functools.update_wrapper(functools.partial(
            _cast_forward, hook, module, ref.forward, _plain_layer(module, ref.forward)), ref.forward)
        ref.pre_forward = _no_pre_forward
        ref.post_forward = _no_post_forward
        if cast_only(module) is not None and _wraps(wrapper, module, ref):
            # The layer's forward is then the registry's wrapper calling that forward alone (and
            # two functions that do nothing), which Dynamo would trace at every layer of every
            # call (bench/RESULTS.md, the casting rows). A hook registered later wraps this one.
            # Not beside an earlier hook: removing that one rebinds the reference's forward,
            # which a forward taken from it here would no longer follow.
            module.forward = ref.forward
        changed += 1
    return changed


def find_casts(model: torch.nn.Module) -> dict[str, bool]:
    """Each layer of ``model`` that layerwise casting hooks, and whether Dynamo can trace it."""
    return {path: ref is not None and _is_functional(ref)
            for path, _, ref, _ in _casting_hooks(model)}


def cast_only(layer: torch.nn.Module) -> torch.dtype | None:
    """The compute dtype of ``layer`` where diffusers' layerwise casting is its only hook."""
    hooks = getattr(getattr(layer, "_diffusers_hook", None), "hooks", None)
    if (not hooks or set(hooks) != {HOOK} or layer._forward_hooks or layer._forward_pre_hooks):
        return None
    return getattr(hooks[HOOK], "compute_dtype", None)


def _wraps(wrapper: Any, module: torch.nn.Module, ref: Any) -> bool:
    """Whether ``wrapper`` is the wrapper diffusers' registry made of ``ref`` for ``module``
    (``partial(new_forward, module)``, ``new_forward`` closing over the reference)."""
    cells = getattr(getattr(wrapper, "func", None), "__closure__", None) or ()
    return (isinstance(wrapper, functools.partial) and len(wrapper.args) == 1
            and wrapper.args[0] is module
            and any(c.cell_contents is ref for c in cells))


def _cast_forward(hook: Any, module: torch.nn.Module, forward: Callable[..., Any],
                  layer: Callable[..., Any] | None, *args: Any, **kwargs: Any) -> Any:
    if not torch.compiler.is_compiling() and not (args and isinstance(args[0], FakeTensor)):
        # (On fake tensors: a stamped block's fake run, passes.stamping, computes what the trace
        # of the first block holds; the hook's own casts in place fail on fake weights.)
        args, kwargs = hook.pre_forward(module, *args, **kwargs)
        return hook.post_forward(module, forward(*args, **kwargs))
    if layer is not None and len(args) == 1 and not kwargs and module.weight.is_floating_point():
        # What the layer's own forward computes from its cast weights, without swapping them in:
        # Dynamo's trace of _reparametrize_module and named_parameters was most of what a hooked
        # layer cost it (a tiny 30-layer Wan, bf16 storage, CPU, torch 2.13: 19-21 s traced
        # swapping every layer, 9-10.5 s now, 7.1-7.5 s uncast; bench/RESULTS.md).
        dtype = hook.compute_dtype
        weight, bias = module.weight.to(dtype), module.bias
        return layer(args[0], weight, None if bias is None else bias.to(dtype))
    # As Module.to(dtype) casts: the floating-point tensors, each to the compute dtype.
    cast = {name: t.to(hook.compute_dtype)
            for name, t in (*module.named_parameters(), *module.named_buffers())
            if t.is_floating_point()}
    with _reparametrize_module(module, cast):
        return forward(*args, **kwargs)


def _plain_layer(module: torch.nn.Module, forward: Callable[..., Any]) -> Callable[..., Any] | None:
    """``(input, weight, bias) -> output`` where ``forward`` is a plain ``nn.Linear``'s or
    ``nn.Conv1d/2d/3d``'s own; None otherwise (a subclass, another hook's forward, transposed
    convolutions, embeddings: those are reparametrized). Found as the hook is rewritten, not as
    Dynamo traces each call: its checks cost torch 2.11's Dynamo 7 s of a cast tiny 30-layer Wan's
    trace."""
    kind = type(module)
    if getattr(forward, "__self__", None) is not module:
        return None
    func = getattr(forward, "__func__", None)
    if kind is torch.nn.Linear and func is torch.nn.Linear.forward:
        return torch.nn.functional.linear
    if kind in _CONVS and func is kind.forward:
        return module._conv_forward
    return None


_CONVS = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)


def _no_pre_forward(module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
    return args, kwargs


def _no_post_forward(module: torch.nn.Module, output: Any) -> Any:
    return output


def _is_functional(ref: Any) -> bool:
    return isinstance(ref.forward, functools.partial) and ref.forward.func is _cast_forward


def _casting_hooks(model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Module, Any, Any]]:
    """(path, layer, its hook's function reference, the hook) for each layerwise-casting hook; the
    reference is None where diffusers' registry is not laid out as this pass knows it."""
    for path, module in model.named_modules():
        registry = getattr(module, "_diffusers_hook", None)
        hooks = getattr(registry, "hooks", None)
        if not hooks or HOOK not in hooks:
            continue
        # diffusers (0.35 to 0.42 at least) keeps one function reference per hook, in order.
        refs, order = getattr(registry, "_fn_refs", None), getattr(registry, "_hook_order", None)
        ref = refs[order.index(HOOK)] if refs is not None and order is not None else None
        if not (hasattr(ref, "forward") and hasattr(hooks[HOOK], "compute_dtype")):
            ref = None
        yield path, module, ref, hooks[HOOK]
