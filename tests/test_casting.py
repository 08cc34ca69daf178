"""diffusers' layerwise casting under mixcache: traced as casts of the weights (passes/casting.py),
so a model stored in a small dtype is one graph and caches as the same model with its weights
rounded to that dtype does."""
import os
import sys
import tempfile
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dit_compile
import random_dits
import tiny_models
from conftest import capture
from dit_compile.frames import install_trace_hook
from dit_compile.passes.casting import find_casts, functional_casting
from dit_compile.passes.regions import BLOCK, find_regions
from dit_compile.passes.split import pruned_twins, split

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
import pipelines  # noqa: E402

STORAGE = torch.bfloat16


@pytest.fixture(autouse=True)
def _trace_hook(_fresh_dynamo):
    """torch._dynamo.reset() (each test's, conftest) drops Dynamo's start callbacks, which the
    backend installs again at its next compile: a fresh process has it from the entry point."""
    install_trace_hook()


def _cast_and_rounded_twin(storage=STORAGE, layers=3):
    """A tiny Wan under layerwise casting (its weights stored as ``storage``, computed in fp32),
    and a twin without hooks whose same layers hold those weights rounded to ``storage``: the
    values every call of the first computes with."""
    model, kw = tiny_models.wan(layers=layers)
    twin, _ = tiny_models.wan(layers=layers)
    model.enable_layerwise_casting(storage_dtype=storage, compute_dtype=torch.float32)
    for path in find_casts(model):
        twin.get_submodule(path).to(storage).to(torch.float32)
    return model, twin, dict(kw, return_dict=False)


def _mixcache_warnings(record) -> list[str]:
    return [str(w.message) for w in record if str(w.message).startswith("mixcache")]


def _stored_dtypes(model) -> set:
    return {model.get_submodule(p).weight.dtype for p in find_casts(model)}


def test_functional_casting_changes_no_eager_result_and_is_idempotent():
    model, twin, kw = _cast_and_rounded_twin()
    with torch.no_grad():
        before = model(**kw)[0]
        n = functional_casting(model)
        after = model(**kw)[0]
    assert n == len(find_casts(model)) > 0 and all(find_casts(model).values())
    assert functional_casting(model) == 0
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(before, twin(**kw)[0], rtol=1e-6, atol=1e-6)
    assert _stored_dtypes(model) == {STORAGE}, "eager calls cast back to the storage dtype"


def test_layerwise_cast_wan_in_its_pipeline_caches_as_its_rounded_twin():
    """WanPipeline, the default preset: the cast model is one graph (no warning), reuses steps,
    and decides and computes exactly as its twin does; its weights stay stored in bf16, and the
    model still runs eagerly as before."""
    model, twin, _ = _cast_and_rounded_twin()
    pipe = pipelines.wan_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    eager = pipelines.run_wan(pipe, steps=8)

    results = []
    for m in (twin, model):
        torch._dynamo.reset()
        install_trace_hook()
        pipe.transformer = torch.compile(m, backend="mixcache", options={"regions": "eager"})
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            out = pipelines.run_wan(pipe, steps=8)
        assert _mixcache_warnings(rec) == []
        results.append((out, dit_compile.stats(pipe.transformer)["trace"]))
    (twin_out, twin_trace), (out, trace) = results
    assert [r["action"] for r in trace] == [r["action"] for r in twin_trace]
    assert "step" in {r["action"] for r in trace}
    torch.testing.assert_close(out, twin_out, rtol=1e-6, atol=1e-6)
    assert _stored_dtypes(model) == {STORAGE}

    pipe.transformer = model
    torch.testing.assert_close(pipelines.run_wan(pipe, steps=8), eager, rtol=0, atol=0)


def test_any_backend_traces_the_casts_once_given_their_functional_form():
    """dit_compile.functional_casting is public: with it, another backend's fullgraph=True compile
    of the cast model (here Dynamo's eager backend) works and computes what the hooks do."""
    model, _, kw = _cast_and_rounded_twin(layers=2)
    with torch.no_grad():
        ref = model(**kw)[0]
        with pytest.raises(torch._dynamo.exc.Unsupported):
            torch.compile(model, backend="eager", fullgraph=True)(**kw)
        torch._dynamo.reset()
        assert dit_compile.functional_casting(model) == len(find_casts(model))
        out = torch.compile(model, backend="eager", fullgraph=True)(**kw)[0]
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


def test_explain_reports_the_casts_in_one_graph():
    model, _, kw = _cast_and_rounded_twin()
    report = dit_compile.explain(model, **kw)
    assert report.graphs == 1 and report.fallback is None and report.stacks == {"blocks": 3}
    assert report.casts == len(find_casts(model)) and "layerwise casting: " in str(report)


def test_a_compiled_function_calling_a_cast_model_is_told_to_compile_the_model():
    """The start of a compile finds the model torch.compile was given; a function that calls it
    breaks at every cast as before, and the warning says what to compile instead."""
    model, _, kw = _cast_and_rounded_twin(layers=2)
    with torch.no_grad():
        ref = model(**kw)[0]
        f = torch.compile(lambda **k: model(**k)[0], backend="mixcache",
                          options={"regions": "eager"})
        with pytest.warns(UserWarning, match="mixcache") as rec:
            out = f(**kw)
    said = " ".join(_mixcache_warnings(rec))
    assert "enable_layerwise_casting" in said and "compile the model itself (" in said
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


def test_after_a_dynamo_reset_the_first_call_breaks_and_the_next_is_one_graph():
    """torch._dynamo.reset() drops the start callback until the backend's next compile: the first
    call then breaks at every cast, runs uncached and says why (naming the hook); the backend,
    having installed the callback again, has the forward traced once more, whole from the next
    call on, and cached."""
    model, _, kw = _cast_and_rounded_twin(layers=2)
    with torch.no_grad():
        ref = model(**kw)[0]
    torch._dynamo.reset()
    f = torch.compile(model, backend="mixcache", options={"regions": "eager"})
    with torch.no_grad(), pytest.warns(UserWarning, match="mixcache") as rec:
        first = f(**kw)[0]
    (said,) = _mixcache_warnings(rec)
    assert "enable_layerwise_casting" in said and "torch._dynamo.reset()" in said
    with torch.no_grad(), warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        second = f(**kw)[0]
    assert _mixcache_warnings(rec) == [] and all(find_casts(model).values())
    assert dit_compile.stats(model)["calls"] == 1
    torch.testing.assert_close(first, ref, rtol=0, atol=0)
    torch.testing.assert_close(second, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.inductor
def test_fp8_stored_model_compiles_whole_through_inductor():
    """Weights stored in float8 (what layerwise casting is for), computed in fp32: fullgraph=True
    compiles, the output is eager's, and the weights stay float8."""
    model, _, kw = _cast_and_rounded_twin(storage=torch.float8_e4m3fn, layers=2)
    with torch.no_grad():
        ref = model(**kw)[0]
        out = torch.compile(model, backend="mixcache", fullgraph=True,
                            options={"cache": None})(**kw)[0]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert _stored_dtypes(model) == {torch.float8_e4m3fn}


def test_export_keeps_the_weights_in_the_storage_dtype():
    model, _, kw = _cast_and_rounded_twin(layers=2)
    with torch.no_grad():
        ref = model(**kw)[0]
    with tempfile.TemporaryDirectory() as d:
        dit_compile.export(model, os.path.join(d, "m"), kw, options={"cache": None})
        saved = torch.load(os.path.join(d, "m", "tensors.pt"))
        loaded = dit_compile.load(os.path.join(d, "m"))
        with torch.no_grad():
            out = loaded(**kw)[0]
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    dtypes = {t.dtype for t in (saved.values() if isinstance(saved, dict) else saved)}
    assert STORAGE in dtypes


def test_hidream_experts_under_layerwise_casting_are_lowered_in_their_storage_dtype():
    """HiDream's expert projections hooked by layerwise casting: the MoE lowering keeps their
    stacks in the storage dtype and casts them as the hooks would, so fullgraph=True compiles (the
    dispatch no longer syncs to the host) and the output is the hooked model's eager one."""
    from dit_compile.passes.moe import find_moe
    model, kw = tiny_models.hidream()
    model.enable_layerwise_casting(storage_dtype=STORAGE, compute_dtype=torch.float32)
    kw["return_dict"] = False
    with torch.no_grad():
        ref = model(**kw)[0]
        with pytest.warns(UserWarning, match="MoE dispatch"):
            out = torch.compile(model, backend="mixcache", fullgraph=True,
                                options={"regions": "eager", "cache": None})(**kw)[0]
    moe = find_moe(model)
    assert moe and all(moe.values())
    assert {m._moe_w1.dtype for m in model.modules() if hasattr(m, "_moe_w1")} == {STORAGE}
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_hidream_lowered_before_layerwise_casting_compiles_from_its_storage_dtype():
    """The README's order, lowering first (``dit_compile.lower_moe``), then layerwise casting,
    then a mixcache compile: the casting gave the experts new storage in the storage dtype, but
    the compile, finding every dispatch lowered, kept the full-precision stacks: the experts'
    memory not saved, and an output off the hooked model's (0.004 of 1.9 with float8 storage).
    The compile now brings lowered dispatches up to date: stacks in the storage dtype, the hooked
    model's output."""
    model, kw = tiny_models.hidream()
    dit_compile.lower_moe(model)
    model.enable_layerwise_casting(storage_dtype=STORAGE, compute_dtype=torch.float32)
    kw["return_dict"] = False
    ref_model, _ = tiny_models.hidream()
    ref_model.enable_layerwise_casting(storage_dtype=STORAGE, compute_dtype=torch.float32)
    with torch.no_grad():
        ref = ref_model(**kw)[0]
        out = torch.compile(model, backend="mixcache", fullgraph=True,
                            options={"regions": "eager", "cache": None})(**kw)[0]
    assert {m._moe_w1.dtype for m in model.modules() if hasattr(m, "_moe_w1")} == {STORAGE}
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_cast_only_is_a_layer_whose_only_hook_is_layerwise_casting():
    """The MoE lowering casts an expert's stacked weights as its hook would only where that hook
    is layerwise casting alone: another diffusers hook, or a torch hook, may change the call."""
    from diffusers.hooks import HookRegistry, ModelHook
    from diffusers.hooks.layerwise_casting import apply_layerwise_casting
    from dit_compile.passes.casting import cast_only

    def cast():
        layer = torch.nn.Linear(2, 2)
        apply_layerwise_casting(layer, storage_dtype=STORAGE, compute_dtype=torch.float32)
        return layer

    assert cast_only(torch.nn.Linear(2, 2)) is None
    assert cast_only(cast()) is torch.float32
    other = cast()
    HookRegistry.check_if_exists_or_initialize(other).register_hook(ModelHook(), "other")
    assert cast_only(other) is None
    for register in ("register_forward_hook", "register_forward_pre_hook"):
        hooked = cast()
        getattr(hooked, register)(lambda *args: None)
        assert cast_only(hooked) is None, register


@pytest.mark.parametrize("other", ["before", "after", "after the traceable form"])
def test_the_casting_hook_is_found_among_the_layers_other_hooks(other):
    """Another diffusers hook registered before the casting one (its function reference comes
    first in the registry), after it, or after the casting got its traceable form: the casting's
    reference gets that form, which any backend traces whole, and the other hook still runs, eager
    and compiled. Where the casting was the layer's only hook, the layer's forward is that form
    itself (the registry's wrapper around it only called it); beside an earlier hook it is not,
    since removing that hook rebinds the reference's forward, and the registry's wrapper follows
    the reference: the removed hook no longer runs."""
    from diffusers.hooks import HookRegistry, ModelHook
    from diffusers.hooks.layerwise_casting import apply_layerwise_casting
    from dit_compile.passes.casting import _casting_hooks
    calls = []

    class Counting(ModelHook):
        def pre_forward(self, module, *args, **kwargs):
            calls.append(len(calls))
            return args, kwargs

    def count(layer):
        HookRegistry.check_if_exists_or_initialize(layer).register_hook(Counting(), "counting")

    layer = torch.nn.Linear(4, 4)
    if other == "before":
        count(layer)
    apply_layerwise_casting(layer, storage_dtype=STORAGE, compute_dtype=torch.float32)
    if other == "after":
        count(layer)
    assert functional_casting(layer) == 1 and find_casts(layer) == {"": True}
    [(_, _, casting, _)] = _casting_hooks(layer)
    assert (layer.forward is casting.forward) == (other == "after the traceable form")
    if other == "after the traceable form":
        count(layer)
    x = torch.randn(2, 4)
    with torch.no_grad():
        ref = torch.nn.functional.linear(x, layer.weight.float(), layer.bias.float())
        torch.testing.assert_close(layer(x), ref)
        torch.testing.assert_close(torch.compile(layer, backend="eager", fullgraph=True)(x), ref)
    assert calls == [0, 1] and layer.weight.dtype == STORAGE
    if other == "before":   # removed, it runs no more, and the rebound reference is made traceable
        HookRegistry.check_if_exists_or_initialize(layer).remove_hook("counting")
        assert functional_casting(layer) == 1
        with torch.no_grad():
            torch.testing.assert_close(torch.compile(layer, backend="eager", fullgraph=True)(x), ref)
        assert calls == [0, 1]


def test_plain_layers_trace_their_own_forward_on_the_cast_weights():
    """Compiled, a hooked plain ``nn.Linear`` or ``nn.Conv1d/2d/3d`` computes its functional form
    from its cast weights, without swapping them into the layer (Dynamo's trace of that swap was
    most of what a hooked layer cost it); a transposed convolution, an embedding and a subclass
    with a forward of its own are swapped as before. Each computes what its hook computes."""
    from diffusers.hooks.layerwise_casting import apply_layerwise_casting
    from dit_compile.passes.casting import _casting_hooks

    class Doubled(torch.nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    class Layers(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear, self.no_bias = torch.nn.Linear(4, 8), torch.nn.Linear(8, 8, bias=False)
            self.doubled, self.embedding = Doubled(8, 8), torch.nn.Embedding(10, 8)
            self.conv1 = torch.nn.Conv1d(8, 8, 3, padding=1)
            self.conv2, self.conv3 = torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.Conv3d(8, 8, 1)
            self.transposed = torch.nn.ConvTranspose2d(8, 8, 2, stride=2)

        def forward(self, x, ids):
            h = self.doubled(self.no_bias(self.linear(x))) + self.embedding(ids)   # (2, 8)
            a = self.conv1(h[:, :, None].expand(2, 8, 5))
            b = self.conv2(a[..., None].expand(2, 8, 5, 5))
            return a, b, self.conv3(b[:, :, None]), self.transposed(b)

    torch.manual_seed(0)
    layers = Layers()
    apply_layerwise_casting(layers, storage_dtype=STORAGE, compute_dtype=torch.float32)
    assert functional_casting(layers) == 8
    x, ids = torch.randn(2, 4), torch.tensor([3, 7])
    plain = {path: ref.forward.args[3] is not None for path, _, ref, _ in _casting_hooks(layers)}
    assert plain == {"linear": True, "no_bias": True, "doubled": False, "embedding": False,
                     "conv1": True, "conv2": True, "conv3": True, "transposed": False}
    with torch.no_grad():
        ref = layers(x, ids)
        out = torch.compile(layers, backend="eager", fullgraph=True)(x, ids)
        # Its input given by keyword: the layer's own forward, its weights swapped in.
        by_name = torch.compile(layers.linear, backend="eager", fullgraph=True)(input=x)
    for o, r in zip(out, ref, strict=True):
        torch.testing.assert_close(o, r, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(by_name, layers.linear(x), rtol=1e-6, atol=1e-6)
    assert _stored_dtypes(layers) == {STORAGE}


# Which layers stay uncast: the norms (diffusers' default skips them), also the input and output
# projections, or also the second block's layers of each stack (its blocks then differ).
SKIPS = [("norm",), ("norm", "patch", "proj_out"), ("norm", r"blocks\.1\.")]


@settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck))
@given(random_dits.specs(), st.sampled_from([torch.bfloat16, torch.float16, torch.float8_e4m3fn]),
       st.sampled_from(SKIPS))
def test_random_dits_cast_layerwise_are_one_graph_computing_what_the_hooks_do(spec, storage, skip):
    """What passes.casting must preserve, over random DiT-like models, storage dtypes and sets of
    hooked layers: eager results (the hooks' own round trip), one graph that computes exactly
    what the hooks compute with the weights left in their storage dtype, and the block structure
    the uncast model has, identical blocks still one graph."""
    from diffusers.hooks import apply_layerwise_casting
    model, kw = random_dits.build(spec)
    uncast = find_regions(capture(model, kw))
    apply_layerwise_casting(model, storage_dtype=storage, compute_dtype=torch.float32,
                            skip_modules_pattern=skip)
    with torch.no_grad():
        hooked = model(**kw)[0]
        assert functional_casting(model) == len(find_casts(model)) > 0
        assert functional_casting(model) == 0 and all(find_casts(model).values())
        torch.testing.assert_close(model(**kw)[0], hooked, rtol=0, atol=0)
        gm = capture(model, kw)     # one graph, or capture fails
        torch.testing.assert_close(gm(*gm.inputs)[0], hooked, rtol=0, atol=0)
    assert _stored_dtypes(model) == {storage}
    rmap = find_regions(gm)
    assert (rmap.stacks, rmap.streams) == (uncast.stacks, uncast.streams)
    # Every stack's second block uncast (the pattern matches single_blocks.1 too): two graphs.
    plan = split(gm, rmap)
    twins = pruned_twins(plan)      # a last block read in part runs a mate's graph
    for stack in rmap.stacks:
        graphs = {p.signature() for i, p in enumerate(plan.pieces)
                  if p.region.kind == BLOCK and p.region.stack == stack and i not in twins}
        assert len(graphs) == (2 if skip[-1].startswith("blocks") else 1), stack
