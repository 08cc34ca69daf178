"""The half-batch forward: cfg reuse for pipelines that batch both guidance branches into one call.

CogVideoXPipeline (and PixArt, SD3, LTX, ...) call the transformer once per step with batch 2k:
the latent repeated twice, the text ``cat([negative, positive])``, the timestep expanded. cfg reuse
there means computing only the conditional half (batch k) and rebuilding the unconditional half
from the difference cached at the last step where both were computed. ZImagePipeline batches
lists instead, one latent and one caption per sample (``[latents, latents]``, ``[positive,
negative]``), its conditional half first: the half takes each such list's first k elements, and
its per-sample outputs come back stacked. (A call does not say which half is which prompt; the
pipelines' own orders tell: every tensor-batched DiT pipeline but Lumina-Next's and OmniGen's
puts the negative prompt first, every list-batched one, the Z-Image family, second. Computing the
conditional half keeps the fresh prediction where the guidance weights it most: the rebuilt half's
error enters the guided output scaled by s - 1 instead of s. LuminaPipeline and OmniGenPipeline
batch ``[positive, negative]``: there the unconditional half is computed and the conditional one
rebuilt, the same rule at the larger error.)

Why a second forward and not the pieces: Dynamo under static shapes bakes the batch size into the
graph's view/reshape arguments, so the compiled pieces cannot run batch k. The half-batch forward is
the module's own ``forward``, called through ``torch.func.functional_call`` with the *runtime*
graph inputs as its parameters and buffers: one Dynamo graph serves every instance of a model class
(parameters are graph inputs), so the instance is the one being called, found at each call on the
stack (Dynamo's code of its forward, which runs the graph, has it as ``self``), never the one traced
at compile time: that one may be gone, and its tensors that are neither parameter nor buffer
(Z-Image's rotary table) are its own. Each instance has its half forward so, from one recipe. It
runs eager under ``regions="eager"``, else through its own ``torch.compile``, compiled on first use
(mid-generation, at the first cfg reuse step) by the backend's ``compile_regions``: region by
region, each distinct block once, as the model's own graph is (it was plain Inductor's compile of
the whole forward, every block inlined, at that step), and under ``background_compile`` in a child
process. Inside the executor Dynamo's frame hook is off (the
backend's callable runs under ``torch._dynamo.disable``), so an eager call stays eager and a nested
``torch.compile`` sets its own hook and compiles normally (checked on torch 2.13); so would a
module compiled in place, whose ``__call__`` is compiled: the eager path calls its ``_call_impl``.

``HalfBatch.build`` makes the *recipe* at compile time: each parameter of the module's forward is a
pytree whose tensor leaves are graph inputs (found by identity: Dynamo hands the backend the real
tensors of the first call) and whose other leaves are constants (None, bools, option dicts: Dynamo
guards on what it read of them, so every call that reaches this graph agrees). A tensor the graph
does not take (SD3's last block, ``context_pre_only``, never reads its ControlNet sample) is
passed as zeros of its shape, which Dynamo guards on, expanded from one element. Anything the recipe
cannot account for is a reason not to build it, and the executor then computes the full batch; so
it does, from then on, where the half forward raises (a model this recipe misreads must cost speed,
never the generation).
"""
from __future__ import annotations

import dataclasses
import inspect
import re
import sys
import types
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
from torch.nn.utils.stateless import _reparametrize_module
from torch.utils import _pytree as pytree

_IN, _CONST, _UNUSED = "in", "const", "unused"
# A dynamic size or stride of a tensor input: the half forward reads it off the tensor it passes.
_DERIVED = re.compile(r"\.(size|stride|storage_offset)\(")
_ARGUMENT = re.compile(r"^L\['(\w+)'\](?:\['(\w+)'\])?$")


def _functional(module: torch.nn.Module, state: dict[str, torch.Tensor], args: tuple,
                kwargs: dict[str, Any]) -> Any:
    return torch.func.functional_call(module, state, args, kwargs)


def _functional_eager(module: torch.nn.Module, state: dict[str, torch.Tensor], args: tuple,
                      kwargs: dict[str, Any]) -> Any:
    """The half forward as it is: ``functional_call`` through the module's own ``_call_impl``. A
    module compiled in place (``model.compile(...)``, the only way a pipeline that checks its
    controlnet's class takes one) calls its compiled self from ``__call__``: that would be a call
    of this backend's runtime again, counted as the next step. Not under
    ``torch.compiler.set_stance("force_eager")``: the stance is the process's, and one thread's
    half forward would run another thread's compiled calls eagerly meanwhile (two overlapping
    left it forced for good)."""
    with _reparametrize_module(module, state, tie_weights=True):
        return module._call_impl(*args, **kwargs)


def _own_code(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A copy of ``fn`` with a code object of its own: Dynamo keeps its compiled entries (and its
    recompile limit) per code object, so each recipe compiles apart from every other model's."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__)


@dataclass
class HalfBatch:
    """Runs the module's forward on the conditional half of a batched-CFG call."""
    owner: type                             # the traced module's class: the instance is the caller
    signature: inspect.Signature            # of the bound forward (no self)
    args: dict[str, tuple[pytree.TreeSpec, list[tuple[str, Any]]]]  # name -> (spec, leaf recipes)
    state: list[tuple[str, int]]            # parameter/buffer name -> graph input
    batch_inputs: Mapping[int, int]         # graph inputs that carry the batch -> its dim (of 2k)
    out_shapes: list[tuple[Any, ...]]      # batched graph outputs' shapes past dim 0
    # backend(graph, example inputs, module) -> the half forward's graph compiled; None: eager
    backend: Callable[..., Callable[..., Any]] | None
    # A batch given as lists of per-sample tensors (Z-Image): the list arguments, whose first
    # half (the conditional one there) the half takes; the graph's per-sample outputs (one run)
    # and their shape.
    lists: frozenset[str] = frozenset()
    sample_outs: range = range(0)
    sample_shape: tuple[Any, ...] = ()
    batch: int = 0                          # of the compiling call (2k)
    _fn: Callable[..., Any] | None = field(default=None, repr=False)
    _warned: set[str] = field(default_factory=set, repr=False)
    _broken: str | None = field(default=None, repr=False)   # a decline that no later call escapes

    @classmethod
    def build(cls, module: torch.nn.Module | None, frame: Mapping[str, Any] | None,
              placeholders: Sequence[tuple[str, bool]], example_inputs: Sequence[Any],
              batch_roles: Sequence[int], batch: int,
              out_shapes: Sequence[tuple[Any, ...] | None],
              backend: Callable[..., Callable[..., Any]] | None,
              samples: Sequence[int] = (), sample_outs: Sequence[int] = (),
              numbers: frozenset[int] = frozenset(),
              layered: frozenset[int] = frozenset(),
              before_break: bool = False) -> "HalfBatch | str":
        """The recipe, or why there is none.

        ``placeholders[i]``: graph input i's source name and whether it comes from the module
        (``self``) rather than the call; ``batch_roles``: the graph inputs the region pass named
        latent/text/timestep; ``batch``: the latent's dim 0, or the length of its list;
        ``out_shapes``: the shape of each graph output (None: not a tensor). ``samples``: the
        graph inputs of a latent given as a list of per-sample tensors, ``sample_outs`` the
        graph outputs of the per-sample results (empty where the latent is one tensor).
        ``numbers``: graph inputs Dynamo made of the module's Python numbers (a norm's eps under
        dynamic=True, a new tensor at every call): the forward reads those from the module.
        ``layered``: graph inputs the graph only indexes along dim 0, by integers (HiDream's
        Llama states, ``(layers, batch, tokens, dim)``, one layer's taken at a time): where their
        dim 1 is the batch, it is the dim halved. ``before_break``: ``example_inputs`` are
        those of the forward's first graph, cut by a graph break before its blocks
        (runtime.relay): a tensor argument it does not take may be read after the break, so it
        is a reason, not zeros; ``out_shapes`` are then the last graph's, given later
        (``for_outputs``)."""
        if module is None or frame is None:
            return "the traced module or its call arguments are unknown"
        forward = _bind_forward(module, frame)
        if isinstance(forward, str):
            return forward
        sig, bound = forward
        # Arguments are matched to graph inputs by identity: Dynamo hands the backend the real
        # tensors of the first call, which fake ones are not.
        if any(isinstance(x, torch._subclasses.FakeTensor) for x in example_inputs):
            return "the backend was given fake example inputs, so arguments cannot be matched"
        index = {id(x): i for i, x in enumerate(example_inputs) if isinstance(x, torch.Tensor)}
        # A batch given as lists of per-sample tensors (Z-Image) is halved as lists: their
        # elements are whole samples, neither per-sample leaves nor halved themselves.
        lists = {name for name, value in bound.items() if samples and _sample_list(value, index, batch)}
        taken = _argument_recipes(type(module).__name__, bound, frame, placeholders, example_inputs,
                                  index, lists, batch, before_break)
        if isinstance(taken, str):
            return taken
        args, covered, per_sample = taken
        if samples and not any(set(samples) <= {index[id(x)] for x in bound[n]} for n in lists):
            return "the per-sample latents are not one list argument of forward"
        # What no argument covers is the module's own, taken from the instance called.
        state = _state_inputs(module, frame, placeholders, example_inputs, covered, numbers)
        if isinstance(state, str):
            return state
        one_run = _one_run(batch, samples, sample_outs)
        if isinstance(one_run, str):
            return one_run
        listed = {index[id(x)] for n in lists for x in bound[n]}
        batch_inputs = _batch_dims(placeholders, example_inputs, batch_roles, per_sample, listed,
                                   layered, batch)
        if isinstance(batch_inputs, str):
            return batch_inputs
        recipe = cls(type(module), sig, args, state, batch_inputs, [], backend, frozenset(lists),
                     one_run, batch=batch)
        return recipe if before_break else recipe.for_outputs(out_shapes)

    def for_outputs(self, out_shapes: Sequence[tuple[Any, ...] | None]) -> "HalfBatch | str":
        """This recipe for a graph with outputs of these shapes (None: not a tensor), or why it
        cannot be: each output must carry the batch in dim 0, as the half's will in its half."""
        one_run = self.sample_outs
        batched = [sh for j, sh in enumerate(out_shapes) if j not in one_run]
        if (not out_shapes or any(not sh or sh[0] != self.batch for sh in batched)
                or any(out_shapes[j] is None for j in one_run)):
            return "an output of the graph does not carry the batch in dim 0"
        return dataclasses.replace(self, out_shapes=[tuple(sh[1:]) for sh in batched],
                                   sample_shape=out_shapes[one_run.start] if one_run else ())

    def __call__(self, env: Sequence[Any], k: int,
                 module: torch.nn.Module | None = None) -> list[torch.Tensor] | None:
        """The graph's outputs for the conditional half of the batch (``half``), or None (with
        a warning, once per reason) where this call cannot take the half-batch path. Per-sample
        outputs come stacked, first (as the executor holds them). ``module``: the instance
        called, found on the stack where not given."""
        if self._broken is not None:
            return self._decline(self._broken)
        module = module if module is not None else _called(self.owner)
        if module is None:
            return self._decline(f"no {self.owner.__name__} calls this graph on the stack (called "
                                 "by other code than the forward Dynamo traced)")
        arguments = {}
        for name in self.signature.parameters:
            if name in self.args:
                spec, recipe = self.args[name]
                leaves = [self._leaf(env, r, k) for r in recipe]
                arguments[name] = (leaves[self.half(k)] if name in self.lists
                                   else pytree.tree_unflatten(leaves, spec))
        call = inspect.BoundArguments(self.signature, arguments)
        state = {name: env[i] for name, i in self.state}
        try:
            out = self._forward(module)(module, state, call.args, call.kwargs)
        except torch.OutOfMemoryError:
            raise       # passing: the call is retried (executor), the half forward not given up
        except Exception as e:  # a cfg reuse step must never end the generation
            # The full batch is still computable; a forward that failed once fails again.
            self._broken = f"the half-batch forward raised {type(e).__name__}: {_first_line(e)}"
            return self._decline(self._broken)
        outs = [x for x in pytree.tree_leaves(out) if isinstance(x, torch.Tensor)]
        first = self.sample_outs.start
        one_run = outs[first:first + k] if self.sample_outs else []
        outs = outs[:first] + outs[first + k:] if self.sample_outs else outs
        if not (_shapes_match(outs, k, self.out_shapes) and len(one_run) == len(self.sample_outs) // 2
                and _shapes_match([x[None] for x in one_run], 1, [self.sample_shape] * len(one_run))):
            # Not worth a half forward per call to find out again.
            self._broken = "the module's outputs do not match the graph's outputs"
            if len(outs) + len(one_run) < len(self.out_shapes) + len(self.sample_outs) // 2:
                # Dynamo returns what the forward wrote into its arguments too (SD3's IP-Adapter
                # path adds its image tokens to joint_attention_kwargs), the module its result.
                self._broken += (f" (the graph returns {len(self.out_shapes)} tensors, the module "
                                 f"{len(outs)}: the forward writes values into an argument or an "
                                 "attribute, which Dynamo returns too, as SD3's IP-Adapter path "
                                 "writes into joint_attention_kwargs)")
            return self._decline(self._broken)
        return [torch.stack(one_run), *outs] if one_run else outs

    @property
    def conditional_first(self) -> bool:
        """Which half is the conditional one: the first where the batch comes as lists
        (``[positive, negative]``, the Z-Image family's order), else the second (``[negative,
        positive]``, every tensor-batched pipeline's)."""
        return bool(self.lists)

    def half(self, k: int) -> slice:
        """The conditional half of a batch of 2k."""
        return slice(0, k) if self.conditional_first else slice(k, 2 * k)

    def _leaf(self, env: Sequence[Any], recipe: tuple[str, Any], k: int) -> Any:
        kind, v = recipe
        if kind == _CONST:
            return v
        if kind == _UNUSED:
            shape, dtype, device, per_sample = v
            shape = (k, *shape[1:]) if per_sample else shape
            return torch.zeros((), dtype=dtype, device=device).expand(shape)
        x = env[v]
        dim = self.batch_inputs.get(v)
        if dim is not None and x.dim() > dim and x.shape[dim] == 2 * k:
            return x[(slice(None),) * dim + (self.half(k),)]
        return x

    def _forward(self, module: torch.nn.Module) -> Callable[..., Any]:
        if self._fn is None and self.backend is None:
            self._fn = _functional_eager
        elif self._fn is None:
            # The instance compiled for (weakly: the recipe outlives it) is where a background
            # compile is registered for wait_for_compiles.
            first, backend = weakref.ref(module), self.backend
            # dynamic=False: the pieces are static-shape graphs, and so is this one; without it
            # Dynamo would mark the batch dynamic on the first shape change.
            self._fn = torch.compile(_own_code(_functional), dynamic=False,
                                     backend=lambda gm, inputs: backend(gm, inputs, first()))
        return self._fn

    def _decline(self, why: str) -> None:
        if why not in self._warned:
            self._warned.add(why)
            warnings.warn(f"mixcache: {self.owner.__name__}: batched-CFG call: {why}; computing "
                          "the full batch instead of one half", stacklevel=3)
        return None


# The recipe's steps (``HalfBatch.build`` calls them in order): each returns its part of the recipe,
# or, as a str, why there is none.

_Recipes = dict[str, tuple[pytree.TreeSpec, list[tuple[str, Any]]]]


def _bind_forward(module: torch.nn.Module, frame: Mapping[str, Any]
                  ) -> tuple[inspect.Signature, dict[str, Any]] | str:
    """The signature of ``module``'s bound forward and the traced call's arguments by parameter
    name (``_bind``), or why they cannot be read."""
    try:
        sig = inspect.signature(module.forward)
        bound = _bind(sig, frame)
    except (TypeError, ValueError) as e:
        return f"cannot read the arguments of {type(module).__name__}.forward ({e})"
    if bound is None:
        return f"cannot read the arguments of {type(module).__name__}.forward"
    return sig, bound


def _argument_recipes(owner: str, bound: Mapping[str, Any], frame: Mapping[str, Any],
                      placeholders: Sequence[tuple[str, bool]], example_inputs: Sequence[Any],
                      index: Mapping[int, int], lists: set[str], batch: int, before_break: bool
                      ) -> tuple[_Recipes, set[int], set[int]] | str:
    """Each argument of forward (``bound``) as a pytree spec and leaf recipes: a graph input
    (``index``: tensor id -> graph input), a constant, or an unused tensor's shape (passed as
    zeros). Returns the recipes, the graph inputs they cover, and the graph inputs of the
    batch-sized tensors inside an argument (``_per_sample_leaves``; not of the per-sample
    ``lists``); or, under ``before_break``, why an unused tensor argument cannot be passed
    (``owner``: the module's class name, for that reason)."""
    args: _Recipes = {}
    covered: set[int] = set()
    per_sample: set[int] = set()
    # Numbers the call passes as arguments of their own that Dynamo made dynamic (LTX's
    # height and width, once a generation at another size recompiled): graph inputs, taken
    # from each call as tensors are.
    number_inputs = {name: i for i, ((source, _), x) in enumerate(zip(placeholders, example_inputs))
                     if isinstance(x, (int, float, torch.SymInt, torch.SymFloat))
                     for name in [_argument(source, frame, bound)] if name}
    for name, value in bound.items():
        leaves, spec = pytree.tree_flatten(value)
        recipe = []
        if (name in number_inputs and isinstance(value, (int, float))
                and not isinstance(value, bool)):
            covered.add(number_inputs[name])
            args[name] = (spec, [(_IN, number_inputs[name])])
            continue
        for leaf in leaves:
            if isinstance(leaf, torch.Tensor) and id(leaf) in index:
                recipe.append((_IN, index[id(leaf)]))
                covered.add(index[id(leaf)])
            elif isinstance(leaf, torch.Tensor) and before_break:
                return (f"the argument {name} of {owner}.forward is read "
                        "only after the graph break, where the half forward cannot be "
                        "handed it")
            elif isinstance(leaf, torch.Tensor):
                recipe.append((_UNUSED, (tuple(leaf.shape), leaf.dtype, leaf.device,
                                         leaf.dim() >= 1 and leaf.shape[0] == batch)))
            else:
                recipe.append((_CONST, leaf))
        if isinstance(value, torch.Tensor):
            if id(value) in index:
                per_sample.add(index[id(value)])
        elif name not in lists:
            per_sample |= _per_sample_leaves(value, index, batch)
        args[name] = (spec, recipe)
    return args, covered, per_sample


def _state_inputs(module: torch.nn.Module, frame: Mapping[str, Any],
                  placeholders: Sequence[tuple[str, bool]], example_inputs: Sequence[Any],
                  covered: set[int], numbers: frozenset[int]) -> list[tuple[str, int]] | str:
    """The graph inputs the arguments do not cover (``covered``) that are the module's parameters
    or buffers, by name, for ``functional_call``; or why a graph input is neither an argument's
    nor the module's (``numbers``: see ``HalfBatch.build``)."""
    named = {id(t): n for n, t in (*module.named_parameters(remove_duplicate=False),
                                   *module.named_buffers(remove_duplicate=False))}
    state = []
    for i, ((source, from_module), x) in enumerate(zip(placeholders, example_inputs)):
        if (isinstance(x, (int, float, torch.SymInt, torch.SymFloat)) and i not in covered
                and not source.startswith(("L['self']", "self")) and not _DERIVED.search(source)):
            # A dynamic number the call passes inside another argument: the recipe would hold
            # this call's value as a constant, and a later call at another value get it.
            return (f"graph input {source} is a number the call passes, which this graph "
                    "takes at any value, and the half forward would replay the compiling "
                    "call's")
        if not isinstance(x, torch.Tensor) or i in covered or (from_module and i in numbers):
            continue
        if not from_module and isinstance(_resolve(source, frame), (int, float)):
            # A float inside an argument (a LoRA scale in attention_kwargs), which Dynamo
            # passes as a tensor once a second value made it dynamic.
            return (f"graph input {source} is a number the call passes inside an argument, "
                    "which this graph takes at any value, and the half forward would replay "
                    "the compiling call's")
        if not from_module:
            return f"graph input {source} is not a tensor argument of forward"
        if id(x) in named:
            state.append((named[id(x)], i))
        # Any other tensor of the module's (a table kept as a plain attribute) is read by the
        # forward from the instance called, which is where Dynamo took this input from.
    return state


def _one_run(batch: int, samples: Sequence[int], sample_outs: Sequence[int]) -> range | str:
    """The graph outputs of the per-sample results (empty where the latent is one tensor), or why
    the batch is not two halves or those outputs are not one run of ``batch`` of them."""
    if batch < 2 or batch % 2:
        return f"the batch ({batch}) is not two halves"
    one_run = range(min(sample_outs, default=0), max(sample_outs, default=-1) + 1)
    if list(sample_outs) != list(one_run) or (samples and len(one_run) != batch):
        return "the per-sample outputs are not one list of the graph's outputs"
    return one_run


def _batch_dims(placeholders: Sequence[tuple[str, bool]], example_inputs: Sequence[Any],
                batch_roles: Sequence[int], per_sample: set[int], listed: set[int],
                layered: frozenset[int], batch: int) -> dict[int, int] | str:
    """The graph inputs that carry the batch, each with the dim it is in (halved there by the
    half forward), from the region pass's ``batch_roles`` and the arguments' ``per_sample``
    tensors, less the ``listed`` elements of per-sample lists; or why a tensor's batch is in a
    dim that cannot be told (``layered``: see ``HalfBatch.build``)."""
    # The region pass's latent/text/timestep, any other tensor passed as an argument of its
    # own, and the batch-sized tensors inside an argument (see _per_sample_leaves): all carry
    # the batch when their dim 0 is 2k. Elements of a per-sample list are whole samples.
    batch_inputs = dict.fromkeys(sorted((set(batch_roles) | per_sample) - listed), 0)
    for i in batch_inputs.keys() - set(batch_roles):
        # A tensor whose batch is in another dim: passed whole, the forward's view to its
        # batch would fold both prompts into one sample. Halved in dim 1 where the graph
        # takes it one index of dim 0 at a time (HiDream's Llama states), else refused.
        x = example_inputs[i]
        if i in layered and isinstance(x, torch.Tensor) and x.dim() > 1 and x.shape[1] == batch:
            batch_inputs[i] = 1     # dim 0 indexes layers, even where it is as long
            continue
        if (isinstance(x, torch.Tensor) and x.dim() > 1 and x.shape[0] != batch
                and batch in x.shape[1:]):
            dim = list(x.shape).index(batch, 1)
            return (f"graph input {placeholders[i][0]} {tuple(x.shape)} carries the batch "
                    f"({batch}) in dim {dim}, not dim 0, where the graph does not take it one "
                    "index of dim 0 at a time, so the half forward cannot tell which dim to "
                    "halve")
    return batch_inputs


def _called(owner: type) -> torch.nn.Module | None:
    """The instance of ``owner`` whose call runs this graph: the nearest frame on the stack that
    holds one as ``self`` (Dynamo's code of its forward, or of a decorator around it) or ``fn``
    (a wrapper's), as the frame Dynamo traced did."""
    frame = sys._getframe(1)
    while frame is not None:
        names = frame.f_code.co_varnames
        for key in ("self", "fn"):
            if key in names and type(frame.f_locals.get(key)) is owner:
                return frame.f_locals[key]
        frame = frame.f_back
    return None


def _argument(source: str, frame: Mapping[str, Any], bound: Mapping[str, Any]) -> str | None:
    """The argument of forward a graph input's source names, where it is one of its own:
    ``L['height']``, or ``L['kwargs']['height']`` where the frame is a wrapper's taking
    ``**kwargs`` (diffusers' ``apply_lora_scale``); None for anything inside an argument."""
    m = _ARGUMENT.match(source)
    if m is None:
        return None
    outer, inner = m.groups()
    if inner is None:
        return outer if outer in bound and frame.get(outer) == bound[outer] else None
    holder = frame.get(outer)
    if (outer in bound or not isinstance(holder, Mapping) or inner not in bound
            or holder.get(inner) != bound[inner]):
        return None
    return inner


_INDEX = re.compile(r"\[(?:'([^']*)'|(\d+))\]")


def _resolve(source: str, frame: Mapping[str, Any]) -> Any:
    """The value a graph input's source (``L['kwargs']['attention_kwargs']['scale']``) names in
    the traced frame, or None where it names something else."""
    if not source.startswith("L["):
        return None
    value: Any = frame
    rest = source[1:]
    while rest:
        m = _INDEX.match(rest)
        if m is None:
            return None
        key, i = m.groups()
        try:
            value = value[key] if key is not None else value[int(i)]
        except (KeyError, IndexError, TypeError):
            return None
        rest = rest[m.end():]
    return value


def _per_sample_leaves(value: Any, index: Mapping[int, int], batch: int) -> set[int]:
    """The graph inputs of the tensors inside an argument whose dim 0 is the batch. In a dict,
    any rank: diffusers passes per-sample conditions this way (PixArt's ``added_cond_kwargs``
    resolution and aspect ratio, SD3's ``joint_attention_kwargs`` image embeddings). In a list or
    tuple, only those of rank 3 and more: ControlNet samples per block (batch, tokens, dim) come
    this way, and so do rotary tables and position ids (tokens, dim), whose dim 0 is a length that
    may equal the batch. A tensor sized otherwise at compile time is not per sample, whatever its
    size at run time."""
    least = 1 if isinstance(value, Mapping) else 3
    return {index[id(x)] for x in pytree.tree_leaves(value) if isinstance(x, torch.Tensor)
            and id(x) in index and x.dim() >= least and x.shape[0] == batch}


def _sample_list(value: Any, index: Mapping[int, int], batch: int) -> bool:
    """A list of ``batch`` graph-input tensors, one per sample: Z-Image takes its latents and its
    captions (each of its own length) so."""
    return (isinstance(value, (list, tuple)) and len(value) == batch
            and all(isinstance(x, torch.Tensor) and id(x) in index for x in value))


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else "(no message)"


def _shapes_match(outs: Sequence[torch.Tensor], k: int, shapes: Sequence[tuple[Any, ...]]) -> bool:
    """The module's tensor outputs, in pytree order, against the graph's (Dynamo's graph returns
    the tensors of the forward's result in the order it rebuilds that result); symbolic sizes of a
    dynamic-shape graph are not compared."""
    if len(outs) != len(shapes):
        return False
    for o, sh in zip(outs, shapes):
        if o.dim() != len(sh) + 1 or o.shape[0] != k:
            return False
        if any(isinstance(d, int) and d != e for d, e in zip(sh, o.shape[1:])):
            return False
    return True


def _bind(sig: inspect.Signature, frame: Mapping[str, Any]) -> dict[str, Any] | None:
    """The forward's arguments from the traced frame's locals: the forward itself (its parameters
    are locals), or a decorator's ``wrapper(self, *args, **kwargs)`` around it (diffusers'
    ``apply_lora_scale``)."""
    names = list(sig.parameters)
    if all(n in frame for n in names):
        return {n: frame[n] for n in names}
    if isinstance(frame.get("args"), tuple) and isinstance(frame.get("kwargs"), dict):
        return dict(sig.bind(*frame["args"], **frame["kwargs"]).arguments)
    return None


def guidance_groups(latent: torch.Tensor, timestep: torch.Tensor,
                    text: torch.Tensor | list[torch.Tensor] | None = None) -> int:
    """How many guidance branches one call batches as equal groups of samples: 2 where the latent
    (and a per-sample timestep) is two equal halves (batched CFG, ``[uncond, cond]``), 3 for three
    equal thirds (perturbed-attention guidance's ``[uncond, cond, perturbed]``), else 1. Halves
    first, as the pipelines batch most; ``[a, b, a, b, a, b]`` (PAG, two images a prompt) is thirds.
    A latent of equal samples is both: ``text`` (one per sample) then tells PAG's, whose last two
    thirds share the prompt, from CFG's, whose middle third holds both prompts."""
    n = latent.shape[0] if latent.dim() else 0
    per_sample = timestep.dim() >= 1 and timestep.shape[0] == n
    for g in (2, 3):
        if n >= g and n % g == 0 and (not per_sample or _equal_groups(timestep, g)) and (
                _equal_groups(latent, g)):
            if g == 2 and n % 3 == 0 and _equal_groups(latent, 3) and _perturbed(text, n):
                continue
            return g
    return 1


def _perturbed(text: torch.Tensor | list[torch.Tensor] | None, n: int) -> bool:
    """Whether the per-sample ``text`` of a batch of ``n`` has equal second and third thirds (PAG's
    cond and perturbed branches; under CFG the second third spans both prompts)."""
    if text is None or (isinstance(text, torch.Tensor) and text.dim() == 0) or len(text) != n:
        return False
    k = n // 3
    if isinstance(text, torch.Tensor):
        return torch.equal(text[k:2 * k], text[2 * k:])
    return all(torch.equal(a, b) for a, b in zip(text[k:2 * k], text[2 * k:]))


def _equal_groups(x: torch.Tensor, g: int) -> bool:
    k = x.shape[0] // g
    return all(torch.equal(x[:k], x[i * k:(i + 1) * k]) for i in range(1, g))


def is_batched_cfg(text: torch.Tensor | list[torch.Tensor], batch: int) -> bool:
    """Both guidance branches in one batch, given latent halves (``guidance_groups`` 2): the text
    halves differ. Two halves of one text ([cond, perturbed], PAG without CFG) are not a cfg
    difference. ``text`` a list: one per sample (Z-Image's captions, each of its own length),
    ``batch`` the latent's."""
    if (isinstance(text, torch.Tensor) and text.dim() == 0) or len(text) != batch:
        return False
    k = batch // 2
    if isinstance(text, torch.Tensor):
        return not torch.equal(text[:k], text[k:])
    return any(not torch.equal(a, b) for a, b in zip(text[:k], text[k:]))
