"""The modulation pass: the first block's timestep-modulated input, TeaCache's signal."""
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings

import dit_compile
from conftest import capture
from dit_compile.passes.modulation import modulated_input
from dit_compile.passes.regions import find_regions
from dit_compile.passes.split import split
from dit_compile.runtime.executor import Executor
import random_dits
import tiny_models


def _found_and_value(model, kw):
    """The pass's module run on the value table as it stands when the first block starts."""
    gm = capture(model, kw)
    plan = split(gm, find_regions(gm))
    found = modulated_input(plan)
    if found is None:
        return None
    run = Executor(plan, [p.module for p in plan.pieces])
    env = [*gm.inputs, *run._pad]
    with torch.no_grad():
        run.run(env, 0, found.piece)
        return found.module(*[env[i] for i in found.args])


def _seen_by(module, model, kw):
    """What ``module`` is called with, in one eager call of ``model``."""
    seen = []
    hook = module.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(args[0] if args else kwargs["hidden_states"]),
        with_kwargs=True)
    try:
        with torch.no_grad():
            model(**kw)
    finally:
        hook.remove()
    return seen[0]


@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
@given(random_dits.specs())
def test_random_dits_modulated_input_found_exactly_where_blocks_modulate(spec):
    """Found iff the blocks are adaLN-modulated by the timestep, and then it is what the first
    block's attention projects, to the bit."""
    model, kw = random_dits.build(spec)
    value = _found_and_value(model, kw)
    if not spec.adaln:
        assert value is None
        return
    assert value is not None
    torch.testing.assert_close(value, _seen_by(model.blocks[0].qkv, model, kw), rtol=0, atol=0)


@pytest.mark.parametrize("nested", [False, True], ids=["inlined", "nested"])
def test_wan_modulated_input_is_what_its_first_attention_reads(nested):
    """``nested``: the block is one invoke_subgraph call (nest_blocks); the pass looks into it."""
    model, kw = tiny_models.wan(layers=3, batch=2)
    if nested:
        dit_compile.nest_blocks(model)
    value = _found_and_value(model, kw)
    torch.testing.assert_close(value, _seen_by(model.blocks[0].attn1, model, kw),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["flux", "hunyuan", "sd3"])
def test_diffusers_models_have_a_modulated_input(name):
    """Found in the inlined blocks, and the same value in the nested ones."""
    model, kw = getattr(tiny_models, name)()
    value = _found_and_value(model, kw)
    assert value is not None and value.dim() == 3 and value.shape[0] == 1
    dit_compile.nest_blocks(model)
    torch.testing.assert_close(_found_and_value(model, kw), value, rtol=0, atol=0)


def test_a_cast_to_the_latents_dtype_is_no_dependence_on_the_latent():
    """Z-Image casts its timestep embedding with ``type_as(latent)``: the modulation's own linear
    layer then seems to read both the latent and the timestep, yet reads the timestep alone. The
    signal is what the first attention projects, the modulated tokens."""
    model, kw = tiny_models.zimage()
    with torch.no_grad():
        model(**kw)     # Z-Image builds its rotary table at its first call, outside any graph
    value = _found_and_value(model, kw)
    torch.testing.assert_close(value, _seen_by(model.layers[0].attention.to_q, model, kw),
                               rtol=1e-6, atol=1e-6)


def test_a_first_block_writing_into_its_input_decides_on_the_latent():
    """A pre-hook on the first block adding to its input in place (traced into the block): the
    modulated input, computed ahead of the block from the values as they were, missed the write
    (the signal was not what the attention projects); where the write's result feeds the norm,
    the block got it twice (a custom block's ``x += b``: 1.65 off eager). The rule decides on
    the latent, saying why."""
    import copy
    model, kw = tiny_models.wan(layers=3)
    kw["return_dict"] = False
    def add(mod, args, kwargs):
        (args[0] if args else kwargs["hidden_states"]).add_(0.5)
    model.blocks[0].register_forward_pre_hook(add, with_kwargs=True)
    eager = copy.deepcopy(model)
    f = torch.compile(model, backend="mixcache", options={
        "regions": "eager", "cache": {"rule": "teacache", "threshold": 0.1}})
    with torch.no_grad(), pytest.warns(UserWarning, match="writes in place into what that layer"):
        torch.testing.assert_close(f(**kw)[0], eager(**kw)[0], rtol=1e-5, atol=1e-5)


def test_no_modulated_input_warns_and_decides_on_the_latent():
    """A model whose blocks the timestep does not modulate: a warning naming the fallback, and
    the rule then behaves as signal 'input' does."""
    spec = random_dits.Spec(dim=8, depths=(3,), cross_attn=False, adaln=False, gated=False,
                            two_streams=False, extra_input=False, batch=1, tokens=4)
    model, kw = random_dits.build(spec)
    outs = {}
    for signal in ("modulated", "input"):
        torch._dynamo.reset()
        f = torch.compile(model, backend="mixcache", options={
            "regions": "eager", "cache": {"rule": "teacache", "threshold": 0.5, "signal": signal}})
        x, outs[signal] = kw["hidden_states"].clone(), []
        with warnings.catch_warnings(record=True) as caught, torch.no_grad():
            warnings.simplefilter("always")
            for t in (900.0, 800.0, 700.0, 600.0):
                outs[signal].append(f(**dict(kw, hidden_states=x, timestep=torch.tensor([t])))[0])
                x = x - 0.05 * outs[signal][-1]
        told = [str(w.message) for w in caught if "teacache signal 'modulated'" in str(w.message)]
        assert len(told) == (1 if signal == "modulated" else 0), told
        assert all(type(model).__name__ in m for m in told), told
        actions = [r["action"] for r in dit_compile.stats(f)["trace"]]
        outs[signal + " actions"] = actions
    assert "step" in outs["input actions"]      # the premise: the rule reuses here
    assert outs["modulated actions"] == outs["input actions"]
    for a, b in zip(outs["modulated"], outs["input"]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_export_without_modulated_input_warns_naming_the_model(tmp_path):
    """Export decides as the backend does, and says so naming the model (not the traced
    function: nothing is being traced by torch.compile there)."""
    spec = random_dits.Spec(dim=8, depths=(3,), cross_attn=False, adaln=False, gated=False,
                            two_streams=False, extra_input=False, batch=1, tokens=4)
    model, kw = random_dits.build(spec)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dit_compile.export(model, str(tmp_path / "m"), kw, {"cache": {"rule": "teacache",
                                                                      "threshold": 0.5}})
    told = [str(w.message) for w in caught if "teacache signal 'modulated'" in str(w.message)]
    assert len(told) == 1 and f"mixcache: {type(model).__name__}:" in told[0], told
    assert not (tmp_path / "m" / "program_modulation.pt2").exists()


def test_exported_model_decides_on_the_modulated_input_as_the_backend_does(tmp_path):
    """The modulated input's graph is saved as a program of its own: the loaded model reuses the
    same steps as the compiled one, with the same outputs."""
    model, kw = tiny_models.wan(layers=3)
    options = {"cache": {"rule": "teacache", "threshold": 0.3}, "regions": "eager"}
    dit_compile.export(model, str(tmp_path / "m"), {**kw, "return_dict": False}, options)
    assert (tmp_path / "m" / "program_modulation.pt2").exists()
    loaded = dit_compile.load(str(tmp_path / "m"))
    compiled = torch.compile(model, backend="mixcache", options=options)
    with torch.no_grad():
        for i, t in enumerate(torch.linspace(900, 100, 8)):
            call = dict(kw, hidden_states=kw["hidden_states"] * (1 - i / 20), timestep=t.reshape(1))
            torch.testing.assert_close(loaded(**call, return_dict=False)[0],
                                       compiled(**call, return_dict=False)[0],
                                       rtol=1e-5, atol=1e-5)
    got, want = (dit_compile.stats(m)["trace"] for m in (loaded, model))
    assert [r["action"] for r in got] == [r["action"] for r in want]
    assert "step" in {r["action"] for r in got}     # the premise: the rule reuses here
    # Decided on the same signal, not on the latent's change (None: no signal yet, a first call).
    assert [r["signal"] is None for r in got] == [w["signal"] is None for w in want]
    assert [r["signal"] for r in got if r["signal"] is not None] == pytest.approx(
        [w["signal"] for w in want if w["signal"] is not None], rel=1e-4)


def test_loaded_model_without_modulated_input_decides_on_the_latent_as_the_backend_does(tmp_path):
    """Exported with TeaCache's signal 'modulated' from a model whose blocks the timestep does not
    modulate: the export falls back to the latent (and says so, once), and the loaded model
    decides on it as the backend does with signal 'input'."""
    spec = random_dits.Spec(dim=8, depths=(3,), cross_attn=False, adaln=False, gated=False,
                            two_streams=False, extra_input=False, batch=1, tokens=4)
    model, kw = random_dits.build(spec)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dit_compile.export(model, str(tmp_path / "m"), kw,
                           {"cache": {"rule": "teacache", "threshold": 0.5}})
    loaded = dit_compile.load(str(tmp_path / "m"))
    compiled = torch.compile(model, backend="mixcache", options={
        "regions": "eager", "cache": {"rule": "teacache", "threshold": 0.5, "signal": "input"}})
    outs = {}
    for name, f in (("loaded", loaded), ("compiled", compiled)):
        x, outs[name] = kw["hidden_states"].clone(), []
        with torch.no_grad():
            for t in (900.0, 800.0, 700.0, 600.0):
                outs[name].append(f(**dict(kw, hidden_states=x, timestep=torch.tensor([t])))[0])
                x = x - 0.05 * outs[name][-1]
    actions = [[r["action"] for r in dit_compile.stats(m)["trace"]] for m in (loaded, model)]
    assert actions[0] == actions[1] and "step" in actions[0]
    for a, b in zip(outs["loaded"], outs["compiled"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


class _ShapedBlock(torch.nn.Module):
    """adaLN whose modulation reads the latent's shape only (``new_zeros``, ``zeros_like``), not
    its values."""

    def __init__(self, d=8):
        super().__init__()
        self.ada, self.qkv = torch.nn.Linear(d, 2 * d), torch.nn.Linear(d, d)
        self.norm = torch.nn.LayerNorm(d, elementwise_affine=False)

    def forward(self, x, temb):
        zero = x.new_zeros(temb.shape) + torch.zeros_like(x)[:, 0]
        shift, scale = self.ada(temb + zero).chunk(2, -1)
        return x + self.qkv(self.norm(x) * (1 + scale[:, None]) + shift[:, None])


class _ShapedDiT(torch.nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.proj_in, self.t_embed = torch.nn.Linear(4, d), torch.nn.Linear(8, d)
        self.blocks = torch.nn.ModuleList([_ShapedBlock(d), _ShapedBlock(d)])
        self.proj_out = torch.nn.Linear(d, 4)

    def forward(self, hidden_states, timestep):
        angles = timestep[:, None] * torch.arange(1.0, 5.0)
        x = self.proj_in(hidden_states)
        temb = self.t_embed(torch.cat([angles.sin(), angles.cos()], dim=-1))
        for block in self.blocks:
            x = block(x, temb)
        return self.proj_out(x)


def test_an_op_that_reads_the_latents_shape_only_is_no_dependence_on_the_latent():
    """``x.new_zeros(...)`` and ``torch.zeros_like(x)`` read the latent's shape, not its values
    (as ``size`` and ``dim`` do): the modulation's own linear layer reads the timestep alone, and
    the signal is what the block's first projection of the latent reads."""
    torch.manual_seed(0)
    model = _ShapedDiT().eval()
    kw = dict(hidden_states=torch.randn(1, 4, 4), timestep=torch.tensor([0.5]))
    seen = _seen_by(model.blocks[0].qkv, model, kw)
    torch.testing.assert_close(_found_and_value(model, kw), seen, rtol=0, atol=0)


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_a_teacache_reuse_counts_the_modulation_it_computed(dynamic):
    """A modulated-signal reuse computes the forward up to the first block's modulated input
    (its signal): stats counts that share, not nothing, nor the whole forward. A dynamic-shape
    graph weighs it at each call's sizes, as a static one does (its share was once left out)."""
    import tiny_models
    from test_cache import generation
    model, kw = tiny_models.wan(layers=3)
    kw["return_dict"] = False
    f = torch.compile(model, backend="mixcache", fullgraph=True, dynamic=dynamic, options={
        "regions": "eager", "cache": {"rule": "teacache", "signal": "modulated", "threshold": 10.0}})
    generation(f, kw)
    reused = [r["flops"] for r in dit_compile.stats(f)["trace"] if r["action"] == "step"]
    assert reused and all(0.0 < x < 0.2 for x in reused) and len(set(reused)) == 1, reused
