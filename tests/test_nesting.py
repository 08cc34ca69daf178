"""``nest_blocks``: a model's block stacks as nested compile regions, per instance. The trace holds
one block per stack and ``invoke_subgraph`` calls; the backend finds, guards and counts them as the
inlined blocks, with the same outputs."""
import operator

import pytest
from hypothesis import given, settings, strategies as st
import torch

import dit_compile
import dit_compile.backend as backend
from dit_compile.frames import install_trace_hook
import tiny_models
from dit_compile.passes.moe import lower_moe
from test_cache import STEPS


def _subgraph_calls(gm: torch.fx.GraphModule) -> int:
    return sum(n.target is torch.ops.higher_order.invoke_subgraph for n in gm.graph.nodes)


def _traced(model, kw):
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=record, fullgraph=True)(**kw, return_dict=False)
    return graphs[0]


def test_nest_blocks_marks_this_models_blocks_only():
    from diffusers.models.transformers.transformer_wan import WanTransformerBlock
    model, kw = tiny_models.wan(layers=3)
    other, _ = tiny_models.wan(layers=3)
    keys = list(model.state_dict())
    assert dit_compile.nest_blocks(model) == 3 and dit_compile.nest_blocks(model) == 3
    block = model.blocks[0]
    assert isinstance(block, WanTransformerBlock) and type(block) is not WanTransformerBlock
    assert type(block).__name__ == "WanTransformerBlock" and list(model.state_dict()) == keys
    assert type(other.blocks[0]) is WanTransformerBlock
    graph = _traced(model, kw)
    assert _subgraph_calls(graph) == 3
    # The views each block is handed (text, modulation, rotary tables) alias nothing else it gets:
    # handed on as they are, not copied per block and call.
    assert not any(n.target in ("clone", torch.clone) for n in graph.graph.nodes)
    assert _subgraph_calls(_traced(other, kw)) == 0     # another model of the class: as it was
    report = dit_compile.explain(model, **kw, return_dict=False)
    assert report.nested == 3 and report.nested_regions == 1
    assert "blocks nested: 3 calls of 1 region(s), each" in str(report)
    assert dit_compile.explain(other, **kw, return_dict=False).nested == 0
    assert dit_compile.unnest_blocks(model) == 3 and type(model.blocks[0]) is WanTransformerBlock
    assert _subgraph_calls(_traced(model, kw)) == 0


def test_a_list_of_one_block_is_no_stack():
    """Lumina 2's refiners hold one block each: not a stack (the region pass reads two or more
    blocks of one class as one), so left as they are; its two layers are nested."""
    from dit_compile.passes.nesting import NESTED_FROM, block_stacks
    model, _ = tiny_models.lumina2()
    assert list(block_stacks(model)) == ["layers"]
    assert dit_compile.nest_blocks(model) == 2
    assert NESTED_FROM in type(model.layers[0]).__dict__
    assert not any(NESTED_FROM in type(m[0]).__dict__ for m in (model.noise_refiner,
                                                                 model.context_refiner))


def test_blocks_nested_after_their_class_forward_changed_run_the_new_forward(monkeypatch):
    """A forward patched on the block class (a library or a user rewriting the class) after
    another model of the class was nested: nesting this model's blocks changes none of its
    outputs, eager or compiled. The nested subclass, made once per class, wrapped the forward
    the class had when the first model was nested."""
    first, kw = tiny_models.wan(layers=2)
    model, _ = tiny_models.wan(layers=2)
    kw["return_dict"] = False
    dit_compile.nest_blocks(first)
    cls = type(model.blocks[0])
    original = cls.forward
    monkeypatch.setattr(cls, "forward", lambda self, hidden_states, *args, **kwargs:
                        0.5 * original(self, hidden_states, *args, **kwargs))
    with torch.no_grad():
        expected = model(**kw)[0]
        dit_compile.nest_blocks(model)
        torch.testing.assert_close(model(**kw)[0], expected, rtol=0, atol=0)
        torch._dynamo.reset()
        f = torch.compile(model, backend="mixcache", fullgraph=True,
                          options={"regions": "eager", "cache": None})
        torch.testing.assert_close(f(**kw)[0], expected, rtol=1e-6, atol=1e-6)
    dit_compile.unnest_blocks(first)
    assert dit_compile.nest_blocks(first) == 2      # nested again: the forward of now
    with torch.no_grad():
        torch.testing.assert_close(first(**kw)[0], expected, rtol=0, atol=0)


def test_modules_inside_a_nested_block_are_left_as_they_are():
    """HiDream's MoE experts, a ModuleList of identical modules inside each block, are part of
    their block, not a stack: a region nested inside the block's region would be traced apart."""
    from dit_compile.passes.nesting import NESTED_FROM
    model, _ = tiny_models.hidream()
    dit_compile.nest_blocks(model)
    marked = [name for name, m in model.named_modules() if NESTED_FROM in type(m).__dict__]
    assert {"double_stream_blocks.0", "single_stream_blocks.1"} <= set(marked)
    assert any(".experts." in name for name, _ in model.named_modules())
    assert not [(a, b) for a in marked for b in marked if b.startswith(a + ".")]


@pytest.mark.parametrize("stamp", [False, True])
def test_a_block_put_unnested_into_a_nested_stack_is_one_of_its_blocks(stamp):
    """A block of another model put into a nested stack after nest_blocks (a copy of a nested
    block comes back nested; this one does not) runs as it is beside its nested mates: the stack
    is still one of blocks of one kind, and is cached. The region pass told the block's class
    from theirs, found no stack, and the model ran uncached with a warning that none was traced."""
    model, kw = tiny_models.wan(layers=3)
    dit_compile.nest_blocks(model, stamp=stamp)
    model.blocks[2] = tiny_models.wan(layers=3)[0].blocks[2]
    assert dit_compile.explain(model, **kw, return_dict=False).stacks == {"blocks": 3}
    install_trace_hook()
    f = torch.compile(model, backend="mixcache",
                      options={"regions": "eager", "cache": {"rule": "schedule", "step": [2]}})
    _generation(f, kw)
    assert dit_compile.stats(f)["reused"] == {"step": 1}


@pytest.mark.parametrize("reuses", [True, False])
def test_nest_blocks_warns_where_dynamo_traces_every_nested_call(monkeypatch, reuses, recwarn):
    import dit_compile.passes.nesting as nesting
    # Reuse came with the region's max_reuse_entries (2.12); 2.11, measured, traces each call.
    version = tuple(int(v) for v in torch.__version__.split(".")[:2])
    assert nesting.reuses_nested_regions() == (version >= (2, 12))
    monkeypatch.setattr(nesting, "reuses_nested_regions", lambda: reuses)
    monkeypatch.setattr(nesting, "_subclasses", {})     # the classes made here die with the test
    monkeypatch.setattr(nesting, "_nested_region", lambda forward: forward)   # this torch's own
    model, _ = tiny_models.wan(layers=2)
    assert dit_compile.nest_blocks(model) == 2        # nested as asked, either way
    slower = [w for w in recwarn if "makes the first call slower" in str(w.message)]
    assert len(slower) == (0 if reuses else 1)


def test_a_nested_model_saves_and_copies_nested():
    """torch.save(model) and copy.deepcopy of a model with nested blocks work, and bring the
    blocks back nested: the copy traces with its blocks as subgraphs and gives the same output."""
    import copy
    import io
    from dit_compile.passes.nesting import NESTED_FROM
    model, kw = tiny_models.wan(layers=3)
    dit_compile.nest_blocks(model)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    for other in (torch.load(buf, weights_only=False), copy.deepcopy(model)):
        assert type(other.blocks[0]) is type(model.blocks[0])
        assert NESTED_FROM in type(other.blocks[0]).__dict__
        assert _subgraph_calls(_traced(other, kw)) == 3
        with torch.no_grad():
            torch.testing.assert_close(other(**kw, return_dict=False)[0],
                                       model(**kw, return_dict=False)[0], rtol=0, atol=0)


@pytest.mark.parametrize("shared", ["sequence", "rotary pair"])
def test_a_nested_block_handed_two_views_of_one_tensor_gets_copies(shared):
    """A nested region's inputs may not alias each other: where two arguments share a tensor
    (CogVideoX's text and video halves of one sequence; here also the two tables of Wan's rotary
    pair, one level down in a tuple), the nested block is handed copies."""
    model, kw = tiny_models.wan(layers=2)
    seen = {}
    model.blocks[0].register_forward_pre_hook(
        lambda m, args, kwargs: seen.update(args=args, kwargs=kwargs), with_kwargs=True)
    with torch.no_grad():
        model(**kw)
    (x, text, temb, (cos, sin)), kwargs = seen["args"], seen["kwargs"]
    block = model.blocks[1]
    dit_compile.nest_blocks(model)
    if shared == "sequence":
        joint, n = torch.cat([x, text], dim=1), x.shape[1]

        def call(joint):
            return block(joint[:, :n], joint[:, n:], temb, (cos, sin), **kwargs)
    else:
        joint, n = torch.cat([cos, sin], dim=-1), cos.shape[-1]

        def call(joint):
            return block(x, text, temb, (joint[..., :n], joint[..., n:]), **kwargs)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(call, fullgraph=True)(joint), call(joint),
                                   rtol=1e-5, atol=1e-5)


_A, _B = torch.randn(4, 6), torch.randn(4, 6)
# Leaves a block may be handed: tensors, views of one tensor, a view and its base, constants.
_LEAVES = [_A, _B, _A[:2], _A[2:], _B.t(), torch.ones(3), None, 1, 2.5, "s"]
_leaf = st.sampled_from(range(len(_LEAVES))).map(lambda i: _LEAVES[i])
_argument = st.one_of(
    _leaf, st.tuples(_leaf, _leaf), st.tuples(),
    st.lists(_leaf, max_size=2), st.dictionaries(st.sampled_from("xy"), _leaf, max_size=1),
    st.tuples(_leaf, st.tuples(_leaf)), st.builds(torch.return_types.max, st.tuples(_leaf, _leaf)))


def _same(a, b) -> bool:
    """The same structure of the same objects (a tensor compared by identity)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a is b


@settings(max_examples=200, deadline=None)
@given(args=st.lists(_argument, max_size=4),
       kwargs=st.dictionaries(st.sampled_from(["temb", "rotary_emb", "mask"]), _argument))
def test_arguments_laid_flat_come_back_as_they_were(args, kwargs):
    """A nested block's arguments laid flat (leaves, and tuples of leaves) and rebuilt inside the
    region are the objects the block was handed, keywords as keywords; any argument that nests
    deeper (a list, a dict, a tuple in a tuple, a named tuple) goes through unflattened."""
    from dit_compile.passes.nesting import _flattened, _from_leaves
    laid_out = _flattened(tuple(args), kwargs)
    deeper = any(type(a) is not tuple and isinstance(a, (tuple, list, dict))
                 or type(a) is tuple and any(isinstance(b, (tuple, list, dict)) for b in a)
                 for a in (*args, *kwargs.values()))
    assert (laid_out is None) == deeper
    if laid_out is not None:
        layout, leaves = laid_out
        back = _from_leaves(lambda self, *a, **k: (a, k))(None, layout, *leaves)
        assert _same(back, (tuple(args), kwargs))


@settings(max_examples=100, deadline=None)
@given(leaves=st.lists(_leaf, max_size=6))
def test_tensors_that_share_a_tensor_are_copied_and_no_others(leaves):
    """Copied: a tensor twice, two views of one tensor, a view beside its base; handed on as it
    is: every tensor that shares nothing with another leaf, and every constant."""
    from dit_compile.passes.nesting import _copied_shared
    root = [x._base if isinstance(x, torch.Tensor) and x._base is not None else x for x in leaves]
    out = _copied_shared(leaves)
    for i, (x, y) in enumerate(zip(leaves, out)):
        shared = isinstance(x, torch.Tensor) and any(
            root[j] is root[i] for j in range(len(leaves)) if j != i)
        assert (y is not x) == shared
        if shared:
            assert torch.equal(x, y)
            assert y.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()


def _generation(f, kw):
    """One sampler-like run: a lower timestep each call, the latent moved by the output."""
    key = "timesteps" if "timesteps" in kw else "timestep"
    scale = 1.0 if float(kw[key].max()) > 1 else 1e-3     # Flux's timesteps are in [0, 1]
    x, outs = kw["hidden_states"].clone(), []
    with torch.no_grad():
        for t in STEPS:
            y = f(**dict(kw, hidden_states=x, return_dict=False,
                         **{key: torch.full_like(kw[key], t * scale)}))[0]
            outs.append(y)
            x = x + 0.1 * y.reshape(x.shape) if y.numel() == x.numel() else x
    return outs


# Stamped (nest_blocks(model, stamp=True), passes/stamping.py): the blocks Dynamo hands over as
# opaque calls, each after its stack's first where alike to it. Flux3's image_cond stack runs with
# a condition image only; the last of HiDream's caption projections maps another width.
STAMPED_CALLS = {"wan": 2, "flux": 2, "hunyuan": 3, "hidream": 5, "flux3": 3}


@pytest.mark.parametrize("name", sorted(tiny_models.MODELS))
def test_nested_blocks_are_guarded_and_counted_as_inlined_ones(name, recwarn):
    """The same forced schedule (step, block reuse) on a model with nested blocks, with stamped
    blocks, and on the same model inlined: the same outputs, the same reuse and the same FLOPs
    fraction (each nested block counted through its subgraph), read from the state each graph
    used (it may hang on another parameter than the inlined graph's, which then holds a stale
    one). Flux's and HunyuanVideo's single-stream blocks return views of one tensor, which a
    nested region may not: nest_blocks copies them when compiled. Stamped: the opaque calls in
    Dynamo's graph, none left in the graph the region pass reads, none left to run eagerly.
    The block guard probes the same stream (a nested block returns copies, in its return order:
    Flux's joint block's text first, which the threshold rules then measured)."""
    from dit_compile.runtime.executor import GuardedExecutor
    model, kw = tiny_models.MODELS[name]()
    if name == "hidream":
        lower_moe(model)
    cache = {"rule": "schedule", "step": [2], "block": [1, 3, 4]}
    stamped = torch.ops.dit_compile.stamped_block.default
    runs = []
    for mode in ("inlined", "nested", "stamped"):
        if mode != "inlined":
            assert dit_compile.nest_blocks(model, stamp=mode == "stamped") >= 2
        graphs, traced, probed = [], [], []
        real_find, real_stamp = backend.find_regions, backend.stamp_blocks
        real_init = GuardedExecutor.__init__

        def init(ex, plan, *args, **kwargs):
            real_init(ex, plan, *args, **kwargs)
            probed.append(tuple(plan.slot_examples[ex.probe_out].shape))
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(GuardedExecutor, "__init__", init)
            mp.setattr(backend, "find_regions", lambda gm: graphs.append(gm) or real_find(gm))
            mp.setattr(backend, "stamp_blocks", lambda gm: traced.append(
                sum(n.target is stamped for n in gm.graph.nodes)) or real_stamp(gm))
            torch._dynamo.reset()
            install_trace_hook()    # what the entry point does in a fresh process
            f = torch.compile(model, backend="mixcache", fullgraph=True,
                              options={"regions": "eager", "cache": cache})
            dit_compile.reset(f)    # the inlined run's counts; its state may hang elsewhere
            outs = _generation(f, kw)
        if mode != "stamped":   # (a block not stamped is nested: HiDream's last projection)
            assert (_subgraph_calls(graphs[0]) > 0) == (mode == "nested")
        assert traced[0] == (STAMPED_CALLS[name] if mode == "stamped" else 0)
        assert not any(n.target is stamped for n in graphs[0].graph.nodes)
        s = dit_compile.stats(f)
        runs.append((outs, s["reused"], s["flops_fraction"], probed[0]))
    ref, reused, flops, probe = runs[0]
    for mode, (outs, mode_reused, mode_flops, mode_probe) in zip(("nested", "stamped"), runs[1:]):
        assert reused == mode_reused == {"step": 1, "block": 3}, mode
        assert mode_probe == probe, mode
        assert mode_flops == pytest.approx(flops, rel=1e-9), mode
        for i, (a, b) in enumerate(zip(outs, ref)):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=f"{mode}, call {i}")
    assert not [w for w in recwarn if "runs eagerly" in str(w.message)]


def test_blocks_that_differ_by_a_constant_are_traced_each_not_a_failed_compile():
    """A block whose graph holds a Python constant of its own (here each first norm's eps) reuses
    no other block's trace. Past torch's default of 8 traces per region Dynamo failed the whole
    compile at the ninth block; such blocks are traced one by one instead, as inlined ones are,
    with the same outputs and reuse as the model inlined."""
    from reference_cache import Reference
    model, kw = tiny_models.wan(layers=9)
    for i, block in enumerate(model.blocks):
        block.norm1.eps = 1e-6 * (i + 1)
    sched = {"step": [2], "block": [3]}
    # The inlined model's outputs under the schedule, as the eager reference of its rule computes
    # them (the inlined compile would only trace nine blocks again, to give the same).
    reference = Reference(model, **sched).start(STEPS[0])
    ref = _generation(lambda **call: (reference(**call),), kw)
    assert dit_compile.nest_blocks(model) == 9
    # Each block a region of its own; torch 2.13's Dynamo inlines such single-use regions.
    report = dit_compile.explain(model, **kw, return_dict=False)
    assert report.nested == report.nested_regions in (0, 9)
    assert ("though nested" in str(report)) == (report.nested == 0)
    torch._dynamo.reset()
    f = torch.compile(model, backend="mixcache", fullgraph=True,
                      options={"regions": "eager", "cache": {"rule": "schedule", **sched}})
    dit_compile.reset(f)    # what explain's trace may have left of its state
    outs = _generation(f, kw)
    assert dit_compile.stats(f)["reused"] == {"step": 1, "block": 1}
    for i, (a, b) in enumerate(zip(outs, ref)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=f"call {i}")


def test_inlining_nested_regions_keeps_what_the_graph_computes():
    """``inline_nested`` on Dynamo's graph of a region called twice that calls another region,
    and on a region holding a constant and a module of its own: no ``invoke_subgraph`` left, the
    same placeholders, the same outputs."""
    from dit_compile.passes.nesting import inline_nested
    invoke = torch.ops.higher_order.invoke_subgraph

    @torch.compiler.nested_compile_region
    def inner(x):
        return (x * 2).sin(), x.cos()

    @torch.compiler.nested_compile_region
    def outer(x, y):
        a, b = inner(x + 1.0)
        return a + y, b

    def f(x, y):
        p, q = outer(x, y)
        r, s = outer(p, q)
        return r * s
    graphs = []
    torch._dynamo.reset()
    torch.compile(f, backend=lambda gm, _: graphs.append(gm) or gm.forward,
                  fullgraph=True)(torch.randn(6), torch.randn(6))

    region = torch.fx.GraphModule(torch.nn.Module(), torch.fx.Graph())
    region.table, region.lin = torch.randn(6), torch.nn.Linear(6, 6)
    x = region.graph.placeholder("x")
    y = region.graph.call_module("lin", (region.graph.call_function(
        torch.add, (x, region.graph.get_attr("table"))),))
    region.graph.output((y, region.graph.call_method("sin", (x,))))
    region.recompile()
    outer_graph = torch.fx.Graph()
    root = torch.nn.Module()
    root.region = region
    x = outer_graph.placeholder("x")
    call = outer_graph.call_function(invoke, (outer_graph.get_attr("region"), "region", x))
    first, second = (outer_graph.call_function(operator.getitem, (call, i)) for i in (0, 1))
    outer_graph.output(outer_graph.call_function(torch.add, (first, second)))
    made = torch.fx.GraphModule(root, outer_graph)

    for gm, inputs in ((graphs[0], (torch.randn(6), torch.randn(6))), (made, (torch.randn(6),))):
        assert any(n.target is invoke for n in gm.graph.nodes)
        flat = inline_nested(gm)
        assert not any(n.target is invoke for n in flat.graph.nodes)
        assert ([n.target for n in flat.graph.nodes if n.op == "placeholder"]
                == [n.target for n in gm.graph.nodes if n.op == "placeholder"])
        with torch.no_grad():
            torch.testing.assert_close(flat(*inputs), gm(*inputs), rtol=0, atol=0)


def test_explain_names_a_break_inside_a_nested_block():
    """A graph break inside a nested block (Mochi's nonzero) fails torch.compile with any backend,
    where inlined it only breaks the graph. explain says so, with Dynamo's reason and hint, instead
    of raising, and that fullgraph=True, which captures the operator, makes the forward one graph:
    the nested blocks are found there."""
    from test_zoo import mochi
    model, kw = mochi()
    kw["return_dict"] = False
    dit_compile.nest_blocks(model)
    torch._dynamo.reset()
    with pytest.raises(torch._dynamo.exc.UncapturedHigherOrderOpError), torch.no_grad():
        torch.compile(model, backend="eager")(**kw)
    report = dit_compile.explain(model, **kw)
    assert "a nested block does not trace whole" in report.fallback
    assert "fullgraph=True) captures those operators" in report.fallback, report
    assert any("capture_dynamic_output_shape_ops = True" in b for b in report.breaks), report
    assert report.stacks == {"transformer_blocks": 3} and report.nested >= 2, report


def test_nested_blocks_under_dynamic_shapes_trace_inlined():
    """Under ``dynamic=True`` Dynamo makes a block's floats (its norms' eps) symbols, and its own
    trace of a nested region that reads one fails with any backend (torch 2.15; 2.13 failed in
    ``invoke_subgraph`` later): nested blocks are traced inlined there, so the graphs are those of
    the model inlined, with the same outputs and reuse, at two sizes (each a generation of its
    own) with no recompile for the second."""
    cache = {"rule": "schedule", "step": [2], "block": [1]}
    runs = []
    for nested in (False, True):
        model, _ = tiny_models.wan(layers=3)
        if nested:
            dit_compile.nest_blocks(model)
        torch._dynamo.reset()
        graphs = []
        real = backend.find_regions
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(backend, "find_regions", lambda gm: graphs.append(gm) or real(gm))
            f = torch.compile(model, backend="mixcache", dynamic=True, fullgraph=True,
                              options={"regions": "eager", "cache": cache})
            outs = []
            for size in (8, 12):
                outs += _generation(f, tiny_models.wan(layers=3, size=size)[1])
        runs.append((outs, dit_compile.stats(f)["reused"], [len(g.graph.nodes) for g in graphs]))
        assert not any(_subgraph_calls(g) for g in graphs)
    (ref, reused, nodes), (outs, nested_reused, nested_nodes) = runs
    assert reused == nested_reused == {"step": 2, "block": 2} and nested_nodes == nodes
    for i, (a, b) in enumerate(zip(outs, ref)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=f"call {i}")


class ScaledBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x, t, scale: float):
        return x + self.lin(x) * scale * t.mean()


class ScaledNet(torch.nn.Module):
    """A stack of blocks handed a Python float by the caller (a guidance or LoRA scale)."""

    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList(ScaledBlock() for _ in range(3))
        self.out = torch.nn.Linear(8, 8)

    def forward(self, hidden_states, timestep, scale: float):
        for block in self.blocks:
            hidden_states = block(hidden_states, timestep, scale)
        return self.out(hidden_states)


@pytest.mark.parametrize("dynamic", [None, True])
def test_a_float_argument_that_changes_reaches_nested_blocks_as_its_value(dynamic):
    """A float argument that changes between calls is a symbol once Dynamo recompiles (or from
    the start under ``dynamic=True``). Handed to a nested region, the region reads it with
    ``.item()``, and Dynamo's own graph fails in ``invoke_subgraph`` (torch 2.13 and 2.15; under
    ``dynamic=True`` its trace fails first): the backend inlines the region and reads the number,
    and under ``dynamic=True`` the blocks are traced inlined. Each call equals eager."""
    torch.manual_seed(0)
    model = ScaledNet().eval()
    assert dit_compile.nest_blocks(model) == 3
    torch._dynamo.reset()
    f = torch.compile(model, backend="mixcache", dynamic=dynamic,
                      options={"regions": "eager", "cache": None})
    with torch.no_grad():
        for scale in (1.0, 2.0, 3.0):
            x, t = torch.randn(1, 4, 8), torch.ones(1)
            torch.testing.assert_close(f(x, t, scale), model(x, t, scale))


@pytest.mark.inductor
def test_nested_flux_through_inductor_equals_eager():
    """The copies that unalias Flux's single-stream outputs compile through Inductor, and change
    nothing (fp32 CPU: within 1e-5 of eager). Flux's two stacks through Inductor, with the glue
    between them."""
    model, kw = tiny_models.flux()
    with torch.no_grad():
        eager = model(**kw, return_dict=False)[0]
        dit_compile.nest_blocks(model)
        ours = torch.compile(model, backend="mixcache", fullgraph=True,
                             options={"cache": None})(**kw, return_dict=False)[0]
    torch.testing.assert_close(ours, eager, rtol=1e-5, atol=1e-5)


def test_nested_cogvideox_halves_match_eager_reference():
    """CogVideoX batches both guidance branches: cfg reuse computes the conditional half through
    the nested blocks. Its first block is handed two views of one tensor (copied when compiled: a
    nested region's inputs may not alias). Three blocks: Dynamo inlines a subgraph called once,
    so two blocks would not show that the blocks are nested."""
    import warnings
    from test_batched_cfg import STEPS as N, _check_trace, _pipe, _reference, pipelines
    model = pipelines.cogvideox_transformer(layers=3)
    ref = _reference(model, {1, 3, 4})
    assert dit_compile.nest_blocks(model) == 3
    kw = dict(hidden_states=torch.randn(2, 3, 4, 8, 8), encoder_hidden_states=torch.randn(2, 16, 32),
              timestep=torch.full((2,), 500))
    assert _subgraph_calls(_traced(model, kw)) == 3
    pipe = _pipe(model)
    pipe.transformer = torch.compile(model, backend="mixcache", options={
        "regions": "eager", "cache": {"rule": "schedule", "cfg": [1, 3, 4]}})
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="mixcache")
        torch.testing.assert_close(pipelines.run_cogvideox(pipe, N), ref, rtol=1e-5, atol=1e-5)
    _check_trace(dit_compile.stats(pipe.transformer)["trace"], {1, 3, 4}, generations=1)

