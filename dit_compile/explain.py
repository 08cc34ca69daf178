"""``dit_compile.explain``: what the region pass finds in a model, before anything is compiled."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch

from .checks import expect_module, is_torch_nn, unwrap
from .inductor import shared_blocks
from .export import Exported
from .frames import (breaking_hooks, compiled_options, diffusers_caches, diffusers_caches_said,
                     forget_forward, forward_forgotten, forward_tail, is_fragment, own_backends,
                     recompiles_allowed, shape_history_kept, traced_module)
from .options import Options
from .passes.casting import find_casts, functional_casting
from .passes.inputs import missing_inputs, named_inputs
from .passes.modulation import modulated_input
from .passes.moe import find_moe, lowered_meanwhile
from .passes.mutation import writes_inputs
from .passes.nesting import NESTED_FROM, reuses_nested_regions
from .passes.stamping import restamp
from .passes.regions import (BLOCK, NoBlockStructure, RegionMap, block_containers, check_whole_stacks,
                             find_regions)
from .passes.split import Plan, split
from .runtime.halves import HalfBatch, guidance_groups, is_batched_cfg
from .runtime.relay import Head, fit_to_tail, received
from .slots import carriers, computed_outputs, half_batch, head_slots, output_shapes


@dataclass
class Report:
    model: str
    graphs: int = 0                                        # Dynamo graphs traced (>1: graph breaks)
    stacks: dict[str, int] = field(default_factory=dict)   # stack -> block count, of every graph
    # Graphs holding blocks (>1: a break between stacks); inputs, conditions and regions are of
    # the one with the most blocks.
    graphs_with_blocks: int = 0
    streams: dict[str, list[tuple[int, ...]]] = field(default_factory=dict)
    inputs: dict[str, str] = field(default_factory=dict)   # role -> graph input
    input_rule: str = ""
    samples: int = 0                                       # latent list length (Z-Image), or 0
    conditions: list[str] = field(default_factory=list)    # other floating inputs, watched
    regions: list[tuple[str, int]] = field(default_factory=list)  # (region, node count)
    fallback: str | None = None                            # why mixcache would not cache
    moe: dict[str, bool] = field(default_factory=dict)     # MoE dispatch path -> lowered
    moe_off: bool = False      # compiled with options={"lower_moe": False}: traced unlowered
    casts: int = 0                                         # layers cast as values (passes.casting)
    modulated: tuple[int, ...] | None = None               # shape of TeaCache's signal, if found
    block_graphs: int = 0      # block graphs Inductor compiles for it (identical blocks share one)
    twins: int = 0             # blocks run by a stack-mate's compile though their graphs differ
    unshared: bool = False     # compiled with share_blocks=False: each block its own compile
    uncompiled: bool = False   # compiled with regions="eager": nothing compiled
    nested: int = 0                                        # block calls traced as nested regions
    nested_regions: int = 0                                # distinct regions those calls run
    marked: bool = False                                   # nest_blocks marked its blocks
    stamped: int = 0                                       # blocks mixcache stamps (passes.stamping)
    breaks: list[str] = field(default_factory=list)        # Dynamo's reasons, most frequent first
    # Stacks whose blocks no graph holds, each block's forward traced as a frame of its own.
    loose: list[str] = field(default_factory=list)
    relayed: bool = False       # broken before the blocks: cached by the first graph's record
    # A call batching both guidance branches: "" where a cfg reuse step computes one half (the
    # half-batch forward), else why it computes the full batch; None for any other call.
    cfg_halves: str | None = None

    def __str__(self) -> str:
        lines = [f"{self.model}: {self.graphs} graph(s)"]
        if self.fallback:
            lines.append(f"  no caching: {self.fallback}")
        if self.relayed:
            lines.append("  graph breaks before the blocks: the last graph, which holds them, is "
                         "cached by the call's inputs as the first graph takes them (below)")
        for reason in self.breaks:
            lines.append("  graph break: " + reason.replace("\n", "\n    "))
        for head in self.loose:
            lines.append(f"  stack {head}: no graph holds its blocks (a break inside the loop over "
                         "them leaves the loop outside Dynamo's graphs, each block's forward "
                         "traced apart)")
        if self.moe:
            pending = [p for p, ok in self.moe.items() if not ok]
            lines.append(f"  MoE dispatches: {len(self.moe)}, not lowered: {len(pending)}"
                         + ("" if not pending else
                            " (options={'lower_moe': False} leaves them so, and this report's "
                            "trace too; dit_compile.lower_moe(model) lowers them)" if self.moe_off
                            else " (backend='mixcache' lowers them before its first trace, as "
                            "this report's trace did; dit_compile.lower_moe(model) now)"))
        if self.casts:
            lines.append(f"  layerwise casting: {self.casts} layers, each cast as a function of "
                         "its weights in the graph (dit_compile.passes.casting)")
        for s, k in self.stacks.items():
            lines.append(f"  stack {s}: {k} blocks, residual stream(s) {self.streams.get(s, [])}")
        if self.graphs_with_blocks > 1:
            lines.append(f"  blocks in {self.graphs_with_blocks} graphs, each compiled region by "
                         "region: the inputs and regions below are of the one with the most blocks")
        if any(re.fullmatch(r"u\d+", str(d)) for shapes in self.streams.values()
               for shape in shapes for d in shape):
            lines.append("  sizes u0, u1, ...: known only at run time (data-dependent: a mask's "
                         "nonzero, an .item())")
        if self.stacks and self.nested:
            lines.append(f"  blocks nested: {self.nested} calls of {self.nested_regions} "
                         "region(s), " + ("each traced once" if reuses_nested_regions() else
                                          f"each call traced again by torch {torch.__version__} "
                                          "(slower than inlined: dit_compile.unnest_blocks(model))"))
        if self.stacks and self.stamped:
            lines.append(f"  blocks stamped: {self.stamped} (backend='mixcache' traces the first "
                         "block of each stack and stamps it out for these; other backends, this "
                         "report's trace among them, trace them as nested regions)")
        elif self.stacks and self.marked and not self.nested:
            lines.append("  blocks traced: every one, though nested (no block could reuse "
                         "another's trace: each has a constant of its own)")
        elif self.stacks and not self.nested:
            lines.append("  blocks traced: every one (dit_compile.nest_blocks(model) traces one "
                         "per stack: a shorter first call)")
        if self.inputs:
            lines.append(f"  inputs ({self.input_rule}): "
                         + ", ".join(f"{r}={n}" for r, n in self.inputs.items()))
        if self.conditions:
            lines.append("  other conditions (mixcache computes a call where one switched on or "
                         "off): " + ", ".join(self.conditions))
        if self.samples:
            lines.append(f"  latent: a list of {self.samples} per-sample tensors, decided on as "
                         "one batch of them")
        if self.cfg_halves is not None:
            lines.append("  both guidance branches in this call (batched CFG): a cfg reuse step "
                         + ("computes one half (the half-batch forward)" if not self.cfg_halves
                            else f"computes the full batch: {self.cfg_halves}"))
        if self.regions:
            lines.append("  regions: " + " ".join(f"{n}[{k}]" for n, k in self.regions))
        if self.block_graphs and self.uncompiled:
            lines.append("  block graphs compiled: none (regions='eager' runs the graphs as "
                         "they are)")
        elif self.block_graphs:
            lines.append(f"  block graphs compiled: {self.block_graphs} for "
                         f"{sum(self.stacks.values())} blocks " + (
                             "(share_blocks=False: each its own)" if self.unshared else
                             "(identical blocks share one)") + (
                             f"; {self.twins} block(s) run a stack-mate's compile though their "
                             "graphs differ (a last block the model reads in part, or one "
                             "handed strided views)" if self.twins else ""))
        if self.stacks and (self.block_graphs or self.stamped):
            lines.append("  first block's modulated input (teacache's signal): " + (
                f"{self.modulated}" if self.modulated is not None
                else "none (teacache decides on the latent's change)"))
        return "\n".join(lines)


def _marked(model: torch.nn.Module) -> bool:
    return any(NESTED_FROM in type(m).__dict__ for m in model.modules())


def _region_break(why: Exception) -> str:
    """Dynamo's reason for a break inside a nested region, without its stack."""
    reason = str(why).split("Got graph break/error:", 1)[-1].strip()
    return reason.split("\n\n", 1)[0].strip()     # the reason, the operator, the hints


def explain(model: torch.nn.Module, *args: Any, **kwargs: Any) -> Report:
    """Trace ``model(*args, **kwargs)`` with Dynamo and report the regions mixcache would use.

    Runs the model once (eagerly, through Dynamo's graph); compiles nothing with Inductor, and
    leaves Dynamo nothing of its trace (a compiled model of the same class traces its forward
    again at its next call). Gives diffusers' layerwise casting hooks the traceable form the
    backend gives them (``passes.casting``: no result changes), so it traces what mixcache would.
    """
    target = unwrap(model)
    expect_module(target, "dit_compile.explain traces",
                  " (for a compiled function, the model it calls)")
    if isinstance(target, Exported):
        # Tracing it would run its cached runtime: two calls counted as steps of a generation.
        raise TypeError("dit_compile.explain traces a model's forward to find its regions; a "
                        "loaded export is rewritten already (its manifest.json lists its programs "
                        "and blocks), and dit_compile.stats shows what it caches")
    from .sketch import refuse_split
    refuse_split(model, "explain")    # it places each call in Python: nothing of its own to report
    report = Report(type(target).__name__)
    report.moe = find_moe(target)
    # As the backend traces it: diffusers' layerwise casting in its traceable form (no result
    # changes), counted where that form took; MoE dispatches that sync to the host lowered to the
    # fused op, as the backend lowers them before its first trace (unlowered, a HiDream traces as
    # a graph per dispatch, none of them with the blocks), for this trace only; not where the
    # model was compiled with options={"lower_moe": False}.
    functional_casting(target)
    report.casts = sum(find_casts(target).values())
    options = compiled_options(model)
    opts = None if options is None else Options.parse(options)
    report.moe_off = opts is not None and not opts.lower_moe
    with lowered_meanwhile(target, not report.moe_off):
        report = _traced(target, report, args, kwargs)
    if report.fallback is None and opts is not None and opts.cache is None:
        report.fallback = "compiled with cache=None (the regions below compile, nothing is reused)"
        report.cfg_halves = None
    if opts is not None and opts.regions == "eager":
        report.uncompiled = True
    elif opts is not None and not opts.share_blocks and report.block_graphs:
        report.block_graphs, report.twins, report.unshared = sum(report.stacks.values()), 0, True
    return report


@dataclass
class _Graph:
    """What explain's trace saw of one Dynamo graph of the forward, as the backend would see it."""
    found: RegionMap | NoBlockStructure | None = None
    # Only part of the forward: it may be all Dynamo hands the backend, the rest running eagerly
    # after a break (HiDream's unpatchify and its .item()), and the backend caches no such graph.
    partial: bool = False
    containers: set[str] = field(default_factory=set)     # whose blocks it ran
    module: Any = None                                     # whose frame it is of
    nested: list[str] = field(default_factory=list)        # invoke_subgraph calls' regions
    plan: Plan | None = None                               # its split, where it has blocks
    writes: str | None = None          # why its writes into its inputs bar reuse
    # A forward cut before its blocks (runtime.relay): its first graph's roles by name, and its
    # last graph's, which gets the first one's record of the call as the backend's would.
    head: dict[str, str] | None = None
    tail: dict[str, str] | None = None
    tail_outputs: list = field(default_factory=list)       # the shapes a head's recipe fits
    reached: bool = False
    # A batched-CFG call's half-batch forward as the backend builds it (None: not such a call).
    half: HalfBatch | str | None = None


class _Recorder:
    """A backend function keeping a ``_Graph`` of each graph Dynamo hands it, in ``graphs``."""

    def __init__(self, target: torch.nn.Module):
        self.target, self.graphs = target, []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[Any], **_: Any):
        g = _Graph(partial=is_fragment(gm), containers=block_containers(gm),
                   module=traced_module(), nested=[n.args[1] for n in gm.graph.nodes if
                                                   n.target is torch.ops.higher_order.invoke_subgraph])
        self.graphs.append(g)
        slots = head_slots(gm, self.target)
        if slots is not None:
            g.head = named_inputs(gm)
            g.half = _half_batch_for_report(gm, example_inputs, g.head, before_break=True)
            fn = Head(gm.forward, slots, computed_outputs(gm))
        elif forward_tail(gm, self.target):
            taken = carriers(gm)
            g.tail, g.tail_outputs = named_inputs(gm), output_shapes(gm)

            def fn(*a: Any) -> Any:
                g.reached = g.reached or received([a[k] for k in taken]) is not None
                return gm.forward(*a)
        else:
            fn = gm.forward
        try:
            g.found = find_regions(gm)
            check_whole_stacks(g.found, self.target)
        except NoBlockStructure as why:
            g.found = why
            return fn
        g.writes, g.plan = writes_inputs(gm), split(gm, g.found)
        if g.tail is None:
            g.half = _half_batch_for_report(gm, example_inputs, g.found.inputs, g.found.samples,
                                            g.found.texts, g.found.sample_outs)
        return fn

    def trace(self, backend: Any, args: tuple, kwargs: dict, **compile_kw: Any) -> list[_Graph]:
        """The graphs of one trace of the forward (a new backend object each time, so Dynamo
        does not serve an earlier trace's graphs); Dynamo's errors are the caller's."""
        self.graphs = []
        torch.compile(self.target, backend=backend(self), **compile_kw)(*args, **kwargs)
        return self.graphs


def _traced(target: torch.nn.Module, report: Report, args: tuple, kwargs: dict) -> Report:
    """``report`` completed from Dynamo's trace of ``target(*args, **kwargs)``."""
    from torch._dynamo.utils import counters
    rec = _Recorder(target)
    seen = _break_counts(counters)
    with (torch.no_grad(), shape_history_kept(), recompiles_allowed(), forward_forgotten(target),
          own_backends() as backend):
        graphs, nested_break = _traced_as_the_backend_would(rec, backend, args, kwargs)
        report.graphs = len(graphs)
        broke = len(graphs) > 1 or any(g.partial for g in graphs)
        # Broken before the blocks only: the graph after the break is cached (runtime.relay).
        relayed = broke and not nested_break and _relayed(graphs)
        if broke or nested_break:
            report.breaks = ([nested_break] if nested_break
                             else _new_breaks(seen, _break_counts(counters)))
        if broke and not relayed:
            report.loose = _loose_stacks(graphs, target)
        whole = relay_if_captured = False
        if (broke or nested_break) and not relayed:
            # Would fullgraph=True make it one graph (the report is then of that graph)? Dynamo
            # then captures the data-dependent operators (.item(), nonzero, a boolean mask's
            # index) that break a trace otherwise, and raises at any other break.
            forget_forward(target)
            one = _or_none(lambda: rec.trace(backend, args, kwargs, fullgraph=True))
            whole = len(one) == 1 and isinstance(one[0].found, RegionMap) and not one[0].partial
            if whole:
                graphs, report.loose = one, []
            elif not nested_break:
                # Would capturing the data-dependent operators without fullgraph leave a break
                # before the blocks only, which the relay caches (HunyuanVideo 1.5)?
                forget_forward(target, resumes=True)
                with torch._dynamo.config.patch(**CAPTURE):
                    relay_if_captured = _relayed(_or_none(lambda: rec.trace(backend, args, kwargs)))
    main = _block_graph(graphs)
    report.relayed, report.marked = relayed, bool(nested_break)
    report.fallback = _fallback(graphs, main, target, report.graphs, nested_break, whole, relayed,
                                broke, relay_if_captured)
    if main is None or (nested_break and not whole):
        return report
    return _regions_of(report, graphs, main, target, relayed, whole)


def _traced_as_the_backend_would(rec: _Recorder, backend: Any, args: tuple,
                                 kwargs: dict) -> tuple[list[_Graph], str | None]:
    """The forward's graphs, and where a nested region breaks (which fails the whole compile,
    with any backend), Dynamo's reason. Traced twice where the first trace broke, as the backend
    retraces once: a break only a first call makes (a table built lazily) is gone the second
    time, and a forward Dynamo gave up on earlier (under other settings) is looked at afresh."""
    graphs: list[_Graph] = []
    for attempt in range(2):
        if attempt:
            forget_forward(rec.target)
        try:
            graphs = rec.trace(backend, args, kwargs)
        except torch._dynamo.exc.UncapturedHigherOrderOpError as why:
            if not _marked(rec.target):
                raise
            return [], _region_break(why)
        if len(graphs) == 1 and not graphs[0].partial:
            break
    return graphs, None


def _or_none(trace: Any) -> list[_Graph]:
    """``trace()``'s graphs, or none where Dynamo raised (a break under fullgraph=True)."""
    try:
        return trace()
    except Exception:
        return []


def _fallback(graphs: list[_Graph], main: _Graph | None, target: torch.nn.Module, traced: int,
              nested_break: str | None, whole: bool, relayed: bool, broke: bool,
              relay_if_captured: bool) -> str | None:
    """Why mixcache would not cache this forward, as its backend would say; None: it caches.
    ``traced``: how many graphs the forward traced as (``graphs`` may be fullgraph's one)."""
    captured = ("torch.compile(..., fullgraph=True) captures those operators, and the forward is "
                "one graph that caches (the report is of that graph)")
    if nested_break:
        return ("a nested block does not trace whole, so torch.compile fails on this model" +
                (f" without fullgraph=True (it breaks at data-dependent operators): {captured}"
                 if whole else ": nest_blocks needs blocks with no graph break inside "
                 "(dit_compile.unnest_blocks(model) undoes it)"))
    if whole:
        return (f"{_traced_as(traced)} (graph breaks at data-dependent operators), and "
                f"step and cfg guards need one graph: {captured}")
    if broke and not relayed:
        why = f"{_traced_as(traced)} (graph breaks): step and cfg guards need one graph"
        if relay_if_captured:
            why += (f"; with {CAPTURED} set, Dynamo captures the data-dependent operators and the "
                    "only break left is before the blocks: the graph after it is cached by the "
                    "call's inputs (runtime.relay)")
        hooks = breaking_hooks(target)
        return why + (f"; {hooks}" if hooks else "")
    if len(graphs) == 1 and isinstance(graphs[0].found, NoBlockStructure):
        return str(graphs[0].found)
    if not graphs:
        return "Dynamo traced no graph"
    if main is None:
        return None
    # As the backend: no reuse of a call that writes into its inputs, nor without the latent
    # and the timestep, nor on per-sample latents that cannot be stacked.
    rmap = main.found
    why = main.writes or (None if relayed else missing_inputs(rmap.inputs) or rmap.samples_why)
    if why is None and diffusers_caches(target):
        why = diffusers_caches_said()
    return why


def _regions_of(report: Report, graphs: list[_Graph], main: _Graph, target: torch.nn.Module,
                relayed: bool, whole: bool) -> Report:
    """``report``'s regions, stacks, inputs and compiles, from the graph with the most blocks
    (``main``); stacks and block graphs from every graph holding blocks (a forward broken between
    its stacks compiles each graph's)."""
    rmap = main.found
    mod = modulated_input(main.plan)
    if mod is not None:
        report.modulated = tuple(mod.module.graph.output_node().args[0].meta["example_value"].shape)
    with_blocks = [g for g in graphs if isinstance(g.found, RegionMap)]
    report.graphs_with_blocks = len(with_blocks)
    calls = [c for g in with_blocks for c in g.nested]
    report.nested, report.nested_regions = len(calls), len(set(calls))
    report.marked = _marked(target)
    report.stamped = restamp(target)
    # Stamped blocks compile as inlined ones do: the backend puts the first block's graph in
    # place of each, which is the graph this trace inlines for it.
    counts = [_block_graphs(g.plan) for g in with_blocks]
    report.block_graphs, report.twins = sum(c[0] for c in counts), sum(c[1] for c in counts)
    for g in with_blocks:
        for s, k in g.found.stacks.items():
            report.stacks[s] = report.stacks.get(s, 0) + k
            report.streams.setdefault(s, []).extend(g.found.streams.get(s, []))
    heads = [g for g in graphs if g.head is not None]
    cfg = fit_to_tail(heads[0].half, main.tail_outputs) if relayed and heads else main.half
    if cfg is not None and (report.fallback is None or whole):    # said where cfg is reused
        report.cfg_halves = "" if isinstance(cfg, HalfBatch) else cfg
    if relayed:     # the call's own inputs, in the first graph; the last one's are intermediates
        report.inputs, report.input_rule = dict(heads[0].head), "names"
        # A text the first graph does not take: the blocks' graph's own, by name (RelayedExecutor).
        text = (main.tail or {}).get("text")
        if "text" not in report.inputs and text is not None:
            report.inputs["text"] = text
    else:
        report.inputs, report.input_rule = rmap.inputs, rmap.input_rule
        report.conditions = rmap.conditions
        report.samples = len(rmap.samples) if rmap.samples_why is None else 0
    report.regions = [(r.name, len(r.nodes)) for r in rmap.regions]
    return report


def _half_batch_for_report(gm: torch.fx.GraphModule, example_inputs: list[Any],
                           inputs: dict[str, str], samples: list[str] | tuple = (),
                           texts: list[str] | tuple = (), sample_outs: Any = (),
                           before_break: bool = False) -> HalfBatch | str | None:
    """Where the traced call batches both guidance branches (its latent two equal halves, its
    text two different ones), the half-batch forward the backend builds for it, or why there is
    none; None for any other call, or where the graph does not take the latent, timestep and
    text."""
    names = [n.name for n in gm.graph.find_nodes(op="placeholder")]
    take = {n: x for n, x in zip(names, example_inputs)}
    latents = [take[n] for n in samples] if samples else [take.get(inputs.get("latent"))]
    t, text = take.get(inputs.get("timestep")), ([take[n] for n in texts] if texts
                                                 else take.get(inputs.get("text")))
    if (any(not isinstance(x, torch.Tensor) for x in latents) or not isinstance(t, torch.Tensor)
            or text is None or len({x.shape for x in latents}) > 1):
        return None
    x = torch.stack(latents) if samples else latents[0]
    if guidance_groups(x, t, text) != 2 or not is_batched_cfg(text, x.shape[0]):
        return None
    return half_batch(gm, example_inputs, inputs, None, samples, sample_outs, before_break)


CAPTURE = dict(capture_scalar_outputs=True, capture_dynamic_output_shape_ops=True)
CAPTURED = " and ".join(f"torch._dynamo.config.{k}" for k in CAPTURE)


def _block_graph(graphs: list[_Graph]) -> _Graph | None:
    """The graph with the most blocks: the one the report is of."""
    maps = [g for g in graphs if isinstance(g.found, RegionMap)]
    return max(maps, key=lambda g: sum(g.found.stacks.values())) if maps else None


def _block_graphs(plan: Plan) -> tuple[int, int]:
    """How many block graphs the backend compiles for ``plan`` (identical blocks share one), and
    how many blocks run a stack-mate's compile though their graphs differ."""
    dense, pruned = shared_blocks(plan)
    own = {p.signature() for i, p in enumerate(plan.pieces)
           if p.region.kind == BLOCK and i not in dense and i not in pruned}
    return len(own), len(dense) + len(pruned)


def _loose_stacks(graphs: list[_Graph], model: torch.nn.Module) -> list[str]:
    """The block stacks of ``model`` (module lists of two or more of one class not torch.nn's)
    none of whose blocks' modules ran in a graph while Dynamo traced their forwards as frames of
    their own."""
    held = {c for g in graphs for c in g.containers}
    frames = {id(g.module) for g in graphs if g.module is not None}
    loose = []
    for head, container in model.named_modules():
        blocks = list(container.children())
        classes = {type(b) for b in blocks}
        if (isinstance(container, (torch.nn.ModuleList, torch.nn.Sequential)) and len(blocks) > 1
                and len(classes) == 1 and not is_torch_nn(classes.pop()) and head not in held
                and any(id(b) in frames for b in blocks)):
            loose.append(head)
    return loose


def _relayed(graphs: list[_Graph]) -> bool:
    """Whether the graph with the most blocks got a head's record of the call (runtime.relay):
    the broken forward is then cached as a whole one."""
    main = _block_graph(graphs)
    return any(g.head is not None for g in graphs) and main is not None and main.reached


def _break_counts(counters: Any) -> dict[str, int]:
    """Dynamo's counts of graph-break reasons: a break inside a traced frame counts under
    ``graph_break``, one that ends the frame's trace (a ``.item()`` without
    capture_scalar_outputs, FramePack's) under ``unimplemented``."""
    counts: dict[str, int] = {}
    for kind in ("graph_break", "unimplemented"):
        for reason, n in counters[kind].items():
            counts[reason] = max(counts.get(reason, 0), n)
    return counts


def _traced_as(graphs: int) -> str:
    return (f"the forward traced as {graphs} graphs" if graphs > 1 else
            "the forward traced as one graph that ends at a graph break, the rest running eagerly")


def _new_breaks(before: dict[str, int], after: dict[str, int], keep: int = 3) -> list[str]:
    """The graph-break reasons Dynamo counted during explain's trace (its counters are the
    process's, hence the difference), most frequent first: each one's summary and Dynamo's first
    hint, which often names the fix (a config flag, a rewrite). Reasons with one summary are one
    (Dynamo words a break again where a resumed frame meets it, with a note on the earlier one)."""
    counts: dict[str, int] = {}
    hints: dict[str, str] = {}
    for reason, n in after.items():
        if n > before.get(reason, 0):
            lines = [ln.strip() for ln in reason.splitlines() if ln.strip()] or ["?"]
            counts[lines[0]] = counts.get(lines[0], 0) + n - before.get(reason, 0)
            hints.setdefault(lines[0], next((ln for ln in lines[1:] if ln.startswith("Hint:")), ""))
    return [summary + (f"\n{hints[summary]}" if hints[summary] else "")
            + (f" (x{counts[summary]})" if counts[summary] > 1 else "")
            for summary in sorted(counts, key=counts.get, reverse=True)[:keep]]
