"""Which graph inputs are the latent, the timestep and the text condition.

``identify_inputs(gm)`` answers by the names diffusers pipelines pass them under, and failing
that (a positional call) by dataflow; ``sample_list`` and ``text_list`` find a latent and a text
given as lists of per-sample tensors, ``conditions`` the other floating-point arguments. The
region pass (``passes.regions.find_regions``) records all of them in its ``RegionMap``; the
backend, explain and export ask by name too (``named_inputs``, ``user_inputs``, ``source_name``).
Like the region pass, it reads the graph and never changes it.
"""
from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import networkx as nx
import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

if TYPE_CHECKING:
    from .regions import RegionMap


def _shape(n: fx.Node) -> tuple[int | str, ...]:
    """Static sizes as ints, symbolic ones (dynamic shapes) by their expression."""
    v = n.meta.get("example_value")
    if not isinstance(v, torch.Tensor):
        return ()
    return tuple(d if isinstance(d, int) else str(d) for d in v.shape)


def _known_same_shape(a: fx.Node, b: fx.Node) -> bool:
    """Both tensors, of sizes known equal: under dynamic shapes an output's sizes are
    expressions of the inputs' symbols (Z-Image's unpatchified ``s8 // 2 * 2``), equal to them
    only as far as the shape environment can tell without a guard."""
    from torch.fx.experimental.symbolic_shapes import statically_known_true
    x, y = a.meta.get("example_value"), b.meta.get("example_value")
    return (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.dim() == y.dim()
            and all(statically_known_true(p == q) for p, q in zip(x.shape, y.shape)))


def dataflow(gm: fx.GraphModule) -> nx.DiGraph:
    """The graph's def-use edges as a networkx DiGraph over nodes."""
    g = nx.DiGraph()
    for n in gm.graph.nodes:
        g.add_node(n)
        for u in n.all_input_nodes:
            g.add_edge(u, n)
    return g


# Inputs by the names diffusers gives them, the first found of each role's list. The condition is
# the text embedding, the class labels of class-conditional DiTs (DiTPipeline batches them with
# the null class for guidance, as others batch the text), or the prompt's token ids where the
# model embeds them itself (Cosmos 3 Omni, OmniGen): compared by value like the others, and never
# to be guessed by dataflow, which takes the largest float input (OmniGen's attention mask).
_ROLE_NAMES = {"latent": ("hidden_states",), "timestep": ("timestep",),
               "text": ("encoder_hidden_states", "class_labels", "input_ids")}


def missing_inputs(roles: dict[str, str]) -> str | None:
    """Why nothing can be cached where the latent or the timestep input was not found, or None.
    The reuse rules need both: the timestep orders steps and generations, the latent's change is
    what the estimates measure."""
    missing = {"latent", "timestep"} - set(roles)
    if not missing:
        return None
    hint = (" (a timestep given as a Python number is a constant of the graph, not an input: pass "
            "it as a tensor, as diffusers' pipelines do; a module called with no timestep, such "
            "as a transformer inside a U-Net's blocks, has none to cache by)"
            if "timestep" in missing else "")
    return f"could not tell which input is the {' and the '.join(sorted(missing))}{hint}"


_ELEMENT = re.compile(r"^(.*)\[(\d+)\]$")


def _list_element(n: fx.Node) -> tuple[str, int] | None:
    """(the list, the index) where a placeholder is an element of a list argument; None for
    any other, an element of the frame's ``*args`` among them (a forward traced through a
    wrapper or a diffusers hook, ``L['args'][0]``, is a positional argument, not a sample)."""
    m = _ELEMENT.match(source_name(n))
    if m is None:
        return None
    base = getattr(getattr(n.meta.get("grapharg"), "source", None), "base", None)
    # torch >= 2.13 marks the varargs source; older ones by the name every wrapper gives it.
    if getattr(base, "is_varargs", False) or getattr(base, "local_name", None) == "args":
        return None
    return m.group(1), int(m.group(2))


def sample_list(gm: fx.GraphModule, latent: str) -> tuple[list[str], list[int], str | None]:
    """Where the latent is one element of a list of per-sample tensors (ZImagePipeline passes one
    latent of [C, F, H, W] per sample, the batch being the list): the list's placeholders in
    order, the positions among the output's tensors of the per-sample outputs, and why the
    samples cannot be stacked into one batch (None where they can).

    The runtime decides per sample along dim 0 of the latent and the output: on an element of
    such a list that dim is the channels, and a sample would take some channels from one step
    and the rest from another. Stacked, dim 0 is the list again. Not a list element: ``[]``."""
    ins = user_inputs(gm)
    where = _list_element(next(n for n in ins if n.name == latent))
    if where is None:
        return [], [], None
    nested = None
    if _ELEMENT.match(where[0]):
        # Z-Image Omni's ``x=[[condition image, ..., noisy latent], ...]``: which element is a
        # sample's latent, and which a clean condition, the dataflow alone does not tell; one
        # sample's list of one latent is a list of per-sample tensors as any other.
        nested = (f"the latent comes as an element of a list of lists ({where[0]}[{where[1]}]), "
                  "per sample its condition images, if any, and its noisy latent, which cannot be "
                  "decided on as one batch")
    elements = {}
    for n in ins:
        k = _list_element(n)
        if k is not None and k[0] == where[0]:
            elements[k[1]] = n
    order = [elements[i] for i in sorted(elements)]
    if len({n.meta["example_value"].dim() for n in order}) > 1:
        return [], [], None     # arguments of a wrapper's *args that torch < 2.13 does not mark
    names = [n.name for n in order]
    shapes = {_shape(n) for n in order}
    if len(shapes) > 1 and all(isinstance(d, int) for sh in shapes for d in sh):
        return names, [], nested or (
            f"the latent comes as a list of {len(order)} per-sample tensors of different shapes "
            f"{sorted(map(str, shapes))}, which cannot be decided on as one batch")
    # Symbolic sizes (dynamic shapes) may be equal or not at a call: the runtime stacks the
    # samples where they are, and computes the call uncached where they are not.
    out = gm.graph.output_node()
    leaves = [x for x in pytree.tree_leaves(out.args[0]) if isinstance(x, fx.Node)]
    outs = [j for j, x in enumerate(leaves) if _known_same_shape(x, order[0])]
    if len(outs) != len(order):
        # Under dynamic shapes an output's sizes are expressions the shape environment may not
        # equate with the latent's (Z-Image's unpatchified 2 * (s8 // 2)): then the one list in
        # the output of as many tensors as samples, each of the latent's rank.
        rank = order[0].meta["example_value"].dim()
        lists = [[leaves.index(x) for x in c] for c in _containers(out.args[0])
                 if len(c) == len(order) and all(
                     isinstance(x, fx.Node) and isinstance(x.meta.get("example_value"), torch.Tensor)
                     and x.meta["example_value"].dim() == rank for x in c)]
        outs = lists[0] if len(lists) == 1 else outs
    if len(outs) != len(order) or sorted(elements) != list(range(len(order))):
        return names, [], nested or (
            f"the latent comes as a list of {len(order)} per-sample tensors, and the output has "
            f"{len(outs)} tensor(s) like them: which output is which sample's is unknown")
    return names, outs, None


def text_list(gm: fx.GraphModule, samples: list[str]) -> list[str]:
    """Beside a latent list, the text condition as a list of as many [tokens, dim] tensors
    (Z-Image's captions, each of its own length), the largest such list; ``[]`` if none."""
    lists: dict[str, dict[int, fx.Node]] = {}
    for n in user_inputs(gm):
        k = _list_element(n)
        if k is not None and n.name not in samples:
            lists.setdefault(k[0], {})[k[1]] = n
    val = {n: n.meta["example_value"] for e in lists.values() for n in e.values()}
    found = [[e[i] for i in sorted(e)] for e in lists.values()
             if sorted(e) == list(range(len(samples)))
             and all(val[n].dim() == 2 and val[n].is_floating_point() for n in e.values())]
    if not found:
        return []
    def size(ns: list[fx.Node]) -> int:     # a symbolic size counts one: only the order matters
        return sum(val[n].numel() if isinstance(val[n].numel(), int) else 1 for n in ns)
    return [n.name for n in max(found, key=size)]


def _containers(tree: Any) -> list[list[Any]]:
    """The lists and tuples in a graph's output structure, each as its elements."""
    if isinstance(tree, (list, tuple)):
        return [list(tree)] + [c for x in tree for c in _containers(x)]
    if isinstance(tree, dict):
        return [c for x in tree.values() for c in _containers(x)]
    return []


def conditions(gm: fx.GraphModule, rmap: RegionMap) -> list[str]:
    """The floating-point call arguments beside the latent, the timestep and the text: the other
    conditions a pipeline passes (ControlNet residuals, pooled text, image embeddings, guidance).
    Most hold still through a generation; a pipeline may switch one at a step (ControlNet's
    ``control_guidance_end`` zeroes its residuals), which the output's history cannot foresee.

    Left out: inputs a sinusoid is taken of (a second timestep, such as ACE-Step's or a mean-flow
    model's ``timestep_r``, and position ids), and inputs of an output's shape (a second latent,
    such as LTX-2's audio): both move with the sampler at every step, by design."""
    taken = {*rmap.inputs.values(), *rmap.samples, *rmap.texts}
    out = gm.graph.output_node()
    out_shapes = {_shape(o) for o in out.all_input_nodes}
    candidates = [n for n in user_inputs(gm) if n.name not in taken
                  and n.meta["example_value"].is_floating_point()
                  and (n.meta["example_value"].dim() == 0 or _shape(n) not in out_shapes)]
    if not candidates:
        return []
    sinusoid = _sinusoid_sources(gm)
    return [n.name for n in candidates if n not in sinusoid]


def _is_trig(n: fx.Node) -> bool:
    name = n.target if n.op == "call_method" else getattr(n.target, "__name__", "")
    return n.op in ("call_function", "call_method") and name in ("sin", "cos")


def _sinusoid_sources(gm: fx.GraphModule) -> set[fx.Node]:
    """Every node a sin or cos is computed from (timestep embeddings, rotary tables)."""
    g = dataflow(gm)
    return {a for n in gm.graph.nodes if _is_trig(n) for a in nx.ancestors(g, n)}


# A module's buffer or parameter, whatever the module is reached by: ``self``, or the ``module``
# argument of a hook's wrapper around the forward (accelerate's offload hook added before compiling).
_MODULE_STATE = re.compile(r"\._(buffers|parameters)\[")


def user_inputs(gm: fx.GraphModule) -> list[fx.Node]:
    """Tensor placeholders that are call arguments, not the model's parameters or buffers."""
    out = []
    for n in gm.graph.nodes:
        if n.op != "placeholder" or not isinstance(n.meta.get("example_value"), torch.Tensor):
            continue
        src = source_name(n)
        if not (src.startswith("L['self']") or src.startswith("self") or _MODULE_STATE.search(src)
                or isinstance(getattr(n.meta.get("grapharg"), "example", None), torch.nn.Parameter)):
            out.append(n)
    return out


def source_name(n: fx.Node) -> str:
    """Where Dynamo took a placeholder from (``L['hidden_states']``, ``L['self']...``)."""
    ga = n.meta.get("grapharg")
    src = getattr(getattr(ga, "source", None), "name", n.name)
    return src() if callable(src) else src


def named_inputs(gm: fx.GraphModule) -> dict[str, str]:
    """The roles ("latent", "timestep", "text") whose argument the graph takes by the name
    diffusers gives it, mapped to placeholder names."""
    ins = user_inputs(gm)
    roles: dict[str, str] = {}
    for role, names in _ROLE_NAMES.items():
        found = {kw: n.name for kw in names for n in ins
                 if re.search(rf"\['{kw}'\]$", source_name(n))}
        if found:
            roles[role] = next(found[kw] for kw in names if kw in found)
    return roles


def identify_inputs(gm: fx.GraphModule) -> tuple[dict[str, str], str]:
    """Map roles ("latent", "timestep", "text") to placeholder names, and say by which rule."""
    ins = user_inputs(gm)
    roles = named_inputs(gm)
    if len(roles) == len(_ROLE_NAMES):
        return roles, "names"

    # Positional call: fall back to dataflow and shapes.
    taken = set(roles.values())
    free = [n for n in ins if n.name not in taken]
    val = {n: n.meta["example_value"] for n in free}
    sinusoid = _sinusoid_sources(gm)
    if "timestep" not in roles:
        # The timestep is the smallest input a sinusoid (sin/cos) is taken of: rotary embeddings
        # take theirs of position ids (Flux's, as ``freqs.cos()``), which are larger.
        cands = [n for n in free if val[n].dim() <= 2 and n in sinusoid]
        if cands:
            roles["timestep"] = min(cands, key=lambda n: (val[n].dim(), val[n].numel())).name
    out_node = gm.graph.output_node()
    out_shapes = {_shape(o) for o in out_node.all_input_nodes}
    rest = [n for n in free if n.name not in roles.values() and val[n].is_floating_point()
            and val[n].dim() >= 3]
    if "latent" not in roles and rest:
        same = [n for n in rest if _shape(n) in out_shapes]
        roles["latent"] = max(same or rest, key=lambda n: val[n].numel()).name
    # Not position ids: those feed the rotary tables' sin and cos (HiDream's patchified img_ids,
    # (batch, tokens, 3), more numbers than a tiny text), a text embedding never does.
    # Nor a ControlNet's residuals (Z-Image's controlnet_block_samples, a dict of [B, L, D]),
    # added inside the blocks: taken for the text, each call's drift read as a new prompt.
    rest = [n for n in rest if n.name not in roles.values() and val[n].dim() == 3
            and n not in sinusoid and "controlnet" not in source_name(n).lower()]
    if "text" not in roles and rest:
        roles["text"] = max(rest, key=lambda n: val[n].numel()).name
    return roles, "dataflow"
