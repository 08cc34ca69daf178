"""Ahead-of-time export of the rewritten model: regions as ``torch.export`` programs, the runtime's
plan as data, the weights as tensors; ``load`` runs it with no model source.

    dit_compile.export(transformer, "wan.dit", dict(hidden_states=x, timestep=t,
                       encoder_hidden_states=e, return_dict=False), options={"cache": "balanced"})
    model = dit_compile.load("wan.dit")           # diffusers need not be installed
    out = model(hidden_states=x, timestep=t, encoder_hidden_states=e, return_dict=False)

What is saved (a directory, written beside the path and renamed into place once complete):
``manifest.json`` (format version, torch version, the options, the model's diffusers config, the
autocast state, each tensor argument's structure, where each graph input comes from: a keyword
argument (a path into it) or a saved tensor, which program each piece runs (none for a piece
that computes nothing; a last block whose other outputs nothing reads runs a mate's and keeps
its outputs), the executor's layout: slots, guard positions,
FLOP shares; the graph's output spec and the structure the call returned around it),
``program_<k>.pt2`` (``torch.export.save``; one per distinct region, so a 30-block stack saves its
block once; with ``aoti=True`` also ``program_<k>.aoti.pt2``, AOTInductor's package of it) and
``tensors.pt`` (parameters and buffers, by graph input); where the cache decides on the first
block's modulated input (TeaCache), ``program_modulation.pt2``, that input's graph. Decisions stay
explicit: the layout is what the backend decided at compile time, and the cache policy is rebuilt
from the saved options, so a loaded model caches exactly as ``backend="mixcache"`` with those
options does.

MoE dispatches that sync to the host (HiDream's, NucleusMoE's) are lowered while exporting, as the
backend lowers them (option ``lower_moe``), and restored after: the programs hold the fused op.
diffusers' layerwise casting is given its traceable form (``passes.casting``), as the backend does:
the programs cast each layer's weights from the storage dtype they are saved in.

The export is of one input signature (the shapes of the example call), as ``torch.export`` is;
batched-CFG calls (cfg reuse on batch halves) compute the full batch. A model Dynamo cannot trace
as one graph (shapes that depend on data, as Lumina2's and HunyuanImage's token masks make them)
cannot be exported: the error says so and points to ``explain``. ``load`` runs AOTInductor's
packages where the export made them, else the programs as exported (their ``module()``).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import json
import operator
import os
import re
import shutil
import tempfile
import threading
import warnings
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from .checks import expect_module, unwrap
from .frames import (forget_forward, forward_forgotten, own_backends, recompiles_allowed,
                     shape_history_kept)
from .options import Options
from .passes.casting import functional_casting
from .passes.inputs import missing_inputs, source_name, user_inputs
from .passes.modulation import Modulation
from .passes.moe import lowered_meanwhile
from .passes.regions import NoBlockStructure, find_regions
from .passes.split import pruned_twins, split
from .runtime.cache import StateFactory
from .runtime.executor import Executor, GuardedExecutor, kept_outputs
from .runtime.policy import make_policy
from .slots import anchor_slot, modulation_of

FORMAT = 2
READS = (1, 2)      # 2: a piece may run another's program, keeping some outputs
_NO_HALVES = "an exported model has no half-batch forward"
_MODULATION = "modulation"      # the program of TeaCache's signal, beside the numbered pieces


def export(model: torch.nn.Module, path: str, kwargs: dict[str, Any],
           options: dict[str, Any] | None = None, aoti: bool = False) -> None:
    """Trace ``model(**kwargs)`` as ``torch.compile`` does, rewrite it as ``backend="mixcache"``
    with ``options`` does, and save it under ``path`` (module docstring). Tensor keyword arguments
    are the loaded model's inputs; plain values (numbers, strings, lists, dicts, None) are fixed
    at the values given here; another object (a KV cache) is refused.
    ``aoti``: also compile each program ahead of time with AOTInductor, for the device of the
    example inputs (``load`` then runs the compiled packages: no compile at load time).

    Runs the model once eagerly where its first call breaks the graph (a table built lazily).
    Leaves Dynamo nothing of its trace: the model's forward code is forgotten, so a compiled model
    sharing that code (the same class, or diffusers' decorator around ``forward``) traces again at
    its next call; other compiled code keeps its graphs."""
    from .sketch import refuse_split
    refuse_split(model, "export")
    opts = Options.parse(options)
    if not isinstance(kwargs, dict):
        raise TypeError(f"dit_compile.export: kwargs must be a dict of the forward's keyword "
                        f"arguments (as the model is called: model(**kwargs)), not "
                        f"{type(kwargs).__name__}")
    # A compiled model (pipe.transformer once torch.compile'd) is exported as the model itself:
    # its name, forward signature, config and attributes are the model's, not the wrapper's.
    model = unwrap(model)
    expect_module(model, "dit_compile.export exports")
    if isinstance(model, Exported):
        raise ValueError(f"dit_compile.export: this is a loaded export (of {model.model_name}), "
                         "whose programs are already rewritten: export the model it came from")
    # 0. lowering: layerwise casting's hooks in their traceable form (no result changes: the
    #    programs hold the casts, and the weights stay in the storage dtype), and MoE dispatches
    #    that would break the graph, for the export only.
    functional_casting(model)
    with lowered_meanwhile(model, opts.lower_moe):
        _export(model, path, kwargs, opts, aoti)


def _export(model: torch.nn.Module, path: str, kwargs: dict[str, Any], opts: Options,
            aoti: bool) -> None:
    _check_target(path)
    keywords = _keywords(kwargs, _defaults(model))
    # 1. trace and rewrite: one Dynamo graph, its regions and pieces (the backend's passes).
    traced = _capture(model, kwargs)
    if traced.why is not None:
        raise ValueError(f"dit_compile.export: {type(model).__name__}: {traced.why}; export needs "
                         "the block structure the backend rewrites")
    # 2. everything that can refuse the export, before anything is written: the executor the
    #    backend would build (the cache policy against the block count), the inputs, the
    #    manifest as JSON.
    executor = _executor(traced, opts, type(model).__name__)
    sources, tensors = _sources(traced)
    manifest = _manifest(model, traced, executor, opts, sources, keywords, aoti)
    _json(manifest)
    # 3. written into a sibling directory that replaces ``path`` once complete: a failure leaves
    #    the export there before intact, never programs of one export beside another's tensors.
    with _staged(path) as staging:
        manifest["programs"] = _save_programs(traced, staging, aoti)
        manifest["modulation"] = _save_modulation(traced, executor, staging, aoti)
        torch.save(tensors, os.path.join(staging, "tensors.pt"))
        with open(os.path.join(staging, "manifest.json"), "w") as f:
            f.write(_json(manifest) + "\n")


def _manifest(model: torch.nn.Module, traced: "_Traced", executor: Executor,
              opts: Options, sources: list[dict[str, Any]],
              keywords: dict[str, dict[str, Any]], aoti: bool) -> dict[str, Any]:
    """The manifest (module docstring), its programs and modulation left to be written."""
    config = dict(getattr(model, "config", None) or {})   # diffusers' models: what pipelines read
    return {"format": FORMAT, "torch": torch.__version__, "model": type(model).__name__,
            "config": {k: v for k, v in config.items() if _plain(v)},
            "attributes": _attributes(model),
            "positional": _positional(model),
            "dtype": str(getattr(model, "dtype", "")).removeprefix("torch.") or None,
            "options": _saved_options(opts), "n_blocks": len(traced.rmap.guarded),
            "inputs": sources, "keywords": keywords, "programs": [],
            "aoti": aoti,
            "guarded": isinstance(executor, GuardedExecutor), "layout": executor.layout(),
            "modulation": None,
            "out_spec": pytree.treespec_dumps(executor.out_spec),
            "returns": {"spec": traced.returns[0], "leaves": traced.returns[1]},
            "autocast": _autocast(sorted({s["device"] for s in sources if "device" in s}))}


def _autocast(devices: list[str]) -> dict[str, str | None]:
    """The autocast state the call was traced under, per device its inputs are on: the dtype, or
    None where autocast is off. The programs hold its casts (or none), so a loaded model called
    under another state would run what it was not traced for."""
    return {d: str(torch.get_autocast_dtype(d)).removeprefix("torch.")
            if torch.is_autocast_enabled(d) else None for d in devices}


def _saved_options(opts: Options) -> dict[str, Any]:
    """The parsed options as plain data (the caller may have given an ``Options``, which JSON
    cannot hold); ``load`` parses them again."""
    saved = dataclasses.asdict(opts)
    bad = [k for k, v in saved.items() if not _plain(v)]
    if bad:
        raise ValueError(f"dit_compile.export: option {bad[0]}={saved[bad[0]]!r} cannot be saved "
                         "with the model (not plain data: numbers, strings, lists, dicts); give "
                         "it as plain data")
    return saved


def _json(manifest: dict[str, Any]) -> str:
    try:
        return json.dumps(manifest, indent=1)
    except TypeError as e:      # a constant among the graph's outputs that JSON cannot hold
        raise ValueError(f"dit_compile.export: {e}: the model's output cannot be saved") from None


def _check_target(path: str) -> None:
    """``path`` is replaced whole by the export: refused where that would delete what is no
    export (a file, a directory of other files)."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"dit_compile.export: {path} is a file; export writes a directory "
                         "there: give another path")
    if (os.path.isdir(path) and os.listdir(path)
            and not os.path.exists(os.path.join(path, "manifest.json"))):
        raise ValueError(f"dit_compile.export: {path} holds files and no export; export replaces "
                         "the directory whole: give a new or empty directory")


@contextlib.contextmanager
def _staged(path: str) -> Iterator[str]:
    """A fresh sibling directory of ``path`` to write into, renamed to ``path`` (the directory
    there before removed) only when the block completes; removed where it raises."""
    path = os.path.abspath(path)
    parent, name = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{name}.", suffix=".partial", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)      # as os.makedirs would make it, not mkdtemp's 0700
    old = staging.removesuffix(".partial") + ".old"
    try:
        yield staging
        if os.path.isdir(path):
            os.rename(path, old)
        os.rename(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if os.path.isdir(old) and not os.path.exists(path):
            os.rename(old, path)        # the swap itself failed: the old export back in place
        raise
    shutil.rmtree(old, ignore_errors=True)


def _save_programs(traced: "_Traced", path: str, aoti: bool) -> list[Any]:
    """Each distinct piece saved once (``_save_program``); the program each piece runs, None for
    a piece that computes nothing (Motif-Video's glue between its stacks: no outputs, no writes
    into its inputs), which torch.export.save cannot save and the loaded model need not run. A
    last block that returns some of what a mate returns (``split.pruned_twins``) runs the
    mate's program, keeping those outputs: ``[program, outputs kept, returns one value]``; so
    does a piece that only writes into its inputs (glue filling a KV cache), keeping none of the
    one output it is saved with (``_with_an_output``)."""
    twins = pruned_twins(traced.plan)
    programs: dict[str, int] = {}
    uses: list[Any] = []
    for i, piece in enumerate(traced.plan.pieces):
        if not piece.outs and not piece.writes_in_place():
            uses.append(None)
            continue
        saved = traced.plan.pieces[twins[i][0]] if i in twins else piece
        key = saved.signature()
        if key not in programs:
            programs[key] = len(programs)
            module = saved.module if saved.outs else _with_an_output(saved.module)
            _save_program(traced, module, saved.args, path, programs[key], aoti)
        uses.append([programs[key], list(twins[i][1]), piece.single] if i in twins
                    else [programs[key], [], False] if not saved.outs else programs[key])
    return uses


def _with_an_output(module: fx.GraphModule) -> fx.GraphModule:
    """``module``, which returns nothing, returning an empty tensor as well: torch.export.save
    fails on a program without outputs ("not enough values to unpack"), which a piece that only
    writes into its inputs is."""
    gm = fx.GraphModule(module, copy.deepcopy(module.graph))
    out = gm.graph.output_node()
    with gm.graph.inserting_before(out):
        empty = gm.graph.call_function(torch.empty, ((0,),))
    out.args = ((empty,),)
    gm.recompile()
    return gm


def _save_program(traced: "_Traced", module: fx.GraphModule, slots: tuple[int, ...], path: str,
                  name: int | str, aoti: bool) -> None:
    """``torch.export`` ``module``, which reads ``slots``, from the real inputs where it reads
    graph inputs and zeros of the traced shapes elsewhere (export traces, values do not matter),
    as ``program_<name>.pt2`` (and AOTInductor's package of it)."""
    plan, inputs = traced.plan, traced.inputs
    # Detached: the program keeps its example inputs, and a parameter of a model that has run
    # under the backend carries its cache state, which must not be pickled with them.
    args = tuple(_detached(inputs[s]) if s < plan.n_inputs else _zeros_like(plan.slot_examples[s])
                 for s in slots)
    _sym_sum_as_adds(module)
    with torch.no_grad():
        ep = torch.export.export(module, args)
    torch.export.save(ep, os.path.join(path, f"program_{name}.pt2"))
    if aoti:
        torch._inductor.aoti_compile_and_package(
            ep, package_path=os.path.join(path, f"program_{name}.aoti.pt2"))


def _sym_sum_as_adds(module: fx.GraphModule) -> None:
    """``torch.sym_sum`` calls (Dynamo's graph of Mochi holds one) rewritten in place as a chain
    of ``operator.add``, which computes the same: torch.export keeps sym_sum, and
    torch.export.save cannot serialize it."""
    graph = module.graph
    nodes = [n for n in graph.nodes if n.op == "call_function" and n.target is torch.sym_sum]
    for n in nodes:
        terms = list(n.args[0])
        with graph.inserting_before(n):
            total = terms[0] if terms else 0
            for term in terms[1:]:
                total = graph.call_function(operator.add, (total, term))
        n.replace_all_uses_with(total)
        graph.erase_node(n)
    if nodes:
        module.recompile()


def _detached(x: Any) -> Any:
    return x.detach() if isinstance(x, torch.Tensor) else x


def _executor(traced: "_Traced", opts: Options, name: str) -> Executor:
    policy = make_policy(opts.cache, len(traced.rmap.guarded))
    fns = [None] * len(traced.plan.pieces)
    if policy is None:
        return Executor(traced.plan, fns)
    missing = missing_inputs(traced.rmap.inputs)
    if missing:
        raise ValueError(f"dit_compile.export: {missing}, so nothing can be cached; "
                         "export with options={'cache': None}")
    from .flops import piece_flops
    states = StateFactory(None, False, timestep=opts.timestep)
    return GuardedExecutor(traced.plan, fns, policy, states, traced.anchor,
                           piece_flops(traced.plan, traced.inputs), _NO_HALVES,
                           modulation_of(traced.plan, policy, name))


def _save_modulation(traced: "_Traced", executor: Executor, path: str, aoti: bool
                     ) -> dict[str, Any] | None:
    """The first block's modulated input (TeaCache's signal), where the executor decides on it:
    its graph exported as a program of its own, and the slots it reads."""
    mod = getattr(executor, "modulation", None)
    if mod is None:
        return None
    _save_program(traced, mod.module, mod.args, path, _MODULATION, aoti)
    return {"args": list(mod.args), "piece": mod.piece}


def _sources(traced: "_Traced") -> tuple[list[dict[str, Any]], dict[str, torch.Tensor]]:
    sources: list[dict[str, Any]] = []
    tensors: dict[str, torch.Tensor] = {}
    for i, (keyword, x) in enumerate(zip(traced.keywords, traced.inputs)):
        if keyword is not None:
            sources.append({"argument": keyword, "shape": list(x.shape), "stride": list(x.stride()),
                            "dtype": str(x.dtype).removeprefix("torch."),
                            "device": x.device.type})
        elif isinstance(x, torch.Tensor):
            tensors[str(i)] = x.detach()
            sources.append({"tensor": str(i)})
        else:
            raise ValueError(f"dit_compile.export: graph input {i} is a {type(x).__name__}, "
                             "not a tensor (a dynamic shape?); export traces static shapes")
    return sources, tensors


class Exported(torch.nn.Module):
    """A model saved by ``export``: call it with the tensor keyword arguments given at export.
    Its weights are its parameters, so ``dit_compile.stats`` and ``dit_compile.reset`` work on
    it as on a compiled model. It has what diffusers' pipelines read of their transformer
    (``config``, ``dtype``, ``device``, ``cache_context``, the model's plain attributes such as
    ``in_channels``), so it can take a pipeline's ``transformer`` slot."""

    def __init__(self, path: str):
        super().__init__()
        manifest = os.path.join(path, "manifest.json")
        if not os.path.isfile(manifest):
            raise FileNotFoundError(f"dit_compile.load: no export at {path!r} (no manifest.json "
                                    "there; dit_compile.export(model, path, kwargs) writes one)")
        m = _read(path, "manifest.json", _json_file)
        if m.get("format") not in READS:
            raise ValueError(f"dit_compile.load: {path} has format {m.get('format')!r}, this "
                             f"version reads {', '.join(map(str, READS))}")
        tensors = _read(path, "tensors.pt", lambda file: torch.load(file, weights_only=True))
        self.weights = torch.nn.ParameterDict(
            {k: torch.nn.Parameter(v, requires_grad=False) for k, v in tensors.items()})
        self.sources = [(s.get("argument"), s.get("tensor")) for s in m["inputs"]]
        # The one input signature the programs were traced at; AOTInductor's packages do not
        # check what they are given, so a call is checked here, as Dynamo's guards would.
        self.signature = [(s["argument"], tuple(s["shape"]), getattr(torch, s["dtype"]),
                           s["device"]) for s in m["inputs"] if "argument" in s]
        # They also read their inputs with the strides they were compiled for: an argument laid
        # out otherwise (a pipeline's timestep expanded over the batch, stride 0) is copied into
        # that layout first. Programs run by torch.export read any layout.
        self.strides = {i: tuple(s["stride"]) for i, s in enumerate(m["inputs"])
                        if m.get("aoti") and "argument" in s and "stride" in s}
        self.arguments = list(dict.fromkeys(a[0] for a, _ in self.sources if a is not None))
        uses = [u if isinstance(u, list) else [u] for u in m["programs"]]
        programs = {k: _program(path, k, m.get("aoti", False))
                    for k in sorted({u[0] for u in uses} - {None})}
        fns = [_nothing if u[0] is None else programs[u[0]] if len(u) == 1
               else kept_outputs(programs[u[0]], tuple(u[1]), u[2]) for u in uses]
        spec = pytree.treespec_loads(m["out_spec"])
        if m["guarded"]:
            opts = Options.parse(m["options"])
            policy = make_policy(opts.cache, m["n_blocks"])
            self.executor = GuardedExecutor.rebuild(
                m["layout"], spec, fns, policy=policy, halves=None, _no_halves=_NO_HALVES,
                states=StateFactory(opts.cache_memory, False, key=repr(policy),
                                    timestep=opts.timestep))
            mod = m.get("modulation")
            if mod is not None:
                self.executor.set_modulation(Modulation(
                    _program(path, _MODULATION, m.get("aoti", False)), tuple(mod["args"]),
                    mod["piece"]))
            elif getattr(policy, "reads_modulation", False):
                policy.teacache_signal = "input"    # as the export decided (and warned)
        else:
            self.executor = Executor.rebuild(m["layout"], spec, fns)
        self.model_name = m["model"]
        # Each weight's dtype at export: ``model.to(dtype)`` (a pipeline's ``pipe.to(dtype)``)
        # casts them, which the programs cannot take (see ``to`` and ``_apply``).
        self._dtypes = {k: w.dtype for k, w in self.weights.items()}
        # A weight cast away from its exported dtype, if any: (its dtype, the exported one)
        self._cast: tuple[torch.dtype, torch.dtype] | None = None
        self.config = _Config(m.get("config", {}))
        self._dtype = getattr(torch, m["dtype"]) if m.get("dtype") else None
        self.returns = pytree.treespec_loads(m["returns"]["spec"]), m["returns"]["leaves"]
        self.keywords = m.get("keywords")     # None: saved before keywords were
        self.autocast: dict[str, str | None] = m.get("autocast", {})   # {}: saved before it was
        self._told_autograd = False
        self._aoti = bool(m.get("aoti"))
        self._uncached: set[threading.Thread] = set()     # see ``uncached``
        # Saved before positional arguments were: none taken.
        self.positional: list[str] = m.get("positional", [])
        for name, value in m.get("attributes", {}).items():
            if not hasattr(self, name):     # never in place of this class's own
                setattr(self, name, value)

    @property
    def dtype(self) -> torch.dtype:
        """The model's dtype as diffusers read it at export (modules kept in float32 aside)."""
        return self._dtype or next(
            (w.dtype for w in self.weights.values() if w.is_floating_point()), torch.float32)

    @property
    def device(self) -> torch.device:
        return next(iter(self.weights.values())).device

    @contextlib.contextmanager
    def cache_context(self, *args: Any, **kwargs: Any) -> Iterator[None]:
        """diffusers' pipelines name each guidance branch's call (and step) for their cache
        hooks; this model's cache tells branches apart by itself."""
        yield

    @contextlib.contextmanager
    def uncached(self) -> Iterator[None]:
        """Calls that run every piece and leave the cache as it was (nothing read, stored or
        counted): what ``calibrate_split`` measures, as it measures a compiled model eagerly. The
        calling thread's calls only: another thread's generation goes on cached."""
        thread = threading.current_thread()
        saved = thread in self._uncached
        self._uncached.add(thread)
        try:
            yield
        finally:
            if not saved:
                self._uncached.discard(thread)

    def to(self, *args: Any, **kwargs: Any) -> "Exported":
        """As ``nn.Module.to``, except that the dtype the model was exported in puts each weight
        in the dtype its programs take (modules diffusers keeps in float32 among them):
        ``pipe.to(torch.bfloat16)`` casts every component, and a weight cast away and back
        (``pipe.to(torch.float16)`` first) is in its exported dtype again, its values rounded by
        the casts as any module's are. Another dtype is cast, and the next call says it cannot be
        run."""
        device, dtype, non_blocking, _ = torch._C._nn._parse_to(*args, **kwargs)
        if dtype is None or dtype != self.dtype:
            return super().to(*args, **kwargs)
        exported = {id(w): self._dtypes[k] for k, w in self.weights.items()}
        return self._apply(lambda t: t.to(device=device, dtype=exported.get(id(t), t.dtype),
                                          non_blocking=non_blocking))

    def __reduce_ex__(self, protocol: int) -> Any:
        # Its programs are torch.export's, which hold local functions pickle cannot name: the
        # export's directory is this model's saved form.
        raise TypeError(f"{self.model_name} (exported): a loaded export does not pickle "
                        "(torch.save included): keep the directory dit_compile.export wrote and "
                        "dit_compile.load it again (copy.deepcopy works)")

    def __deepcopy__(self, memo: dict) -> "Exported":
        # What deepcopy does without __reduce_ex__: programs, weights and cache state copied.
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        new.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return new

    def _apply(self, fn: Any, recurse: bool = True) -> "Exported":
        result = super()._apply(fn, recurse)
        self._cast = next(((w.dtype, self._dtypes[k]) for k, w in self.weights.items()
                           if w.dtype != self._dtypes[k]), None)
        return result

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if args:
            kwargs = self._by_name(args, kwargs)
        missing = [a for a in self.arguments if a not in kwargs]
        if missing:
            raise TypeError(f"{self.model_name} (exported) needs the tensor argument(s) {missing}; "
                            f"it takes {self.arguments}")
        self._check_keywords(kwargs)
        self._check_autocast()
        for path, shape, dtype, device in self.signature:
            x = _at(kwargs, path)
            if (not isinstance(x, torch.Tensor) or tuple(x.shape) != shape or x.dtype != dtype
                    or x.device.type != device):
                got = (f"{tuple(x.shape)} {x.dtype} on {x.device.type}"
                       if isinstance(x, torch.Tensor) else type(x).__name__)
                raise ValueError(f"{self.model_name} (exported): {_name(path)} is {got}; it was "
                                 f"exported for {shape} {dtype} on {device} (export again for "
                                 "other inputs)")
        if self._cast is not None:
            now, exported = self._cast
            raise ValueError(f"{self.model_name} (exported): its weights were cast to {now} "
                             "(model.to(...)), but its programs take the dtypes the weights were "
                             f"exported in ({exported}, there): model.to({self.dtype}) casts "
                             "each back to its own, or export again in the dtype you want")
        args = [_at(kwargs, a) if a is not None else self.weights[t] for a, t in self.sources]
        if self._aoti and torch.is_grad_enabled() and any(
                isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            # A package's outputs are detached: gradients through it would be lost, silently.
            raise RuntimeError(
                f"{self.model_name} (exported with aoti=True): an input requires grad, and "
                "AOTInductor's packages compute no gradients: call it under torch.no_grad() "
                "or torch.inference_mode(), or export without aoti (torch.export's programs "
                "differentiate)")
        for i, stride in self.strides.items():
            if args[i].stride() != stride:
                args[i] = torch.empty_strided(args[i].shape, stride, dtype=args[i].dtype,
                                              device=args[i].device).copy_(args[i])
        if (isinstance(self.executor, GuardedExecutor)
                and threading.current_thread() in self._uncached):
            out = pytree.tree_leaves(Executor.__call__(self.executor, *args))
        elif (isinstance(self.executor, GuardedExecutor) and torch.is_grad_enabled()
                and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)):
            # As the backend does: a reused output would be another call's, with its graph.
            if not self._told_autograd:
                self._told_autograd = True
                warnings.warn(f"{self.model_name} (exported): autograd records this call (grad "
                              "enabled, inputs that require grad), so nothing is cached: a "
                              "reused output would belong to another call and carry its graph. "
                              "Call it under torch.no_grad() or torch.inference_mode() to cache.",
                              stacklevel=2)
            out = pytree.tree_leaves(Executor.__call__(self.executor, *args))
        else:
            out = pytree.tree_leaves(self.executor(*args))
        spec, leaves = self.returns
        return pytree.tree_unflatten([out[v] if k == "output" else v for k, v in leaves], spec)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            # LTX-2's pipelines call transformer.rope, NucleusMoE's and Flux 2 Klein's other
            # submodules: what diffusers' own AttributeError does not say is why it is missing.
            raise AttributeError(
                f"the exported model has no attribute {name!r}: dit_compile.load holds the "
                "exported programs, the model's config and its plain attributes, not its "
                f"submodules or methods; a pipeline that reads transformer.{name} needs the model "
                "itself (torch.compile(model, backend='mixcache'))") from None

    def _by_name(self, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Positional arguments named as the model's forward names them."""
        names = self.positional[:len(args)]
        twice = [n for n in names if n in kwargs]
        if len(args) > len(self.positional) or twice:
            raise TypeError(f"{self.model_name} (exported) takes at most "
                            f"{len(self.positional)} positional arguments "
                            f"({', '.join(self.positional)}); got {len(args)}"
                            + (f", and {twice} by keyword too" if twice else ""))
        return {**dict(zip(names, args)), **kwargs}

    def _check_keywords(self, kwargs: dict[str, Any]) -> None:
        """A keyword the programs were not traced with changes nothing they compute, so it is an
        error, not ignored: one absent at export (a ControlNet's residuals, a misspelt name)
        unless unset (None, or an empty dict), and one whose plain value differs from the
        export's (a None then, a tensor now; another ``return_dict``; None and ``{}`` are one).
        Tensors are checked against the input signature."""
        if self.keywords is None:
            return
        for name, value in kwargs.items():
            kind = self.keywords.get(name)
            if kind is None and not _unset(value):
                raise TypeError(f"{self.model_name} (exported): it was exported without {name!r}, "
                                f"so the programs would ignore it; export again with it (it was "
                                f"exported with {sorted(self.keywords)})")
            if kind is not None and "structure" in kind and not _same_structure(
                    _structure(value), kind["structure"]):
                raise ValueError(f"{self.model_name} (exported): {name} is "
                                 f"{_structure_shown(_structure(value))}; it was exported as "
                                 f"{_structure_shown(kind['structure'])}, which the programs "
                                 "were traced for (export again for another structure or value)")
            if kind is not None and "value" in kind and not (
                    _unset(value) and _unset(kind["value"])) and (
                    not _plain(value) or json.loads(json.dumps(value)) != kind["value"]):
                raise ValueError(f"{self.model_name} (exported): {name} is {_shown(value)}; it was "
                                 f"exported with {name}={kind['value']!r}, which the programs "
                                 "were traced for (export again for other values)")
        for name, kind in self.keywords.items():
            # Left out, the argument is the forward's default: where that is not the export's
            # value (return_dict: True, an output object; exported False, a tuple), the
            # programs would answer another call than the one made.
            if (name not in kwargs and "default" in kind
                    and json.loads(json.dumps(kind["default"])) != kind["value"]
                    and not (_unset(kind["default"]) and _unset(kind["value"]))):
                raise TypeError(f"{self.model_name} (exported): {name} is not given, so the "
                                f"forward's default {name}={kind['default']!r} applies; it was "
                                f"exported with {name}={kind['value']!r}, which the programs "
                                f"were traced for: pass {name}={kind['value']!r}")

    def _check_autocast(self) -> None:
        """A call under another autocast state than the export's would run programs traced for
        other casts: an error from inside one (a dtype mismatch), or with caching, an output of
        the other state reused."""
        for device, dtype in self.autocast.items():
            now = _autocast([device])[device]
            if now != dtype:
                raise ValueError(
                    f"{self.model_name} (exported): called {_autocast_shown(device, now)}, but "
                    f"it was exported {_autocast_shown(device, dtype)}, which its programs were "
                    "traced for: call it as exported, or export again under the autocast state "
                    "you call it in")


def _autocast_shown(device: str, dtype: str | None) -> str:
    return "without autocast" if dtype is None else f"under autocast({device!r}, {dtype})"


class _Config(dict):
    """The exported model's diffusers config, read as attributes as pipelines do."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _positional(model: torch.nn.Module) -> list[str]:
    """The names of the forward's arguments a caller may pass by position (ZImagePipeline passes
    the latent, timestep and captions so), in order."""
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [p.name for p in inspect.signature(model.forward).parameters.values()
            if p.kind in kinds]


def _attributes(model: torch.nn.Module) -> dict[str, Any]:
    """The model's own plain attributes beside its config, which some pipelines read off their
    transformer (Z-Image's and Lumina-Next's ``in_channels``, HiDream's ``max_seq``, HunyuanDiT's
    ``inner_dim``)."""
    return {k: v for k, v in vars(model).items()
            if not k.startswith("_") and k != "training" and _plain(v)}


def _plain(v: Any) -> bool:
    try:
        json.dumps(v)
        return True
    except TypeError:
        return False


def _unset(v: Any) -> bool:
    """None, or an empty dict: diffusers' pipelines pass ``attention_kwargs`` (Flux's
    ``joint_attention_kwargs``) as ``{}`` where none are given, which the models read as None."""
    return v is None or (isinstance(v, dict) and not v)


def _defaults(model: torch.nn.Module) -> dict[str, Any]:
    """The forward's plain defaults: what a call that leaves such an argument out gets."""
    return {p.name: p.default for p in inspect.signature(model.forward).parameters.values()
            if p.default is not inspect.Parameter.empty and _plain(p.default)}


def _keywords(kwargs: dict[str, Any], defaults: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each keyword of the export, as a loaded model checks a call's: one holding tensors
    (checked by the input signature and its structure) or a value JSON holds (checked to be the
    same). Any other object is refused: the programs may have read its state (GLM-Image's KV
    cache and its mode), which a loaded model can neither save nor check, so a call with
    another one (a cache in another mode) would run programs traced for this one, silently."""
    out: dict[str, dict[str, Any]] = {}
    for name, value in kwargs.items():
        if any(isinstance(x, torch.Tensor) for x in pytree.tree_leaves(value)):
            out[name] = {"tensors": True, "structure": _structure(value)}
        elif _plain(value):
            out[name] = {"value": value}
            if name in defaults:        # a call without it means the forward's default
                out[name]["default"] = defaults[name]
        elif _holds_tensors(value):
            # AnyFlow-FAR's BlockMask: the graph would read its tensors through attributes,
            # which no keyword path the loaded model takes reaches.
            raise ValueError(f"dit_compile.export: {name} is a {type(value).__name__}, an object "
                             "holding tensors in its attributes: export takes tensors from "
                             "keyword arguments and the tuples, lists and dicts inside them, not "
                             "from an object's attributes, so this call cannot be exported; "
                             "compile the model itself (torch.compile(model, "
                             "backend='mixcache'))")
        else:
            raise ValueError(f"dit_compile.export: {name} is a {type(value).__name__}, neither "
                             "tensors nor plain data (numbers, strings, lists, dicts, None): the "
                             "programs may depend on its state, which the loaded model could "
                             f"not check in a call; export with {name}=None (or without it), or "
                             "compile the model itself for such calls")
    return out


def _holds_tensors(value: Any) -> bool:
    return any(isinstance(v, torch.Tensor) for v in getattr(value, "__dict__", {}).values())


def _structure(value: Any) -> Any:
    """The containers around an argument's tensors, as JSON: the input signature checks the
    tensors the graph read, not how many a list holds (Z-Image's samples): a longer list's
    extra items would be ignored. A plain value beside them is kept as ``{"value": v}``: the
    programs were traced for it (a LoRA ``scale`` beside an IP-adapter's embeddings in
    ``joint_attention_kwargs``), and a call with another one ran them at the export's, silently."""
    if isinstance(value, (list, tuple)):
        return {type(value).__name__: [_structure(v) for v in value]}
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {"dict": {k: _structure(v) for k, v in value.items()}}
    if isinstance(value, torch.Tensor):
        return "tensor"
    if value is None or isinstance(value, (bool, int, float, str)):
        return {"value": json.loads(json.dumps(value))}
    return type(value).__name__


def _same_structure(now: Any, exported: Any) -> bool:
    """A call's structure against the export's; an export saved before plain values were kept
    (their type names in their place) is compared by type."""
    return now == exported or (not _holds_values(exported) and _types_only(now) == exported)


def _holds_values(structure: Any) -> bool:
    if isinstance(structure, dict):
        return "value" in structure or any(_holds_values(v) for v in structure.values())
    if isinstance(structure, list):
        return any(_holds_values(v) for v in structure)
    return False


def _types_only(structure: Any) -> Any:
    if isinstance(structure, dict):
        if "value" in structure:
            return type(structure["value"]).__name__
        return {k: _types_only(v) for k, v in structure.items()}
    if isinstance(structure, list):
        return [_types_only(v) for v in structure]
    return structure


def _structure_shown(structure: Any) -> str:
    if isinstance(structure, str):
        return structure
    (kind, items), = structure.items()
    if kind == "value":
        return repr(items)
    if kind == "dict":
        return "{" + ", ".join(f"{k!r}: {_structure_shown(v)}" for k, v in items.items()) + "}"
    inner = ", ".join(_structure_shown(v) for v in items)
    return f"[{inner}]" if kind == "list" else f"({inner}{',' if len(items) == 1 else ''})"


def _shown(value: Any) -> str:
    return (f"a tensor {tuple(value.shape)}" if isinstance(value, torch.Tensor)
            else repr(value) if _plain(value) else f"a {type(value).__name__}")


def _name(path: list) -> str:
    return path[0] + "".join(f"[{p!r}]" for p in path[1:])


def _at(kwargs: dict[str, Any], path: list) -> Any:
    value = kwargs[path[0]]
    for step in path[1:]:
        value = value[step]
    return value


def _nothing(*args: Any) -> tuple:
    """A piece that computes nothing (see ``_save_programs``), as its graph returns."""
    return ()


def _program(path: str, k: int | str, aoti: bool) -> Any:
    if aoti:
        return _read(path, f"program_{k}.aoti.pt2", torch._inductor.aoti_load_package)
    return _read(path, f"program_{k}.pt2", lambda file: torch.export.load(file).module())


def _json_file(file: str) -> Any:
    with open(file) as f:
        return json.load(f)


def _read(path: str, name: str, reader: Any) -> Any:
    """``reader(<path>/<name>)``; a missing or unreadable file named as the cause (an export
    copied or written part way failed with a bare ``EOFError`` or ``BadZipFile`` from deep in
    torch, naming no file)."""
    file = os.path.join(path, name)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"dit_compile.load: the export at {path!r} lacks {name} (copied or "
                                "written part way?): export again")
    try:
        return reader(file)
    except Exception as e:
        raise ValueError(f"dit_compile.load: {file} could not be read ({type(e).__name__}: "
                         f"{str(e).strip() or 'no more data'}): is it cut short or damaged (a copy or "
                         "write interrupted)? Export again") from e


def load(path: str) -> Exported:
    """The model ``export`` saved under ``path``."""
    return Exported(path)


@dataclass
class _Traced:
    inputs: list[Any]
    keywords: list[list | None]     # per graph input: its path in the call's keyword arguments
                                    # (name, then indices into tuples/lists/dicts), or None
    anchor: int | None
    rmap: Any = None
    plan: Any = None
    why: NoBlockStructure | None = None
    returns: Any = None             # (spec, leaves) of what the call returned, see _returns


def _capture(model: torch.nn.Module, kwargs: dict[str, Any]) -> _Traced:
    """Dynamo's graph of ``model(**kwargs)`` (one graph: a break is an error), read while Dynamo
    still holds what each input is (its sources go when the compile ends): the regions, the plan,
    and which keyword argument each user input came from."""
    traced: list[_Traced] = []

    def record(gm: fx.GraphModule, example_inputs: list[Any]) -> Any:
        user = {n.name for n in user_inputs(gm)}
        keywords = [_keyword_path(n) if n.name in user else None
                    for n in gm.graph.find_nodes(op="placeholder")]
        t = _Traced(list(example_inputs), keywords, anchor_slot(gm))
        try:
            t.rmap = find_regions(gm)
            t.plan = split(gm, t.rmap)
        except NoBlockStructure as why:
            t.why = why
        traced.append(t)

        def run(*args: Any) -> Any:
            out = gm.forward(*args)
            graph_out[:] = pytree.tree_leaves(out)    # the objects the bytecode returns from
            return out
        return run

    graph_out: list[Any] = []
    # Only this model's forward is traced afresh and forgotten after (torch._dynamo.reset() would
    # make every other compiled model in the process compile again).
    root = unwrap(model)
    with (torch.no_grad(), shape_history_kept(), recompiles_allowed(), forward_forgotten(root),
          own_backends() as backend):
        for attempt in range(2):
            if not forget_forward(root):    # a fresh trace: the recording backend sees the graph
                torch._dynamo.reset()       # (Dynamo's internals moved: all of it, then)
            traced.clear()
            try:
                result = torch.compile(model, backend=backend(record), fullgraph=True,
                                       dynamic=False)(
                    **kwargs)
                break
            except (torch._dynamo.exc.Unsupported, torch._dynamo.exc.UserError) as e:
                if attempt == 0:
                    # A break only a first call makes (Z-Image builds its rotary table lazily):
                    # one eager call, as the backend's retrace has had, then trace again.
                    model(**kwargs)
                    continue
                from .passes.moe import find_moe
                moe = [p for p, lowered in find_moe(model).items() if not lowered]
                hint = (f"its MoE dispatch ({moe[0] or 'the model'}) syncs to the host: leave "
                        "option lower_moe on, or call dit_compile.lower_moe(model) first" if moe
                        else "dit_compile.explain(model, ...) shows where it breaks")
                raise ValueError(f"dit_compile.export: Dynamo could not trace "
                                 f"{type(model).__name__} as one graph "
                                 f"({str(e).splitlines()[0]}); export needs one graph: "
                                 f"{hint}") from e
    bad = [p for p in traced[0].keywords if isinstance(p, str)]
    if bad:
        raise ValueError(_not_a_keyword(bad[0], kwargs))
    traced[0].returns = _returns(result, graph_out)
    return traced[0]


def _not_a_keyword(src: str, kwargs: dict[str, Any]) -> str:
    """Why a graph input ``src`` (Dynamo's source) has no keyword path: held by an object's
    attribute inside a keyword, or not from the call's arguments at all."""
    names = re.findall(r"\['(\w+)'\]", src)[:2]
    name = names[1] if names[:1] == ["kwargs"] and len(names) > 1 else names[0] if names else None
    if src.startswith("L[") and name in kwargs:
        return (f"dit_compile.export: graph input {src} is a tensor inside keyword argument "
                f"{name}, held by an object's attribute: export takes tensors from keyword "
                "arguments and the tuples, lists and dicts inside them, so this call cannot be "
                "exported; compile the model itself (torch.compile(model, backend='mixcache'))")
    return (f"dit_compile.export: graph input {src} is not (inside) a keyword argument of the "
            "call; pass the model's tensors as keyword arguments")


def _returns(result: Any, graph_out: list[Any]) -> tuple[str, list]:
    """What the call returned, as the graph's outputs: Dynamo's own bytecode rebuilds the return
    value around the graph (a bare tensor, a tuple, a dict), so the export records it, each
    tensor as the graph output it is (by identity) and anything else as a constant."""
    leaves, spec = pytree.tree_flatten(result)
    stored = [i for i, g in enumerate(graph_out)
              if isinstance(g, torch.Tensor) and not any(g is leaf for leaf in leaves)]
    if stored:
        # Dynamo's bytecode stores them after the graph runs (SANA-WM's refiner fills the
        # pipeline's KV cache object so); a loaded model runs the programs only, and would
        # return the output with the object left as it was, silently.
        raise ValueError(f"dit_compile.export: the call stores {len(stored)} tensor(s) it "
                         "computes into Python objects (a KV cache it fills, an attribute or "
                         "list it sets) besides what it returns; the loaded model could not, and "
                         "would leave them unset: export a call that only returns its results "
                         "(not a capture call), or compile the model itself for such calls")
    out: list = []
    for leaf in leaves:
        i = next((i for i, g in enumerate(graph_out) if g is leaf), None)
        if i is not None:
            out.append(["output", i])
        elif isinstance(leaf, (int, float, bool, str, type(None))):
            out.append(["const", leaf])
        else:
            raise ValueError(f"dit_compile.export: the model returns a {type(leaf).__name__} that "
                             "is not one of the graph's outputs; export a call with "
                             "return_dict=False")
    dumped = pytree.treespec_dumps(spec)
    foreign = _foreign_types(json.loads(dumped))
    if foreign:
        # Loading rebuilds the type by name: diffusers' output classes need diffusers imported,
        # which a loaded model promises not to.
        raise ValueError(f"dit_compile.export: the model returns a {foreign[0].rsplit('.', 1)[-1]} "
                         f"({foreign[0]}; diffusers' return_dict=True, the forward's default), "
                         "which load could not rebuild without that library: export a call with "
                         "return_dict=False")
    return dumped, out


def _foreign_types(dumped: Any) -> list[str]:
    """The container types in a dumped treespec that are not Python's own."""
    found: list[str] = []
    if isinstance(dumped, list):
        for item in dumped:
            found += _foreign_types(item)
    elif isinstance(dumped, dict):
        kind = dumped.get("type")
        if kind is not None and not kind.startswith(("builtins.", "collections.")):
            found.append(kind)
        for child in dumped.get("children_spec", []):
            found += _foreign_types(child)
    return found


def _keyword_path(n: fx.Node) -> list | str:
    """Where a user input sits in the call's keyword arguments: ``L['hidden_states']`` ->
    ``["hidden_states"]``, ``L['rope'][0]`` -> ``["rope", 0]``; through a decorator's
    ``**kwargs`` (diffusers' forwards) the source starts ``L['kwargs']``. The source itself where
    it is not such a path (a positional argument, a global)."""
    src = source_name(n)
    steps = re.findall(r"\[(?:'(\w+)'|(\d+))\]", src)
    if not src.startswith("L[") or "".join(f"['{k}']" if k else f"[{i}]" for k, i in steps) != src[1:]:
        return src
    path: list = [k if k else int(i) for k, i in steps]
    if path[0] == "kwargs" and len(path) > 1 and isinstance(path[1], str):
        path = path[1:]
    return path if isinstance(path[0], str) else src


def _zeros_like(x: Any) -> Any:
    """Zeros with ``x``'s strides as well as its shape: AOTInductor compiles a program for the
    strides of its example inputs and never checks them, and a value between pieces is often a
    transposed view (HunyuanVideo's tokens after its patch embedding)."""
    if not isinstance(x, torch.Tensor):
        return x
    return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device).zero_()
