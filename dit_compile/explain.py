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


def _traced(target: torch.nn.Module, report: Report, args: tuple, kwargs: dict) -> Report:
    """``report`` completed from Dynamo's trace of ``target(*args, **kwargs)``."""
    found: list[RegionMap | NoBlockStructure] = []
    plans: dict[int, Plan] = {}                    # the split of each graph with blocks
    nested: dict[int, list[str]] = {}              # invoke_subgraph calls' regions, by graph
    held: set[str] = set()                         # containers whose blocks a graph ran
    framed: list[Any] = []                         # the module whose frame each graph is of
    writes: dict[int, str | None] = {}             # why its writes into its inputs bar reuse
    # Per graph, whether it is only part of the forward: one graph may be all Dynamo hands the
    # backend, the rest running eagerly after a break (HiDream's unpatchify and its .item()),
    # and the backend caches no such graph.
    partial: list[bool] = []
    # A forward cut before its blocks (runtime.relay): the roles its first graph takes by name,
    # and the graphs that got that graph's record of the call, as the backend's would.
    heads: list[dict[str, str]] = []
    reached: set[int] = set()
    tails: dict[int, dict[str, str]] = {}          # a tail's roles by name, by graph
    # A batched-CFG call's half-batch forward as the backend builds it (None: not such a call):
    # by graph with blocks; each head's recipe, and each tail's outputs it is fitted to.
    halves: dict[int, HalfBatch | str | None] = {}
    head_halves: list[HalfBatch | str | None] = []
    tail_outputs: dict[int, list] = {}

    def record(gm: torch.fx.GraphModule, example_inputs: list[Any], **_: Any):
        i = len(found)
        partial.append(is_fragment(gm))
        held.update(block_containers(gm))
        framed.append(traced_module())
        nested[i] = [n.args[1] for n in gm.graph.nodes
                     if n.target is torch.ops.higher_order.invoke_subgraph]
        slots = head_slots(gm, target)
        if slots is not None:
            heads.append(named_inputs(gm))
            head_halves.append(_half_batch_for_report(gm, example_inputs, heads[-1],
                                                      before_break=True))
            fn = Head(gm.forward, slots, computed_outputs(gm))
        elif forward_tail(gm, target):
            taken = carriers(gm)
            tails[i] = named_inputs(gm)
            tail_outputs[i] = output_shapes(gm)

            def fn(*a: Any) -> Any:
                if received([a[k] for k in taken]) is not None:
                    reached.add(i)
                return gm.forward(*a)
        else:
            fn = gm.forward
        try:
            rmap = find_regions(gm)
            check_whole_stacks(rmap, target)
            found.append(rmap)
        except NoBlockStructure as why:
            found.append(why)
            return fn
        writes[i] = writes_inputs(gm)
        plans[i] = split(gm, found[-1])
        if i not in tails:
            halves[i] = _half_batch_for_report(gm, example_inputs, rmap.inputs, rmap.samples,
                                               rmap.texts, rmap.sample_outs)
        return fn

    from torch._dynamo.utils import counters
    seen = _break_counts(counters)
    with (torch.no_grad(), shape_history_kept(), recompiles_allowed(), forward_forgotten(target),
          own_backends() as backend):
        # Twice where the first trace broke, as the backend retraces once: a break only a first
        # call makes (a table built lazily) is gone the second time, and a forward Dynamo gave up
        # on earlier (under other settings) is looked at afresh. A new backend object each time,
        # so Dynamo does not serve the first trace's graphs.
        nested_break = None
        for attempt in range(2):
            if attempt:
                forget_forward(target)
            found.clear(), plans.clear(), nested.clear(), writes.clear(), partial.clear()
            heads.clear(), reached.clear(), tails.clear(), held.clear(), framed.clear()
            halves.clear(), head_halves.clear(), tail_outputs.clear()
            try:
                torch.compile(target, backend=backend(record))(
                    *args, **kwargs)
            except torch._dynamo.exc.UncapturedHigherOrderOpError as why:
                if not _marked(target):
                    raise
                # A break inside a nested region fails the whole compile, with any backend.
                nested_break = _region_break(why)
                found.clear()
                break
            if len(found) == 1 and not partial[0]:
                break
        report.graphs = len(found)
        broke = len(found) > 1 or any(partial)
        whole = False       # one graph of the whole forward under fullgraph=True
        # Broken before the blocks only: the graph after the break is cached (runtime.relay).
        relayed = broke and not nested_break and _relayed(found, heads, reached)
        relay_if_captured = False   # cached by the relay once data-dependent operators are captured
        if broke or nested_break:
            report.breaks = ([nested_break] if nested_break
                             else _new_breaks(seen, _break_counts(counters)))
        if broke and not relayed:
            report.loose = _loose_stacks(held, framed, target)
        if (broke or nested_break) and not relayed:
            # Would fullgraph=True make it one graph? Dynamo then captures the data-dependent
            # operators (.item(), nonzero, a boolean mask's index) that break a trace otherwise,
            # and raises at any other break.
            broken = (list(found), dict(plans), dict(nested), dict(writes), list(heads),
                      set(reached), dict(halves))
            forget_forward(target)
            found.clear(), plans.clear(), nested.clear(), writes.clear(), partial.clear()
            halves.clear()
            try:
                torch.compile(target, backend=backend(record),
                              fullgraph=True)(*args, **kwargs)
            except Exception:
                found.clear()
            whole = len(found) == 1 and isinstance(found[0], RegionMap) and not partial[0]
            if whole:   # the report is of that graph, which holds every block
                report.loose = []
            if not whole and not nested_break:
                # Would capturing the data-dependent operators without fullgraph leave a break
                # before the blocks only, which the relay caches (HunyuanVideo 1.5)?
                forget_forward(target, resumes=True)
                found.clear(), heads.clear(), reached.clear()
                try:
                    with torch._dynamo.config.patch(**CAPTURE):
                        torch.compile(target, backend=backend(record))(*args, **kwargs)
                except Exception:
                    found.clear()
                relay_if_captured = _relayed(found, heads, reached)
            if not whole:
                found[:] = broken[0]
                plans.update(broken[1]), nested.update(broken[2]), writes.update(broken[3])
                heads[:], reached = broken[4], broken[5]
                halves.clear(), halves.update(broken[6])
    rmap = _block_graph(found)
    captured = ("torch.compile(..., fullgraph=True) captures those operators, and the forward is "
                "one graph that caches (the report is of that graph)")
    if nested_break:
        report.marked = True
        report.fallback = "a nested block does not trace whole, so torch.compile fails on this model"
        report.fallback += (f" without fullgraph=True (it breaks at data-dependent operators): "
                            f"{captured}" if whole else
                            ": nest_blocks needs blocks with no graph break inside "
                            "(dit_compile.unnest_blocks(model) undoes it)")
        if not whole:
            return report
    elif whole:
        report.fallback = (f"{_traced_as(report.graphs)} (graph breaks at data-dependent "
                           f"operators), and step and cfg guards need one graph: {captured}")
    elif relayed:
        report.relayed = True
    elif broke:
        report.fallback = (f"{_traced_as(report.graphs)} (graph breaks): step and cfg guards "
                           "need one graph")
        if relay_if_captured:
            report.fallback += (f"; with {CAPTURED} set, Dynamo captures the data-dependent "
                                "operators and the only break left is before the blocks: the "
                                "graph after it is cached by the call's inputs (runtime.relay)")
        hooks = breaking_hooks(target)
        if hooks:
            report.fallback += f"; {hooks}"
    elif len(found) == 1 and isinstance(found[0], NoBlockStructure):
        report.fallback = str(found[0])
    elif not found:
        report.fallback = "Dynamo traced no graph"
    if rmap is None:
        return report
    if report.fallback is None:
        # As the backend: no reuse of a call that writes into its inputs, nor without the latent
        # and the timestep, nor on per-sample latents that cannot be stacked.
        report.fallback = (writes[found.index(rmap)] or (None if relayed else
                           missing_inputs(rmap.inputs) or rmap.samples_why))
    if report.fallback is None and diffusers_caches(target):
        report.fallback = diffusers_caches_said()
    plan = plans[found.index(rmap)]
    mod = modulated_input(plan)
    if mod is not None:
        report.modulated = tuple(mod.module.graph.output_node().args[0].meta["example_value"].shape)
    # A forward broken between its stacks: each graph's blocks compile (uncached), all reported.
    with_blocks = [i for i, f in enumerate(found) if isinstance(f, RegionMap)]
    report.graphs_with_blocks = len(with_blocks)
    calls = [c for i in with_blocks for c in nested[i]]
    report.nested, report.nested_regions = len(calls), len(set(calls))
    report.marked = _marked(target)
    report.stamped = restamp(target)
    # Stamped blocks compile as inlined ones do: the backend puts the first block's graph in
    # place of each, which is the graph this trace inlines for it.
    counts = [_block_graphs(plans[i]) for i in with_blocks]
    report.block_graphs, report.twins = sum(c[0] for c in counts), sum(c[1] for c in counts)
    for i in with_blocks:
        for s, k in found[i].stacks.items():
            report.stacks[s] = report.stacks.get(s, 0) + k
            report.streams.setdefault(s, []).extend(found[i].streams.get(s, []))
    cfg = (fit_to_tail(head_halves[0], tail_outputs.get(found.index(rmap), []))
           if relayed and head_halves else halves.get(found.index(rmap)))
    if cfg is not None and (report.fallback is None or whole):    # said where cfg is reused
        report.cfg_halves = "" if isinstance(cfg, HalfBatch) else cfg
    if relayed:     # the call's own inputs, in the first graph; the last one's are intermediates
        report.inputs, report.input_rule = dict(heads[0]), "names"
        # A text the first graph does not take: the blocks' graph's own, by name (RelayedExecutor).
        text = tails.get(found.index(rmap), {}).get("text")
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


def _block_graph(found: list) -> RegionMap | None:
    """The region map of the graph with the most blocks: the one the report is of."""
    maps = [f for f in found if isinstance(f, RegionMap)]
    return max(maps, key=lambda m: sum(m.stacks.values())) if maps else None


def _block_graphs(plan: Plan) -> tuple[int, int]:
    """How many block graphs the backend compiles for ``plan`` (identical blocks share one), and
    how many blocks run a stack-mate's compile though their graphs differ."""
    dense, pruned = shared_blocks(plan)
    own = {p.signature() for i, p in enumerate(plan.pieces)
           if p.region.kind == BLOCK and i not in dense and i not in pruned}
    return len(own), len(dense) + len(pruned)


def _loose_stacks(held: set[str], framed: list[Any], model: torch.nn.Module) -> list[str]:
    """The block stacks of ``model`` (module lists of two or more of one class not torch.nn's)
    none of whose blocks' modules ran in a graph (``held``: those that did) while Dynamo traced
    their forwards as frames of their own (``framed``)."""
    frames = {id(m) for m in framed if m is not None}
    loose = []
    for head, container in model.named_modules():
        blocks = list(container.children())
        classes = {type(b) for b in blocks}
        if (isinstance(container, (torch.nn.ModuleList, torch.nn.Sequential)) and len(blocks) > 1
                and len(classes) == 1 and not is_torch_nn(classes.pop()) and head not in held
                and any(id(b) in frames for b in blocks)):
            loose.append(head)
    return loose


def _relayed(found: list, heads: list, reached: set) -> bool:
    """Whether the graph with the most blocks got a head's record of the call (runtime.relay):
    the broken forward is then cached as a whole one."""
    rmap = _block_graph(found)
    return bool(heads) and rmap is not None and found.index(rmap) in reached


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
