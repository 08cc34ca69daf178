"""``nest_blocks(model, stamp=True)``: Dynamo traces the first block of each stack, each later block
that is alike to it is one opaque call, and the backend puts the first block's nodes in its place
on the block's own arguments and weights. What the backend then compiles and caches is what it
compiles and caches of the model inlined."""
import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings

import dit_compile
import dit_compile.backend as backend
import dit_compile.inductor as inductor
import random_dits
import tiny_models
from dit_compile.frames import install_trace_hook
from dit_compile.passes.stamping import STAMP, stamped_block, state, unlike
from test_nesting import _generation

STAMPED = torch.ops.dit_compile.stamped_block.default


@pytest.fixture(autouse=True)
def _trace_hook(_fresh_dynamo):
    """torch._dynamo.reset() (each test's, conftest) drops the start callback that stamps the
    blocks anew as each mixcache compile starts; a fresh process has it from the entry point."""
    install_trace_hook()


def _stamps(model) -> list:
    return [b.__dict__.get(STAMP, (None, None))[:2] for b in model.blocks]


def _compiled(model, cache=None, traced=None, graphs=None, mp=None):
    """``model`` compiled with mixcache; ``traced`` gets each Dynamo graph's count of opaque
    calls, ``graphs`` the graphs the region pass reads."""
    real_stamp, real_find = backend.stamp_blocks, backend.find_regions
    if traced is not None:
        mp.setattr(backend, "stamp_blocks", lambda gm: traced.append(
            sum(n.target is STAMPED for n in gm.graph.nodes)) or real_stamp(gm))
    if graphs is not None:
        mp.setattr(backend, "find_regions", lambda gm: graphs.append(gm) or real_find(gm))
    return torch.compile(model, backend="mixcache", fullgraph=True,
                         options={"regions": "eager", "cache": cache})


# The blocks traced as opaque calls: each after its stack's first, where alike to it. Flux3's
# image_cond stack runs with a condition image only; the last of HiDream's caption projections
# maps another width (the text encoder's last hidden state), so it is traced.
def test_stamped_blocks_under_layerwise_casting_compute_as_inlined_ones(recwarn):
    """Under layerwise casting each layer's forward is the casting's traceable form, one per layer,
    alike from block to block: the blocks are stamped, and a forced schedule gives the outputs and
    reuse of the model inlined. (The tiny models nested, stamped and inlined: test_nesting.)"""
    model, kw = tiny_models.wan()
    model.enable_layerwise_casting(storage_dtype=torch.bfloat16, compute_dtype=torch.float32)
    cache = {"rule": "schedule", "step": [2], "block": [1, 3, 4]}
    runs = []
    for stamp in (False, True):
        if stamp:
            assert dit_compile.nest_blocks(model, stamp=True) == 3
        traced = []
        with pytest.MonkeyPatch.context() as mp:
            torch._dynamo.reset()
            install_trace_hook()
            f = _compiled(model, cache, traced=traced, mp=mp)
            dit_compile.reset(f)
            runs.append((_generation(f, kw), dit_compile.stats(f)["reused"]))
        assert traced == [2 if stamp else 0]
    (ref, reused), (outs, stamped_reused) = runs
    assert reused == stamped_reused == {"step": 1, "block": 3}
    for i, (a, b) in enumerate(zip(outs, ref)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=f"call {i}")
    assert not [w for w in recwarn if "runs eagerly" in str(w.message)]


def test_stamped_blocks_compile_once_through_inductor():
    """Through Inductor (the blocks alone, ``regions="blocks"``): the stamped blocks' pieces are
    the first block's, compiled once, and the output is eager's within Inductor's float noise
    (mixcache against plain Inductor: test_backend)."""
    model, kw = tiny_models.wan(layers=4)
    kw["return_dict"] = False
    with torch.no_grad():
        ref = model(**kw)[0]
    dit_compile.nest_blocks(model, stamp=True)
    compiled = []
    real = inductor.compile_fx

    def counting(gm, *args, **kwargs):
        compiled.append(gm)
        return real(gm, *args, **kwargs)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(inductor, "compile_fx", counting)
        with torch.no_grad():
            out = torch.compile(model, backend="mixcache", fullgraph=True,
                                options={"cache": None, "regions": "blocks"})(**kw)[0]
    assert len(compiled) == 1, "one block for the four"
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


CHANGES = {
    "eps": lambda b: setattr(b.norm1, "eps", 1e-3),
    "hook": lambda b: b.ffn.register_forward_hook(lambda m, a, out: out * 2),
    "processor": lambda b: b.attn1.set_processor(type("Other", (type(b.attn1.processor),), {})()),
    "tensor attribute": lambda b: setattr(b, "bias", torch.ones(())),
    "strides": lambda b: setattr(b.ffn.net[2].weight, "data",
                                 b.ffn.net[2].weight.data.t().contiguous().t()),
    "submodule": lambda b: setattr(b, "extra", torch.nn.Identity()),
    "training": lambda b: b.ffn.train(),
    # A stamped call hands the weights on once each, by position: a block sharing one among its
    # layers (and its mates not) was stamped, and read another layer's weight (1.2 off eager),
    # or failed Dynamo's trace.
    "tied": lambda b: setattr(b.attn1.to_k, "weight", b.attn1.to_q.weight),
    "dtype": lambda b: b.ffn.net[2].to(torch.float64),
}


@pytest.mark.parametrize("compiled", ["eps", "hook", "tied"])
def test_a_block_unlike_the_first_is_traced_not_stamped(compiled):
    """A block that might compute otherwise than the first block on the same inputs (a constant,
    a hook, another attention processor, a tensor attribute, a weight laid out otherwise (Inductor
    compiles for the traced strides), another submodule, train mode, weights shared among its
    layers) is not alike to it; three of them compiled: that block is not stamped, Dynamo traces it, and the outputs are eager's."""
    for change, make in CHANGES.items():
        model, kw = tiny_models.wan(layers=4)
        assert unlike(model.blocks[0], model.blocks[2]) is None
        make(model.blocks[2])
        assert unlike(model.blocks[0], model.blocks[2]) is not None, change
    model, kw = tiny_models.wan(layers=4)
    kw["return_dict"] = False
    CHANGES[compiled](model.blocks[2])
    with torch.no_grad():
        ref = model(**kw)[0]
    dit_compile.nest_blocks(model, stamp=True)
    assert [s[0] is None for s in _stamps(model)] == [False, False, True, False]
    traced = []
    with pytest.MonkeyPatch.context() as mp, torch.no_grad():
        out = _compiled(model, traced=traced, mp=mp)(**kw)[0]
    assert traced == [2]
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


def test_a_block_out_of_its_stack_since_stamping_keeps_no_stamp(recwarn):
    """A block wrapped after nest_blocks(stamp=True) mixes its stack's classes: no stack is
    found, and the stamps of before stayed on the others, so a block changed since (another
    eps) still ran as the first block's nodes."""
    class Doubled(torch.nn.Module):
        def __init__(self, block):
            super().__init__()
            self.block = block

        def forward(self, *args, **kwargs):
            return 2 * self.block(*args, **kwargs)
    model, kw = tiny_models.wan(layers=4)
    kw["return_dict"] = False
    dit_compile.nest_blocks(model, stamp=True)
    model.blocks[3] = Doubled(model.blocks[3])
    model.blocks[2].norm2.eps = 0.5
    with torch.no_grad():
        ref = model(**kw)[0]
        out = _compiled(model)(**kw)[0]
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    assert not [m for m in model.modules() if STAMP in m.__dict__]


def test_stacks_a_forward_slices_as_it_runs_are_found_stamped():
    """Motif-Video slices its block list in its forward, which registers the blocks in a new
    container: stamping's registration hook, traced, gave the single-stream blocks a source in
    its own table, not in the model, and their stack was not found."""
    from tiny_models import seeded
    stacks = []
    for stamp in (False, True):
        torch._dynamo.reset()
        install_trace_hook()
        model = seeded("MotifVideoTransformer3DModel", in_channels=4, out_channels=4,
                       num_attention_heads=2, attention_head_dim=8, num_layers=2,
                       num_single_layers=3, num_decoder_layers=0, patch_size=2, text_embed_dim=16,
                       rope_axes_dim=(4, 2, 2))
        kw = dict(hidden_states=torch.randn(1, 4, 2, 8, 8), timestep=torch.full((1,), 500.0),
                  encoder_hidden_states=torch.randn(1, 6, 16),
                  encoder_attention_mask=torch.ones(1, 6), return_dict=False)
        if stamp:
            dit_compile.nest_blocks(model, stamp=True)
        found = []
        real = backend.find_regions
        with pytest.MonkeyPatch.context() as mp, torch.no_grad():
            mp.setattr(backend, "find_regions", lambda gm: found.append(real(gm)) or found[-1])
            _compiled(model)(**kw)
        stacks.append(dict(found[-1].stacks))
    assert stacks[1] == stacks[0] == {"transformer_blocks": 2, "single_transformer_blocks": 3}


def test_a_block_computing_sizes_from_data_is_stamped_under_fullgraph():
    """Mochi's attention selects its text tokens with nonzero: the op's fake run made a size
    its outputs did not hold, and Dynamo failed the compile (fullgraph=True, as Mochi compiles)."""
    from test_zoo import mochi
    model, kw = mochi()
    kw["return_dict"] = False
    with torch.no_grad():
        ref = model(**kw)[0]
    dit_compile.nest_blocks(model, stamp=True)
    traced = []
    with pytest.MonkeyPatch.context() as mp, torch.no_grad():
        out = _compiled(model, traced=traced, mp=mp)(**kw)[0]
    assert traced == [1]        # the second block; the last is of another kind
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


def test_weights_assigned_after_the_compile_are_the_ones_computed_with():
    """Weights loaded into one block with ``assign=True`` (new Parameter objects) and a layer of
    another block replaced, after the compile: each next call computes with them, as eager does
    (the changed block's stamp is dropped, the next call traces again and stamps it anew)."""
    model, kw = tiny_models.wan(layers=4)
    kw["return_dict"] = False
    dit_compile.nest_blocks(model, stamp=True)
    f = _compiled(model)
    with torch.no_grad():
        torch.testing.assert_close(f(**kw)[0], model(**kw)[0], rtol=1e-6, atol=1e-6)
        model.blocks[2].load_state_dict({k: torch.randn_like(v) for k, v in
                                         model.blocks[2].state_dict().items()}, assign=True)
        assert _stamps(model)[2] == (None, None)
        torch.testing.assert_close(f(**kw)[0], model(**kw)[0], rtol=1e-6, atol=1e-6)
        assert _stamps(model)[2] != (None, None), "stamped anew as the compile started"
        layer = model.blocks[3].ffn.net[2]
        model.blocks[3].ffn.net[2] = torch.nn.Linear(layer.in_features, layer.out_features).eval()
        torch.testing.assert_close(f(**kw)[0], model(**kw)[0], rtol=1e-6, atol=1e-6)


def test_diffusers_layer_skip_applied_after_the_compile_finds_the_nested_blocks():
    """diffusers' skip-layer guiders hook a block away at each such step, and its hooks find the
    block's metadata in diffusers' registry by the block's exact class: a nested block raised
    "not registered" there. Applied after the compile, then removed, each call computes what
    eager does. (Not under fullgraph=True: Dynamo cannot trace the hook's signature lookup, a
    model not nested included.)"""
    from diffusers.hooks import HookRegistry, LayerSkipConfig
    from diffusers.hooks.layer_skip import _apply_layer_skip_hook
    model, kw = tiny_models.wan(layers=3)
    kw["return_dict"] = False
    dit_compile.nest_blocks(model, stamp=True)
    f = torch.compile(model, backend="mixcache", options={"regions": "eager", "cache": None})
    with torch.no_grad():
        full = f(**kw)[0]
        _apply_layer_skip_hook(model, LayerSkipConfig(indices=[1], fqn="blocks"), name="skip")
        skipped = f(**kw)[0]
        torch.testing.assert_close(skipped, model(**kw)[0], rtol=1e-6, atol=1e-6)
        HookRegistry.check_if_exists_or_initialize(model).remove_hook("skip", recurse=True)
        torch.testing.assert_close(f(**kw)[0], model(**kw)[0], rtol=1e-6, atol=1e-6)
    assert not torch.allclose(skipped, full, atol=1e-3)


def test_restamping_takes_a_weight_put_in_place_without_a_registration():
    """A weight put straight into a block's ``_parameters`` (accelerate's
    set_module_tensor_to_device does) fires no registration hook: the next stamping (each
    compile's start) sees the block's tensors are no longer its stamp's and stamps it anew."""
    from dit_compile.passes.stamping import restamp
    model, _ = tiny_models.wan(layers=3)
    dit_compile.nest_blocks(model, stamp=True)
    restamp(model)
    lin = model.blocks[2].ffn.net[2]
    new = torch.nn.Parameter(torch.randn_like(lin.weight))
    lin._parameters["weight"] = new
    restamp(model)
    assert any(t is new for t in model.blocks[2].__dict__[STAMP][2])


def test_a_tensor_attribute_held_apart_from_the_weights_makes_blocks_unlike():
    """A tensor an attention processor holds (not a parameter or buffer) is read as a constant
    of the traced first block: blocks whose processors hold different ones are not alike."""
    model, _ = tiny_models.wan(layers=2)
    model.blocks[0].attn1.processor.table = torch.zeros(3)
    model.blocks[1].attn1.processor.table = torch.ones(3)
    assert unlike(model.blocks[0], model.blocks[1]) == "attn1.processor differs"


def test_a_block_with_frozen_weights_is_unlike_one_that_trains():
    """Weights that record no gradient in one block and do in the first are told apart: the
    stamped call would hand them on as the traced first block's, which record one."""
    model, _ = tiny_models.wan(layers=2)
    model.blocks[1].ffn.requires_grad_(False)
    assert "other names, shapes, strides or dtypes" in unlike(model.blocks[0], model.blocks[1])


def test_a_set_held_apart_from_the_weights_makes_blocks_unlike_where_it_differs():
    """Plain values a processor holds are compared, sets among them: two blocks whose
    processors hold different sets may compute differently and are not alike."""
    model, _ = tiny_models.wan(layers=2)
    model.blocks[0].attn1.processor.skip = {"a"}
    model.blocks[1].attn1.processor.skip = {"b"}
    assert unlike(model.blocks[0], model.blocks[1]) == "attn1.processor differs"
    model.blocks[1].attn1.processor.skip = {"a"}
    assert unlike(model.blocks[0], model.blocks[1]) is None


def test_the_opaque_call_runs_the_block_and_its_fake_gives_the_shapes(monkeypatch):
    """``dit_compile::stamped_block`` run eagerly is the block's forward on the weights it is
    handed (another block's, here); its fake gives the output's shape and dtype, running the block
    once for each layout of the arguments (the blocks of a stack are alike)."""
    from dit_compile.passes import stamping
    from torch._subclasses.fake_tensor import FakeTensorMode
    from diffusers.models.transformers.transformer_wan import WanTransformerBlock
    model, kw = tiny_models.wan(layers=2)
    dit_compile.nest_blocks(model, stamp=True)
    key = model.blocks[1].__dict__[STAMP][0]
    torch.manual_seed(0)
    x, text, temb = torch.randn(1, 32, 16), torch.randn(1, 8, 16), torch.randn(1, 6, 16)
    rotary = (torch.randn(1, 32, 1, 8), torch.randn(1, 32, 1, 8))
    weights = [t for _, t in state(model.blocks[0])]
    with torch.no_grad():
        out = stamped_block(key, "t,t,t,2|t;t;t;t;t", [x, text, temb, *rotary], weights)
        ref = WanTransformerBlock.forward(model.blocks[0], x, text, temb, rotary)
    assert len(out) == 1
    torch.testing.assert_close(out[0], ref)
    runs = []
    monkeypatch.setattr(stamping, "_run", lambda *a, real=stamping._run: runs.append(1) or real(*a))
    calls = [[t.repeat(b, 1, 1) for t in (x, text, temb)] + list(rotary) for b in (1, 1, 2)]
    with FakeTensorMode(allow_non_fake_inputs=False) as mode:
        fakes = [stamped_block(key, "t,t,t,2|t;t;t;t;t", [mode.from_tensor(t) for t in call],
                               [mode.from_tensor(t) for t in weights])[0] for call in calls]
    assert len(runs) == 2, "run once for each layout"
    assert [f.shape for f in fakes] == [ref.shape, ref.shape, (2, *ref.shape[1:])]
    assert fakes[0].dtype == ref.dtype and fakes[1].stride() == ref.stride()
    stamping.restamp(model)     # a compile starts: what the last one kept is not trusted
    with FakeTensorMode(allow_non_fake_inputs=False) as mode:
        stamped_block(key, "t,t,t,2|t;t;t;t;t", [mode.from_tensor(t) for t in calls[0]],
                      [mode.from_tensor(t) for t in weights])
    assert len(runs) == 3


def test_other_backends_trace_stamped_blocks_as_nested_regions():
    """Stamps are mixcache's: any other backend's compile (a user's, export's, explain's) traces
    the blocks as nested regions, with no opaque call; a mixcache compile after it still stamps,
    and neither compile makes the other trace again."""
    model, kw = tiny_models.wan(layers=3)
    kw["return_dict"] = False
    dit_compile.nest_blocks(model, stamp=True)
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    other = torch.compile(model, backend=record, fullgraph=True)
    traced = []
    with pytest.MonkeyPatch.context() as mp, torch.no_grad():
        ours = _compiled(model, traced=traced, mp=mp)
        for _ in range(2):
            a, b = other(**kw)[0], ours(**kw)[0]
    assert len(graphs) == 1 and not any(n.target is STAMPED for n in graphs[0].graph.nodes)
    assert sum(n.target is torch.ops.higher_order.invoke_subgraph
               for n in graphs[0].graph.nodes) in (0, 3)     # torch 2.13 inlines single-use ones
    assert traced == [2]
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    report = dit_compile.explain(model, **kw)
    assert report.stamped == 2 and "blocks stamped: 2" in str(report)
    assert "block graphs compiled: 1 for 3 blocks (identical blocks share one)" in str(report)
    assert f"first block's modulated input (teacache's signal): {report.modulated}" in str(report)


def test_copies_come_back_unstamped_and_unnesting_unstamps():
    """A stamp names its block: a deep copy comes back without one (the copy is stamped anew as
    mixcache compiles it, and computes with its own weights); ``nest_blocks`` without ``stamp``
    and ``unnest_blocks`` drop the stamps."""
    model, kw = tiny_models.wan(layers=3)
    kw["return_dict"] = False
    dit_compile.nest_blocks(model, stamp=True)
    twin = copy.deepcopy(model)
    assert _stamps(twin) == [(None, None)] * 3
    with torch.no_grad():
        for block in twin.blocks:
            block.ffn.net[2].weight.mul_(-1)
        torch.testing.assert_close(_compiled(twin)(**kw)[0], twin(**kw)[0], rtol=1e-6, atol=1e-6)
    assert all(s[0] is not None for s in _stamps(twin))
    assert {s[0] for s in _stamps(twin)}.isdisjoint({s[0] for s in _stamps(model)})
    dit_compile.nest_blocks(model)
    assert _stamps(model) == [(None, None)] * 3
    dit_compile.nest_blocks(model, stamp=True)
    assert dit_compile.unnest_blocks(model) == 3 and _stamps(model) == [(None, None)] * 3


@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
@given(random_dits.specs())
def test_random_dits_stamped_compute_what_they_compute_eagerly(spec):
    """Random DiT-like models (one or two stacks, held in a ModuleList or a Sequential, blocks
    with or without cross-attention, modulation, gates, a second stream): every block after each
    stack's first is an opaque call in Dynamo's graph, each is replaced, and the forward computes
    what it computes eagerly."""
    model, kw = random_dits.build(spec)
    with torch.no_grad():
        ref = model(**kw)[0]
    dit_compile.nest_blocks(model, stamp=True)
    torch._dynamo.reset()
    install_trace_hook()
    traced, graphs = [], []
    with pytest.MonkeyPatch.context() as mp, torch.no_grad():
        out = _compiled(model, traced=traced, graphs=graphs, mp=mp)(**kw)[0]
    assert traced == [sum(d - 1 for d in spec.depths)]
    assert not any(n.target is STAMPED for n in graphs[0].graph.nodes)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


def test_a_new_shape_traced_dynamic_is_stamped_too():
    """A second latent size: Dynamo traces again with symbolic sizes (automatic dynamic), which
    reach the stamped copies as graph inputs; the blocks are stamped again and compute as eager."""
    model, kw = tiny_models.wan(layers=3)
    kw["return_dict"] = False
    dit_compile.nest_blocks(model, stamp=True)
    traced = []
    with pytest.MonkeyPatch.context() as mp, torch.no_grad():
        f = _compiled(model, traced=traced, mp=mp)
        for size in (8, 12, 16):
            call = dict(kw, hidden_states=torch.randn(1, 4, 2, size, size))
            torch.testing.assert_close(f(**call)[0], model(**call)[0], rtol=1e-6, atol=1e-6)
    assert traced == [2, 2]


def test_a_call_the_backend_cannot_replace_runs_the_block_and_is_nested_next_time(monkeypatch):
    """Where a stamped call cannot be replaced (here: said so by hand), the graph runs the block
    eagerly through the op, with a warning naming why, and the model's next compile traces that
    block as a nested region."""
    import dit_compile.passes.stamping as stamping
    model, kw = tiny_models.wan(layers=4)
    kw["return_dict"] = False
    dit_compile.nest_blocks(model, stamp=True)
    real = stamping._stamp
    monkeypatch.setattr(stamping, "_stamp", lambda gm, n, *a: "said so" if n.args[0] == _stamps(
        model)[2][0] else real(gm, n, *a))
    traced = []
    with pytest.MonkeyPatch.context() as mp, torch.no_grad():
        with pytest.warns(UserWarning, match=r"stamped WanTransformerBlock runs eagerly in this "
                                             r"graph \(said so\)"):
            out = _compiled(model, traced=traced, mp=mp)(**kw)[0]
        torch.testing.assert_close(out, model(**kw)[0], rtol=1e-6, atol=1e-6)
        torch._dynamo.reset()
        install_trace_hook()
        out = _compiled(model)(**kw)[0]     # (stamp_blocks still counted as patched above)
        torch.testing.assert_close(out, model(**kw)[0], rtol=1e-6, atol=1e-6)
    assert traced == [3, 2] and _stamps(model)[2] == (None, None)
