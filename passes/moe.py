"""Lower mixture-of-experts dispatch to one call of the custom op ``dit_compile::moe_ffn``.

Why this pass works on the module, before tracing
-------------------------------------------------
diffusers' HiDream ``MOEFeedForwardSwiGLU.moe_infer`` reads per-expert token counts back to the host
(``bincount().cpu().numpy()``) and loops over them; NucleusMoE's ``SwiGLUExperts`` loop calls
``.tolist()``. Dynamo breaks the graph there, so a backend only ever receives the pieces around the
loop, never the loop: an FX pass in the backend is too late. Letting Dynamo trace through does not
help either: with ``capture_scalar_outputs`` and ``capture_dynamic_output_shape_ops`` the bincount
has a data-dependent length and ``for ... in tokens_per_expert`` fails with "Could not extract
specialized integer from data-dependent expression" (checked on torch 2.13, diffusers 0.42).
``torch._dynamo.substitute_in_graph`` could swap the function, but for every instance of the class at
once, only under Dynamo, and the substitute still needs stacked weights that live on the instance.

So the dispatch is replaced on the *instance*: the module's dispatch method becomes an instance
attribute that adapts its arguments and calls the op with stacked expert weights. Dynamo traces that
like any Python method, the op stays one opaque node (its fake implementation gives the output shape),
and eager calls get the same speed-up. The class, other instances and module globals are untouched;
:func:`restore_moe` undoes it. ``backend="mixcache"`` calls :func:`lower_moe` itself on the model
whose dispatch broke its trace, and has Dynamo trace that forward again
(``dit_compile.frames.lower_moe_and_retrace``).

Public API
----------
``lower_moe(model) -> int``
    Walk ``model`` and lower every recognised dispatch (idempotent). Recognised today, by class (also
    subclasses) and then by structure:

    * HiDream ``MOEFeedForwardSwiGLU``: ``experts`` is an ``nn.ModuleList`` of identical
      ``HiDreamImageFeedForwardSwiGLU`` (plain bias-free ``nn.Linear`` ``w1`` gate, ``w3`` up,
      ``w2`` down) next to a top-k ``gate``; ``moe_infer(x, flat_ids, flat_weights)`` is replaced.
      The training-mode branch of ``forward`` is left as is.
    * NucleusMoE ``SwiGLUExperts`` (expert-choice routing): ``forward(x, num_tokens_per_expert)`` on
      rows already grouped by expert is replaced; each row is a token with k = 1 and weight 1, rows
      past the counted ones are dropped (zeros, as in the loop). Its stacked ``gate_up_proj`` and
      ``down_proj`` are passed as transposed views: no copy, nothing to keep in sync.

    A module that has the class but not the structure (LoRA-wrapped projections, unequal experts)
    is skipped with a warning.

``register_moe(module, method, *, experts=None, projections=("w1", "w3", "w2"), weights=None, route=None)``
    Mark your own MoE for lowering. Factor the routed part into a method that takes
    ``(x [T, D], expert_ids [T, k], routing_weights [T, k])`` and returns ``[T, D]`` (or pass
    ``route`` to adapt other arguments), then name where the expert weights are::

        class MyMoE(nn.Module):
            def forward(self, x):
                weights, ids = self.router(x).softmax(-1).topk(2)
                return self.shared(x) + self.dispatch(x, ids, weights)

            def dispatch(self, x, ids, weights):  # the slow loop, left as it is
                ...

        register_moe(my_moe, "dispatch", experts="experts")  # experts[i].w1 / .w3 / .w2 nn.Linear
        # or, with weights already stacked as [E, H, D], [E, H, D], [E, D, H] tensors:
        register_moe(my_moe, "dispatch", weights=lambda m: (m.w_gate, m.w_up, m.w_down))

    ``weights`` is called on every dispatch, so it must only read module attributes (then Dynamo
    sees live parameters, and views such as ``.transpose`` are free). A lambda works, but
    ``torch.save(model)`` needs module-level functions for ``weights`` and ``route``. Each expert must compute
    ``down(silu(gate(x)) * up(x))``; the op trusts this, it cannot check it.

``restore_moe(model) -> int``
    Undo the lowering everywhere in ``model``.

``lowered_meanwhile(model)``
    A context manager: the model's unlowered dispatches lowered inside it, restored after (what
    ``dit_compile.export`` and ``dit_compile.explain`` trace, the model left as it was).

``find_moe(model) -> dict[str, bool]``
    Every known MoE dispatch in ``model`` by module path, and whether it is lowered (for reports and
    warnings before compiling).

``count_moe_ops(gm) -> int``
    How many op calls a traced graph holds.

Keeping stacked weights in sync with the experts
------------------------------------------------
Per-expert ``nn.Linear`` weights are stacked once into non-persistent buffers ``_moe_w1``,
``_moe_w3``, ``_moe_w2`` on the dispatching module, and each expert's parameter is re-pointed
(``param.data``) to its slice of the stack. Memory is not doubled, the state dict keeps its keys, and
anything that updates parameters in place (``load_state_dict``, ``copy_``, optimizers, PEFT's
``fuse_lora``) updates the stack too. Three things replace the parameters' storage and would leave
the stack stale, so all three restack: ``module._apply`` (``.to()``, ``.half()``, ``.cuda()``) is
wrapped on the instance, a ``load_state_dict`` post-hook restacks when the aliasing is broken, and
a weight assigned anew (``expert.w1.weight = nn.Parameter(w)``, each one a load with
``assign=True`` makes) restacks its projection as it is assigned (torch's parameter registration
hook; a weight of another shape, dtype or device undoes the lowering, with a warning).
A copy (``copy.deepcopy`` clones each parameter apart from the stack; ``torch.load`` of a saved
model keeps the aliasing but not the watch on assignments) stacks again at its first eager
dispatch, reading its experts' weights as they are then. Not covered: code that rebinds ``param.data``, and
``torch.func.functional_call`` with other expert weights (the op reads the stack); call
:func:`lower_moe` again after such changes (it restacks), or :func:`restore_moe` to go back.
LoRA layers or hooks added to experts after lowering: calling
:func:`lower_moe` again (or a mixcache compile starting) undoes the lowering, with a warning.

The op has no autograd formula: where autograd would record the call (grad enabled and an input or
an expert weight requiring grad: training), the dispatch runs the module's original method instead,
so the model stays differentiable (and slow there); under ``torch.no_grad`` / ``inference_mode``, as
pipelines run, it is the op. ``no_grad=True`` says the original itself runs under no_grad (HiDream's
``moe_infer``), and the op then always runs, as the original would without gradients. Under
``torch.autocast`` the stacked weights and the input are cast to the autocast dtype, as autocast
casts the experts' linear layers; where diffusers' layerwise casting (``enable_layerwise_casting``:
fp8 or bf16 storage) is the projections' only hook, the stacks stay in the storage dtype and each
dispatch casts them to the compute dtype, as the hooks would. Experts with other forward hooks
(group offloading, accelerate's) are not lowered, since the op never calls the experts and
their hooks would not run: ``lower_moe`` skips them with a warning, ``register_moe`` refuses. A
hook added on the dispatching module after lowering wraps the lowered method: remove it before
:func:`restore_moe`, which otherwise leaves the module lowered, with a warning. A lowered module pickles
(``torch.save(model)``) and loads lowered.
"""

from __future__ import annotations

import contextlib
import inspect
import pickle
import warnings
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..kernels.moe_op import moe_ffn
from .casting import cast_only
from ..checks import expect_module

__all__ = ["count_moe_ops", "find_moe", "lower_moe", "lowered_meanwhile", "register_moe", "restore_moe"]

Route = Callable[..., tuple[Tensor, Tensor, Tensor]]
Weights = Callable[[nn.Module], tuple[Tensor, Tensor, Tensor]]

_SPEC_ATTR = "_dit_moe_spec"
_STACK_BUFFERS = ("_moe_w1", "_moe_w3", "_moe_w2")


@dataclass(frozen=True)
class _MoESpec:
    """How one module's dispatch was lowered; stored on the module so restore/restack can find it."""

    method: str
    route: Route  # (module, *args, **kwargs) -> (x, expert_ids, routing_weights)
    weights: Weights  # module -> (w1, w3, w2), read at every call
    experts: str | None  # attribute of the per-expert ModuleList whose weights we stacked, if any
    projections: tuple[str, str, str]  # gate, up, down attribute names inside each expert
    no_grad: bool = False  # the original runs under no_grad (HiDream's moe_infer): so does the op
    cast: torch.dtype | None = None  # the experts' layerwise casting computes in this dtype

    def __getstate__(self) -> dict[str, Any]:
        # pickle saves a function by its name, which a lambda or a local function lacks: say so
        # here, naming register_moe's argument, not with pickle's "attribute lookup <lambda> on
        # __main__ failed" (the recipe in this module's docstring passes a lambda).
        for field in ("route", "weights"):
            name = getattr(getattr(self, field), "__qualname__", "")
            if "<lambda>" in name or "<locals>" in name:
                raise pickle.PicklingError(
                    f"a module lowered by register_moe({field}={name}) cannot be pickled: pickle saves "
                    f"functions by name, and a lambda or a local function has none. Pass a "
                    f"module-level function as {field}=, or restore_moe(model) before torch.save")
        return self.__dict__

    def __deepcopy__(self, memo: dict) -> _MoESpec:
        return self  # immutable; a deepcopy shares functions anyway (and must not pickle them)


# ---------------------------------------------------------------------------------------------------
# Substitution


def _dispatch(spec: _MoESpec, self: nn.Module, *args: Any, **kwargs: Any) -> Tensor:
    """The lowered ``self.<spec.method>(*args, **kwargs)``."""
    if (spec.experts is not None and not torch.compiler.is_compiling()
            and self.__dict__.get(_STACKED_ATTR) is not _STACKED):
        # A copy of a lowered module (deepcopy, torch.load): see _Stacked. A compile lowers (and so
        # stacks) before it traces.
        _stack_experts(self, spec)
    with torch.no_grad() if spec.no_grad else contextlib.nullcontext():
        x, expert_ids, routing_weights = spec.route(self, *args, **kwargs)
        w1, w3, w2 = spec.weights(self)
        if spec.cast is not None:
            # What the experts' layerwise casting hooks do to each weight as it runs, done to the
            # stacks (stored in the storage dtype; the hooks never run, the experts being skipped).
            w1, w3, w2 = (w.to(spec.cast) for w in (w1, w3, w2))
        if torch.is_grad_enabled() and (
                any(t.requires_grad for t in (x, routing_weights, w1, w3, w2))
                or (spec.experts is not None
                    and any(p.requires_grad for p in getattr(self, spec.experts).parameters()))):
            # Autograd would record this call and the op has no backward: the original method
            # (training, or a forward that needs gradients) stays differentiable. The stacked
            # buffers never require grad; the experts' parameters, their slices, may.
            return getattr(type(self), spec.method)(self, *args, **kwargs)
        if torch.is_autocast_enabled(x.device.type):
            # What autocast does to the experts' nn.Linear layers, done to the stacked ones.
            dtype = torch.get_autocast_dtype(x.device.type)
            x, w1, w3, w2 = (t.to(dtype) for t in (x, w1, w3, w2))
        return moe_ffn(x, expert_ids, routing_weights, w1, w3, w2)


class _Bound:
    """``fn(*first, module, ...)`` as an instance attribute of ``module``: a bound method that
    pickles. A ``types.MethodType`` pickles as the name of its function looked up on the
    unpickled module, which names nothing there, so ``torch.save(model)`` of a lowered model
    wrote a file that would not load; this one pickles its function, the spec and the module,
    and comes back lowered. ``copy.deepcopy`` binds the copy to the copied module."""

    def __init__(self, fn: Callable[..., Any], module: nn.Module, *first: Any) -> None:
        self.fn, self.module, self.first = fn, module, first

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*self.first, self.module, *args, **kwargs)


class _PlainRoute:
    """The route of a method called as ``(x, expert_ids, routing_weights)``: by position, or by
    keyword under the method's own parameter names, as the original accepts them (a keyword call
    once raised ``_plain_route() got an unexpected keyword argument`` where the original ran). A
    class rather than a closure, so that the spec pickles with the module."""

    def __init__(self, method: str, names: tuple[str, ...]) -> None:
        self.method, self.names = method, names

    def __call__(self, module: nn.Module, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor, Tensor]:
        values = args[:3] + tuple(kwargs[name] for name in self.names[len(args):3] if name in kwargs)
        if len(values) != 3 or len(args) + len(kwargs) != 3:
            raise TypeError(f"{type(module).__name__}.{self.method}, lowered by register_moe without "
                            f"route=, takes exactly (x, expert_ids, routing_weights), by position or as "
                            f"{self.names[:3]}; got {len(args)} positional argument(s) and keywords "
                            f"{sorted(kwargs)}: pass route= to adapt other arguments")
        if ([isinstance(v, Tensor) and v.is_floating_point() for v in values] != [True, False, True]):
            # Said here, where the order is the likely cause; the op's own check would only say
            # that expert_ids must be integer.
            got = ", ".join(str(v.dtype) if isinstance(v, Tensor) else type(v).__name__
                            for v in values)
            raise TypeError(f"{type(module).__name__}.{self.method}, lowered by register_moe without "
                            f"route=, takes (x, expert_ids, routing_weights) in that order: float, "
                            f"integer, float tensors; it was called with {got} (another order? "
                            f"route= adapts it)")
        return values


def _plain_route_for(module: nn.Module, method: str) -> _PlainRoute:
    """The plain route of ``module.<method>``, knowing its parameter names (those after ``self``)."""
    try:
        params = list(inspect.signature(getattr(type(module), method)).parameters.values())[1:]
    except (TypeError, ValueError):  # no signature (a builtin): positional calls only
        params = []
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return _PlainRoute(method, tuple(p.name for p in params if p.kind in named))


def register_moe(
    module: nn.Module,
    method: str,
    *,
    experts: str | None = None,
    projections: tuple[str, str, str] = ("w1", "w3", "w2"),
    weights: Weights | None = None,
    route: Route | None = None,
    no_grad: bool = False,
) -> None:
    """Replace ``module.<method>`` on this instance by a call of ``dit_compile::moe_ffn``.

    Exactly one of ``experts`` (name of an ``nn.ModuleList`` attribute whose members hold bias-free
    ``nn.Linear`` layers named by ``projections``: gate, up, down) and ``weights`` (module ->
    stacked ``(w1 [E, H, D], w3 [E, H, D], w2 [E, D, H])``) must be given. ``route(module, *args,
    **kwargs) -> (x [T, D], expert_ids [T, k], routing_weights [T, k])`` adapts the method's
    arguments; without it the method is called as ``(x, expert_ids, routing_weights)``, by position
    or by keyword under the method's own names for its first three parameters. The method's
    replacement returns the op's ``[T, D]``. ``no_grad``: the method runs under ``torch.no_grad``
    (as HiDream's does), so the op may run even where gradients are enabled; otherwise a call that
    autograd would record runs the original method. Registering an already lowered module again
    restacks its weights. Raises ``ValueError`` when the experts do not have the required structure,
    ``method`` is not a method of the module's class, or it is replaced on this instance (a hook's
    ``forward``: the lowered method would take its place, and the hook would not run).
    """
    expect_module(module, "register_moe marks a dispatch method of")
    if (experts is None) == (weights is None):
        raise ValueError("register_moe: pass exactly one of experts= and weights=")
    if not callable(getattr(type(module), method, None)):
        raise ValueError(f"register_moe: {type(module).__name__} has no method {method!r}")
    if (not isinstance(projections, (list, tuple)) or len(projections) != 3
            or not all(isinstance(p, str) for p in projections)):
        raise ValueError(f"register_moe: projections={projections!r} must name three layers of "
                         "each expert: gate, up, down")
    if experts is not None and not hasattr(module, experts):
        raise ValueError(f"register_moe: {type(module).__name__} has no attribute {experts!r} "
                         "(experts= names its nn.ModuleList of experts)")
    if experts is not None:
        problem = _swiglu_experts_problem(getattr(module, experts, None), projections)
        if problem:
            raise ValueError(f"register_moe: {type(module).__name__}.{experts}: {problem}")
    problem = _replaced_method_problem(module, method)
    if problem:
        raise ValueError(f"register_moe: {type(module).__name__}: {problem}")
    _unregister(module)
    casts = ({cast_only(getattr(e, name)) for e in getattr(module, experts) for name in projections}
             if experts is not None else {None})
    spec = _MoESpec(
        method=method,
        route=route if route is not None else _plain_route_for(module, method),
        weights=weights if weights is not None else _stacked_buffers,
        experts=experts,
        projections=tuple(projections),
        no_grad=no_grad,
        cast=casts.pop(),
    )
    if experts is not None:
        _stack_experts(module, spec)
        # Instance attributes, so that only this module's conversions and loads restack.
        module._apply = _Bound(_apply_then_restack, module)
        module._dit_moe_load_hook = module.register_load_state_dict_post_hook(_restack_after_load)
    setattr(module, _SPEC_ATTR, spec)
    setattr(module, method, _Bound(_dispatch, module, spec))


def _replaced_method_problem(module: nn.Module, method: str) -> str | None:
    """Why lowering ``module.<method>`` would drop something, or None: the method is already
    replaced on the instance by someone else (diffusers' and accelerate's hooks replace
    ``forward`` so: group offloading's on NucleusMoE's experts, which own their weights). The
    lowered method would take that place, so the replacement would never run again, not even
    after :func:`restore_moe`."""
    if method in module.__dict__ and not isinstance(module.__dict__[method], _Bound):
        return (f"{method} is replaced on this instance (diffusers' or accelerate's hooks, or your "
                "own): the lowered method would take its place and the replacement would not run")
    return None


def _unregister(module: nn.Module) -> bool:
    """Undo the lowering of ``module``; False where it was not lowered, or where its lowered
    method was replaced on the instance since (a hook added after lowering wraps it): popping
    that would drop the hook, and removing the hook later would put the lowered method back
    without its spec, so the module is left lowered, with a warning."""
    spec: _MoESpec | None = module.__dict__.get(_SPEC_ATTR)
    if spec is None:
        return False
    if not isinstance(module.__dict__.get(spec.method), _Bound):
        warnings.warn(f"dit_compile: {type(module).__name__}.{spec.method} was replaced on the instance "
                      "after lowering (a hook added since wraps the lowered method): left lowered, as "
                      "restoring would drop the replacement; remove it (the hook) first",
                      stacklevel=3)
        return False
    del module.__dict__[_SPEC_ATTR]
    module.__dict__.pop(spec.method, None)
    module.__dict__.pop("_apply", None)
    module.__dict__.pop(_STACKED_ATTR, None)
    hook = module.__dict__.pop("_dit_moe_load_hook", None)
    if hook is not None:
        hook.remove()
    for name in _STACK_BUFFERS:
        module._buffers.pop(name, None)
    # Expert parameters stay views of the dropped stack: same values, and the slices together keep
    # exactly the stack's storage alive, so no memory is lost.
    return True


def restore_moe(model: nn.Module) -> int:
    """Give every lowered module in ``model`` its original dispatch back; returns how many."""
    expect_module(model, "restore_moe restores the MoE dispatches of")
    return sum(_unregister(m) for m in model.modules())


@contextlib.contextmanager
def lowered_meanwhile(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """``model``'s unlowered MoE dispatches lowered (:func:`lower_moe`) inside the block and given
    their own methods back after it: a trace of the block sees the fused op, and the model is left
    as it was. Those lowered before the block stay lowered, untouched."""
    pending = [p for p, lowered in find_moe(model).items() if not lowered] if enabled else []
    for p in pending:
        lower_moe(model.get_submodule(p))
    try:
        yield
    finally:
        for p in pending:
            restore_moe(model.get_submodule(p))


# ---------------------------------------------------------------------------------------------------
# Stacked expert weights


def _stacked_buffers(module: nn.Module) -> tuple[Tensor, Tensor, Tensor]:
    return module._moe_w1, module._moe_w3, module._moe_w2


def _expert_params(module: nn.Module, spec: _MoESpec) -> list[list[nn.Parameter]]:
    experts = getattr(module, spec.experts)
    return [[getattr(expert, name).weight for expert in experts] for name in spec.projections]


def _is_stacked(module: nn.Module, spec: _MoESpec) -> bool:
    for buffer_name, params in zip(_STACK_BUFFERS, _expert_params(module, spec)):
        stack = module._buffers.get(buffer_name)
        if stack is None or len(params) != stack.shape[0]:
            return False
        for i, param in enumerate(params):
            if param.dtype != stack.dtype or param.device != stack.device or param.data_ptr() != stack[i].data_ptr():
                return False
    return True


class _Stacked:
    """The mark of a module whose expert parameters alias its stacks, assignments to them watched
    (``_projections``). A copy loses it (it copies as False): ``copy.deepcopy`` clones each
    parameter apart from the stack, so in-place edits of the copy's experts would no longer reach
    the op, and an unpickled module's layers are not in ``_projections``, so a weight assigned anew
    would not be restacked. The copy's next dispatch stacks again."""

    def __reduce__(self) -> tuple:
        return (bool, ())

    def __deepcopy__(self, memo: dict) -> bool:
        return False


_STACKED = _Stacked()    # a constant, no state: the mark is its identity, which a copy lacks
_STACKED_ATTR = "_dit_moe_stacked"


def _stack_experts(module: nn.Module, spec: _MoESpec) -> None:
    """Stack each projection's expert weights into a buffer and make the parameters its slices."""
    for k in range(len(_STACK_BUFFERS)):
        _stack_projection(module, spec, k)
    module.__dict__[_STACKED_ATTR] = _STACKED


@torch.no_grad()
def _stack_projection(module: nn.Module, spec: _MoESpec, k: int,
                      assigned: tuple[nn.Module, nn.Parameter] | None = None) -> None:
    """``_stack_experts`` for projection ``k`` alone; ``assigned``: a layer whose weight is being
    replaced, with the new one."""
    if not _hook:
        _hook.append(torch.nn.modules.module.register_module_parameter_registration_hook(
            _projection_assigned))
    layers = [getattr(expert, spec.projections[k]) for expert in getattr(module, spec.experts)]
    params = [assigned[1] if assigned and layer is assigned[0] else layer.weight
              for layer in layers]
    module._buffers.pop(_STACK_BUFFERS[k], None)
    device = params[0].device.type
    # Not under the caller's autocast (lowering runs at a compile's start, inside the call): its
    # type promotion of torch.stack refuses fp8 (layerwise casting's storage), and the stack
    # keeps the weights' own dtype anyway.
    with (torch.autocast(device, enabled=False) if torch.amp.is_autocast_available(device)
          else contextlib.nullcontext()):
        stack = torch.stack([p.detach() for p in params])
    for i, param in enumerate(params):
        param.data = stack[i]
    module.register_buffer(_STACK_BUFFERS[k], stack, persistent=False)
    for layer in layers:
        _projections[layer] = (weakref.ref(module), k)


# A projection's weight assigned anew (``expert.w1.weight = nn.Parameter(w)``,
# ``load_state_dict(..., assign=True)``) would leave the stack, which the op reads, holding the old
# values: the assignment restacks that projection with the new weight. torch's registration hook is
# process-wide (installed at the first stack: then a dictionary lookup per parameter registered
# anywhere), and runs before the assignment, handed the new parameter. A weight the stack cannot
# take (another shape, dtype or device than its experts') undoes the lowering, with a warning: the
# module's own loop then runs it. Handed only the layer, the hook finds its module in a global
# table: a reference held on each layer instead would copy and pickle with it (a weakref does not
# pickle, and a copy's would name the original module) and be among the attributes that stamping
# compares between blocks.
_projections: "weakref.WeakKeyDictionary[nn.Module, tuple[weakref.ref, int]]" = \
    weakref.WeakKeyDictionary()     # projection layer -> (its dispatching module, which stack)
_hook: list = []


def _projection_assigned(layer: nn.Module, name: str, param: Any) -> None:
    owner, k = _projections.get(layer, (None, 0))
    module = owner() if owner is not None and name == "weight" else None
    spec = module.__dict__.get(_SPEC_ATTR) if module is not None else None
    stack = module._buffers.get(_STACK_BUFFERS[k]) if spec is not None else None
    if stack is None or param is None:
        return
    if (param.shape, param.dtype, param.device) != (stack.shape[1:], stack.dtype, stack.device):
        if _unregister(module):
            warnings.warn(f"dit_compile: {type(module).__name__}: an expert's weight was replaced "
                          f"by one of {tuple(param.shape)}, {param.dtype}, {param.device}, which its "
                          f"stack ({tuple(stack.shape[1:])}, {stack.dtype}, {stack.device}) cannot "
                          "take: the MoE lowering is undone here (the module's own loop runs it; "
                          "lower_moe again once all weights agree)", stacklevel=4)
        return
    _stack_projection(module, spec, k, (layer, param))


def _apply_then_restack(self: nn.Module, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> nn.Module:
    # Drop the stacks first so that .to() converts each weight once, then rebuild them from the
    # converted parameters (the conversion gave those new storage, breaking the aliasing).
    for name in _STACK_BUFFERS:
        self._buffers.pop(name, None)
    result = type(self)._apply(self, fn, recurse)
    _stack_experts(self, getattr(self, _SPEC_ATTR))
    return result


def _restack_after_load(module: nn.Module, incompatible_keys: Any) -> None:
    spec = getattr(module, _SPEC_ATTR, None)
    if spec is not None and spec.experts is not None and not _is_stacked(module, spec):
        _stack_experts(module, spec)


def _swiglu_experts_problem(experts: Any, projections: tuple[str, str, str]) -> str | None:
    """Why ``experts`` is not a non-empty ModuleList of identical bias-free SwiGLU experts, or None."""
    if not isinstance(experts, nn.ModuleList) or len(experts) == 0:
        return "not a non-empty nn.ModuleList"
    reference = None
    for i, expert in enumerate(experts):
        layers = [getattr(expert, name, None) for name in projections]
        missing = [name for name, layer in zip(projections, layers) if layer is None]
        if missing:
            # Said apart from a wrong layer type: the usual cause is projections= left at HiDream's
            # names for experts that call theirs otherwise.
            linear = [n for n, m in expert.named_children() if isinstance(m, nn.Linear)]
            return (f"expert {i} has no {', '.join(map(repr, missing))}: projections={projections!r} "
                    f"must name its gate, up and down layers (its nn.Linear layers: {linear})")
        # Exactly nn.Linear: a LoRA or quantisation wrapper computes something the op would not.
        if any(type(layer) is not nn.Linear or layer.bias is not None for layer in layers):
            return f"expert {i}: {projections} must be plain bias-free nn.Linear"
        # Layerwise casting is the one hook the op can stand in for: it casts the stacks itself.
        casts = [cast_only(layer) for layer in layers]
        if _hooked(expert) or any(_hooked(m) and c is None for m, c in zip(layers, casts)):
            return (f"expert {i} has forward hooks (diffusers' group offloading, accelerate's "
                    "offload, hooks of your own): the op reads the stacked weights and never "
                    "calls the experts, so their hooks would not run")
        if len(set(casts)) > 1:
            return (f"expert {i}: layerwise casting on some of {projections} only (or to "
                    "different compute dtypes): the op casts all three stacks alike")
        gate, up, down = (layer.weight for layer in layers)
        if gate.shape != up.shape or down.shape != gate.shape[::-1]:
            return f"expert {i}: gate/up [H, D] and down [D, H] shapes disagree"
        # One compute dtype for all experts, as for one expert's three stacks.
        signature = (gate.shape, gate.dtype, gate.device, up.dtype, up.device, down.dtype, down.device,
                     *casts)
        if reference is None:
            reference = signature
        elif signature != reference:
            return f"expert {i}: shape, dtype or device differs from expert 0"
    return None


def _hooked(module: nn.Module) -> bool:
    # diffusers' hooks and accelerate's replace ``forward`` on the instance; torch's are listed.
    return bool("forward" in module.__dict__ or module._forward_hooks or module._forward_pre_hooks)


# ---------------------------------------------------------------------------------------------------
# Recognised diffusers classes


def _hidream_route(module: nn.Module, x: Tensor, flat_expert_indices: Tensor, flat_expert_weights: Tensor):
    # moe_infer gets topk_idx.view(-1) and topk_weight.view(-1, 1) of [T, k] tensors.
    top_k = module.num_activated_experts
    return x, flat_expert_indices.view(-1, top_k), flat_expert_weights.view(-1, top_k)


def _lower_hidream(module: nn.Module) -> str | None:
    experts = getattr(module, "experts", None)
    problem = _swiglu_experts_problem(experts, ("w1", "w3", "w2"))
    if problem is None and not all(_has_class(e, _HIDREAM_EXPERT) for e in experts):
        problem = "experts are not HiDreamImageFeedForwardSwiGLU"
    if problem is None and not isinstance(getattr(module, "num_activated_experts", None), int):
        problem = "no integer num_activated_experts"
    if problem is None:
        problem = _replaced_method_problem(module, "moe_infer")
    if problem is None:
        register_moe(module, "moe_infer", experts="experts", route=_hidream_route, no_grad=True)
    return problem


def _nucleus_route(module: nn.Module, x: Tensor, num_tokens_per_expert: Tensor):
    # Rows arrive grouped by expert; row r belongs to the first expert whose cumulative count
    # exceeds r. Rows past the total get id E: the op drops them, leaving zero rows as the loop does.
    ends = num_tokens_per_expert.cumsum(0)
    rows = torch.arange(x.shape[0], device=x.device, dtype=ends.dtype)
    expert_ids = torch.searchsorted(ends, rows, right=True)
    return x, expert_ids[:, None], x.new_ones(x.shape[0], 1)


def _nucleus_weights(module: nn.Module) -> tuple[Tensor, Tensor, Tensor]:
    # gate_up_proj [E, D, 2H] (gate = first half of the last dim), down_proj [E, H, D]: transposed
    # views give the op's [E, H, D] and [E, D, H] without a copy.
    gate_up, down = module.gate_up_proj, module.down_proj
    hidden = gate_up.shape[-1] // 2
    return gate_up[..., :hidden].transpose(1, 2), gate_up[..., hidden:].transpose(1, 2), down.transpose(1, 2)


def _lower_nucleus(module: nn.Module) -> str | None:
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    if not (isinstance(gate_up, Tensor) and isinstance(down, Tensor) and gate_up.dim() == down.dim() == 3):
        return "gate_up_proj / down_proj are not stacked [E, D, 2H] / [E, H, D] tensors"
    num_experts, dim, twice_hidden = gate_up.shape
    if twice_hidden % 2 or tuple(down.shape) != (num_experts, twice_hidden // 2, dim) or gate_up.dtype != down.dtype:
        return f"gate_up_proj {tuple(gate_up.shape)} and down_proj {tuple(down.shape)} do not match"
    problem = _replaced_method_problem(module, "forward")
    if problem:
        return problem
    register_moe(module, "forward", weights=_nucleus_weights, route=_nucleus_route)
    return None


_DIFFUSERS = "diffusers.models.transformers."
_HIDREAM_EXPERT = (_DIFFUSERS + "transformer_hidream_image", "HiDreamImageFeedForwardSwiGLU")
# Matched by (module, qualname) along the MRO: no diffusers import, subclasses included.
_RECOGNISERS: dict[tuple[str, str], Callable[[nn.Module], str | None]] = {
    (_DIFFUSERS + "transformer_hidream_image", "MOEFeedForwardSwiGLU"): _lower_hidream,
    (_DIFFUSERS + "transformer_nucleusmoe_image", "SwiGLUExperts"): _lower_nucleus,
}


def _has_class(obj: object, key: tuple[str, str]) -> bool:
    return any((cls.__module__, cls.__qualname__) == key for cls in type(obj).__mro__)


def _recogniser(module: nn.Module) -> Callable[[nn.Module], str | None] | None:
    for cls in type(module).__mro__:
        lower = _RECOGNISERS.get((cls.__module__, cls.__qualname__))
        if lower is not None:
            return lower
    return None


def _relower(module: nn.Module, spec: _MoESpec) -> str | None:
    """Bring an already lowered ``module`` up to date with its experts: restack where a parameter
    no longer aliases its stack, register again where their layerwise casting changed. Where the
    experts no longer have the structure the op computes (a wrapper or a hook added after
    lowering), undo the lowering and return why; None where it stays lowered."""
    if spec.experts is None:
        return None  # weights= reads the module's own tensors at every call: nothing to check
    problem = _swiglu_experts_problem(getattr(module, spec.experts, None), spec.projections)
    if problem is not None:
        # Where a hook wraps the lowered method it stays lowered (_unregister says why).
        return f"{spec.experts}: {problem}" if _unregister(module) else None
    if cast_only(getattr(getattr(module, spec.experts)[0], spec.projections[0])) != spec.cast:
        register_moe(module, spec.method, experts=spec.experts, projections=spec.projections,
                     route=spec.route, no_grad=spec.no_grad)
    elif not _is_stacked(module, spec):
        _stack_experts(module, spec)
    return None


def lower_moe(model: nn.Module) -> int:
    """Lower every recognised MoE dispatch in ``model`` (itself included) to ``dit_compile::moe_ffn``.

    Idempotent: already lowered modules (by this function or :func:`register_moe`) are kept, and their
    stacked weights rebuilt if a parameter no longer aliases them. An already lowered module whose
    experts no longer pass the structural check (a LoRA or quantisation wrapper, or a forward hook,
    added to an expert after lowering) gets its original method back, with a ``UserWarning`` naming
    the reason: the op would ignore the wrapper or the hook. Returns the number of lowered
    dispatches in ``model`` after the call. Modules of a recognised class that fail the structural
    check are skipped with a ``UserWarning`` naming the reason.
    """
    expect_module(model, "lower_moe lowers the MoE dispatches of")
    lowered = 0
    for name, module in model.named_modules():
        spec: _MoESpec | None = module.__dict__.get(_SPEC_ATTR)
        if spec is not None:
            problem = _relower(module, spec)
            if problem is None:
                lowered += 1
            else:
                warnings.warn(f"dit_compile: MoE dispatch of {name or type(module).__name__} restored to "
                              f"its original method: {problem}", stacklevel=2)
            continue
        lower = _recogniser(module)
        if lower is None:
            continue
        problem = lower(module)
        if problem is None:
            lowered += 1
        else:
            warnings.warn(f"dit_compile: MoE dispatch of {name or type(module).__name__} left as is: {problem}", stacklevel=2)
    return lowered


# ---------------------------------------------------------------------------------------------------
# Checks for a backend or a report


def _is_moe_op(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and node.target in (torch.ops.dit_compile.moe_ffn.default, torch.ops.dit_compile.moe_ffn)


def count_moe_ops(gm: torch.fx.GraphModule) -> int:
    """Number of ``dit_compile::moe_ffn`` calls in a traced graph."""
    return sum(_is_moe_op(node) for node in gm.graph.nodes)


def find_moe(model: nn.Module) -> dict[str, bool]:
    """Every MoE dispatch in ``model`` this pass knows (recognised class or registered), by module
    path ("" for ``model`` itself), mapped to whether it is lowered. A False entry will break
    Dynamo's graph: call :func:`lower_moe` before ``torch.compile``.

    A module, not a graph: once the dispatch has broken the graph, Dynamo resumes inside the
    module's own frames and ``nn_module_stack`` no longer names the MoE module in the pieces.
    """
    return {
        name: _SPEC_ATTR in module.__dict__
        for name, module in model.named_modules()
        if _SPEC_ATTR in module.__dict__ or _recogniser(module) is not None
    }
