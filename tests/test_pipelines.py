"""mixcache inside diffusers' own pipelines (tiny random components, prompt_embeds in, latents out)."""
import copy
import inspect
import os
import sys
import warnings

import pytest
import torch

import dit_compile
import test_zoo
import tiny_models

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
import pipelines  # noqa: E402

# name: (transformer factory, pipeline factory, run, transformer calls per step, actions expected
# in each generation under CACHE below)
CASES = {
    "wan": (lambda: tiny_models.wan(layers=3)[0], pipelines.wan_pipeline, pipelines.run_wan, 2,
            {"step", "block", "cfg"}),
    # Wan 2.2 TI2V: per-token timesteps, the given image's tokens at zero.
    "wan_ti2v": (lambda: tiny_models.wan(layers=3)[0], pipelines.wan_ti2v_pipeline,
                 pipelines.run_wan_ti2v, 2, {"step", "block", "cfg"}),
    # Wan 2.1 I2V: the image's latent beside the noise (channels), its CLIP features beside
    # the text (run as TI2V is: the same pipeline class).
    "wan_i2v": (pipelines.wan_i2v_transformer, pipelines.wan_i2v_pipeline, pipelines.run_wan_ti2v,
                2, {"step", "block", "cfg"}),
    # True CFG, a call per branch, the negative prompt shorter than the prompt.
    "qwenimage": (lambda: test_zoo.qwenimage()[0], pipelines.qwenimage_pipeline,
                  pipelines.run_qwenimage, 2, {"step", "block", "cfg"}),
    # No guidance branches (guidance is an embedded scale): nothing for cfg reuse to act on.
    "flux": (lambda: tiny_models.flux()[0], pipelines.flux_pipeline, pipelines.run_flux, 1,
             {"step", "block"}),
    # The image to edit joins the latent's tokens (the model returns both).
    "flux_kontext": (lambda: tiny_models.flux()[0], pipelines.flux_kontext_pipeline,
                     pipelines.run_flux_kontext, 1, {"step", "block"}),
    "hunyuan": (lambda: tiny_models.hunyuan()[0], pipelines.hunyuan_pipeline, pipelines.run_hunyuan,
                2, {"step", "block", "cfg"}),
    # Batched CFG (one call, batch halves): fastercache reuses cfg at steps 1 and 3, and cfg
    # reuse, decided at entry, leaves no full compute at step 3 for the block guard to act in.
    "cogvideox": (pipelines.cogvideox_transformer, pipelines.cogvideox_pipeline,
                  pipelines.run_cogvideox, 1, {"step", "cfg"}),
    # Batched CFG likewise; its last block computes no text (context_pre_only).
    "sd3": (lambda: tiny_models.sd3()[0], pipelines.sd3_pipeline, pipelines.run_sd3, 1,
            {"step", "cfg"}),
}
STEPS = 4
CACHE = [{"rule": "schedule", "step": [2], "block": [3]}, {"rule": "fastercache", "every": 2}]


def _eager_run(name, steps):
    """The case's model, its pipeline, and the pipeline's eager output over ``steps``."""
    make, make_pipe, run, _, _ = CASES[name]
    model = make()
    pipe = make_pipe(model)
    pipe.set_progress_bar_config(disable=True)
    return model, pipe, run(pipe, steps)


@pytest.mark.parametrize("name", sorted(CASES))
def test_pipeline_cache_off_equals_eager_and_cache_on_runs(name):
    _, _, run, calls, expected = CASES[name]
    model, pipe, ref = _eager_run(name, STEPS)

    pipe.transformer = torch.compile(model, backend="mixcache",
                                     options={"regions": "eager", "cache": None})
    torch.testing.assert_close(run(pipe, STEPS), ref, rtol=1e-5, atol=1e-5)

    torch._dynamo.reset()
    pipe.transformer = torch.compile(model, backend="mixcache",
                                     options={"regions": "eager", "cache": CACHE})
    out = run(pipe, STEPS)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    # A second generation in a row, of the same seed, reuses nothing of the first: the same output.
    torch.testing.assert_close(run(pipe, STEPS), out, rtol=0, atol=0)
    trace = dit_compile.stats(pipe.transformer)["trace"]
    assert len(trace) == 2 * STEPS * calls
    assert {r["generation"] for r in trace} == {0, 1}
    assert max(r["branch"] for r in trace) == calls - 1
    for gen in (0, 1):
        acts = [r["action"] for r in trace if r["generation"] == gen]
        assert acts[:calls] == ["compute"] * calls, "a generation starts from nothing cached"
        assert set(acts) - {"compute"} == expected
        # The noise level falls step by step (per-token timesteps: the noisiest token's).
        ts = [r["t"] for r in trace if r["generation"] == gen and r["branch"] == 0]
        assert all(a > b for a, b in zip(ts, ts[1:])), ts


@pytest.mark.parametrize("name", sorted(CASES))
def test_default_cache_runs_in_every_pipeline(name):
    """No cache option: the balanced preset decides, in each pipeline's own calling pattern."""
    _, _, run, calls, _ = CASES[name]
    model, pipe, ref = _eager_run(name, 1)     # its shape alone is read, whatever the steps
    torch._dynamo.reset()
    pipe.transformer = torch.compile(model, backend="mixcache", options={"regions": "eager"})
    out = run(pipe, 8)
    trace = dit_compile.stats(pipe.transformer)["trace"]
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert len(trace) == 8 * calls
    assert {r["action"] for r in trace} == {"compute", "step"}, "the presets reuse whole steps"
    assert [r["action"] for r in trace[:calls]] == ["compute"] * calls


def test_forced_cfg_steps_where_guidance_is_truncated_are_said_not_to_apply():
    """ZImagePipeline's cfg_truncation turns guidance off for the last steps: a schedule whose
    cfg steps all fall there reused nothing, and nothing said so (a warning did only where no
    step had two branches). Steps where guidance is on apply, without a word."""
    model, _ = tiny_models.zimage()
    pipe = pipelines.zimage_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    # Eager first: the model builds its rotary table at its first call, a graph break of that
    # call alone (test_export's test_a_break_only_the_first_call_makes_does_not_stop_export),
    # which made the first compile trace the forward's broken frames, then the whole forward.
    pipelines.run_zimage(pipe, steps=1)
    for cfg, said in (([4], True), ([1, 2], False)):
        pipe.transformer = torch.compile(model, backend="mixcache", options={
            "regions": "eager", "cache": {"rule": "schedule", "cfg": cfg}})
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pipelines.run_zimage(pipe, steps=6, cfg_truncation=0.5)
            pipelines.run_zimage(pipe, steps=6, seed=1, cfg_truncation=0.5)
        told = [w for w in caught if "fell where the generation" in str(w.message)]
        assert bool(told) == said, cfg
        assert bool(dit_compile.stats(pipe.transformer)["reused"]) != said, cfg
        torch._dynamo.reset()
        dit_compile.frames.install_trace_hook()


def test_rising_timestep_in_zimage_pipeline():
    """ZImagePipeline passes 1 - sigma, rising through a generation, and batches CFG into one call
    of lists. With timestep='rising' a forced schedule reuses what it says in each of two
    generations in a row, the same each time, its calls told as batch halves. Unasked (the
    default, 'auto'), the rise is learned from the pipeline's sampler at the second step: the
    same outputs, and where guidance ends at that step, the same single generation. Told
    'falling', nothing is reused, with one hint."""
    model, _ = tiny_models.zimage()
    pipe = pipelines.zimage_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    ref = pipelines.run_zimage(pipe, 6)
    sched = {"rule": "schedule", "step": [2, 4], "block": [3], "cfg": [5]}
    pipe.transformer = torch.compile(model, backend="mixcache",
                                     options={"regions": "eager", "cache": sched, "timestep": "rising"})
    out = pipelines.run_zimage(pipe, 6)
    torch.testing.assert_close(pipelines.run_zimage(pipe, 6), out, rtol=0, atol=0)
    assert not torch.allclose(out, ref, rtol=1e-5, atol=1e-5), "the schedule must change something"
    trace = dit_compile.stats(pipe.transformer)["trace"]
    assert [(r["generation"], r["step"], r["action"]) for r in trace] == [
        (g, i, a) for g in (0, 1) for i, a in enumerate(
            ["compute", "compute", "step", "block", "step", "cfg"])]
    # Its latents and captions are lists: the two guidance branches are told as batch halves.
    assert all(r["halves"] for r in trace)
    # cfg_truncation turns guidance off for the last steps, halving the batch: the generation goes
    # on (it used to restart there, the schedule's steps counted anew), with nothing cached under
    # the old batch, so step 4 computes.
    with warnings.catch_warnings():
        warnings.simplefilter("error")      # no "past the last step" mid-generation
        pipelines.run_zimage(pipe, 6, cfg_truncation=0.5)
    trace = dit_compile.stats(pipe.transformer)["trace"][12:]
    assert [(r["generation"], r["step"], r["action"], r["halves"]) for r in trace] == [
        (2, i, a, i < 4) for i, a in enumerate(
            ["compute", "compute", "step", "block", "compute", "compute"])]

    torch._dynamo.reset()
    pipe.transformer = torch.compile(model, backend="mixcache",
                                     options={"regions": "eager", "cache": sched})
    # Learned where guidance ends after the first step (the batch halves at the call that shows
    # the rise): one generation, as under timestep='rising'.
    pipelines.run_zimage(pipe, 6, cfg_truncation=0.05)
    trace = dit_compile.stats(pipe.transformer)["trace"]
    assert [(r["generation"], r["step"], r["action"], r["halves"]) for r in trace] == [
        (0, i, a, i < 1) for i, a in enumerate(
            ["compute", "compute", "step", "block", "step", "compute"])]
    assert trace[0]["t"] == 1.0
    torch.testing.assert_close(pipelines.run_zimage(pipe, 6), out, rtol=0, atol=0)

    torch._dynamo.reset()
    pipe.transformer = torch.compile(model, backend="mixcache",
                                     options={"regions": "eager", "cache": sched,
                                              "timestep": "falling"})
    with pytest.warns(UserWarning, match="'timestep': 'rising'"):
        out = pipelines.run_zimage(pipe, 6)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert dit_compile.stats(pipe.transformer)["reused"] == {}


@pytest.mark.parametrize("dynamic", [False, True])
def test_zimage_cfg_reuse_runs_the_conditional_half_of_its_lists(dynamic):
    """ZImagePipeline batches CFG as lists: ``[latents, latents]`` and ``[positive, negative]``
    captions. A cfg reuse step runs the forward on the first half of each list, the positive
    prompt's (half the FLOPs), and rebuilds the negative half from the difference of the last
    full compute, as the eager reference of that rule does (the reference computing the other
    half differs from it). Under dynamic=True too, where each sample's sizes are symbols."""
    import warnings
    from reference_cache import BatchedCfgReference
    model, _ = tiny_models.zimage()
    pipe = pipelines.zimage_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    cfg = [2, 4, 5]
    full = pipelines.run_zimage(pipe, 6)
    refs = {}
    for first in (True, False):
        pipe.transformer = BatchedCfgReference(model, cfg, cond="cap_feats", latent="x", time="t",
                                               rising=True, cond_first=first).model
        refs[first] = pipelines.run_zimage(pipe, 6)
    ref = refs[True]
    assert (ref - full).abs().max() > 1e-3, "the rule must change the result for the test to bite"
    assert (ref - refs[False]).abs().max() > 1e-3, "which half is computed must show"
    pipe.transformer = torch.compile(model, backend="mixcache", dynamic=dynamic, options={
        "regions": "eager", "cache": {"rule": "schedule", "cfg": cfg}, "timestep": "rising"})
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="mixcache")   # the half forward exists
        out = pipelines.run_zimage(pipe, 6)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    trace = dit_compile.stats(pipe.transformer)["trace"]
    assert [(r["action"], r["flops"]) for r in trace] == [
        ("cfg", 0.5) if i in cfg else ("compute", 1.0) for i in range(6)]


def test_a_broken_forward_caches_none_of_its_graphs():
    """HunyuanImage with its ByT5 text breaks the graph (masks select the tokens), and Dynamo
    compiles its token refiner as a frame of its own, whose inputs are named `hidden_states` (the
    text) and `timestep`. No graph of a broken forward is cached: the refiner's refined text was
    once carried from one prompt's call to the other's. With a forced schedule, the pipeline's
    output is eager's, and the user is told why."""
    torch.manual_seed(0)
    model = tiny_models.diffusers_class("HunyuanImageTransformer2DModel")(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
        num_single_layers=2, num_refiner_layers=2, mlp_ratio=2.0, patch_size=(1, 1),
        text_embed_dim=16, text_embed_2_dim=8, rope_axes_dim=(4, 4)).eval()
    pipe = pipelines.hunyuanimage_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    ref = pipelines.run_hunyuanimage(pipe)
    pipe.transformer = torch.compile(model, backend="mixcache", options={
        "regions": "eager", "cache": {"rule": "schedule", "step": [2, 4], "cfg": [3], "block": [5]}})
    with pytest.warns(UserWarning, match="graph breaks split its forward"):
        out = pipelines.run_hunyuanimage(pipe)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_a_generation_begun_below_the_last_ones_end_reuses_nothing_of_it():
    """Generations that start below the last one's last timestep (img2img at a low strength after
    a few-step generation, or after one a callback stopped with an error), in FluxPipeline and in
    a modular pipeline (no maybe_free_model_hooks at its end), with one compiled model. The
    timesteps alone make each look like the last one's next steps, and a schedule reusing step 3
    served it the last one's output; each is a new generation (the pipeline's sampler run), equal
    to itself run alone, with no recompile."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.modular_pipelines.flux.modular_blocks_flux import FluxCoreDenoiseStep

    class Stop(Exception):
        pass

    def stop_at_step_1(pipe, i, t, kwargs):
        if i == 1:
            raise Stop
        return kwargs

    torch._dynamo.reset()
    model = tiny_models.flux()[0]
    # In place: the modular pipeline tests `if transformer`, which an OptimizedModule refuses.
    model.compile(backend="mixcache",
                  options={"regions": "eager", "cache": {"rule": "schedule", "step": [1, 3]}})
    pipe = pipelines.flux_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    modular = FluxCoreDenoiseStep().init_pipeline()
    modular.update_components(transformer=model, scheduler=FlowMatchEulerDiscreteScheduler())
    g = torch.Generator().manual_seed(7)                # one prompt for every generation
    cfg = model.config
    text = dict(prompt_embeds=torch.randn(1, 6, cfg.joint_attention_dim, generator=g),
                pooled_prompt_embeds=torch.randn(1, cfg.pooled_projection_dim, generator=g))

    def run(sigmas, seed, **kwargs):
        g = torch.Generator().manual_seed(seed)
        if kwargs.pop("modular", False):
            return modular(**text, height=32, width=32, sigmas=sigmas, generator=g,
                           num_inference_steps=len(sigmas), output="latents")
        return pipe(**text, height=32, width=32, sigmas=sigmas, guidance_scale=3.5,
                    output_type="latent", generator=g, **kwargs).images

    low = [0.5, 0.3]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")     # step 3 never comes: the schedule says so
        with torch._dynamo.config.patch(error_on_recompile=True):
            run([1.0, 0.9, 0.8], seed=0)
            after_few_steps = run(low, seed=1)
            with pytest.raises(Stop):
                run([1.0, 0.9, 0.8], seed=0, callback_on_step_end=stop_at_step_1)
            after_error = run(low, seed=1)
        # (The modular pipeline calls the model with other arguments: Dynamo compiles again.)
        run([1.0, 0.9, 0.8], seed=0, modular=True)
        after_modular = run(low, seed=1, modular=True)
    three = ["compute", "step", "compute"]  # per generation: its actions, from its step 0
    expected = [three, three[:2], three[:2], three[:2], three, three[:2]]
    trace = dit_compile.stats(model)["trace"]
    assert [(r["generation"], r["step"], r["action"]) for r in trace] == [
        (gen, step, action) for gen, actions in enumerate(expected)
        for step, action in enumerate(actions)]
    dit_compile.reset(model)
    alone = run(low, seed=1)
    torch.testing.assert_close(after_few_steps, alone, rtol=0, atol=0)
    torch.testing.assert_close(after_error, alone, rtol=0, atol=0)
    dit_compile.reset(model)
    torch.testing.assert_close(after_modular, run(low, seed=1, modular=True), rtol=0, atol=0)


def test_heun_second_evaluation_at_a_timestep_is_computed():
    """Heun's sampler calls the model twice at one timestep, the second time on the corrected
    latent. The policy's estimates measure how far the timestep moved, so there they would call a
    reuse free and hand back the last call's output: the default cache must compute such calls,
    and still reuse at the others."""
    from diffusers import FlowMatchHeunDiscreteScheduler
    torch._dynamo.reset()
    pipe = pipelines.wan_pipeline(torch.compile(tiny_models.wan(layers=3)[0], backend="mixcache",
                                                options={"regions": "eager"}))
    pipe.scheduler = FlowMatchHeunDiscreteScheduler(shift=3.0)
    pipe.set_progress_bar_config(disable=True)
    pipelines.run_wan(pipe, 20, size=32)
    trace = dit_compile.stats(pipe.transformer)["trace"]
    assert len(trace) == 2 * 39
    for b in (0, 1):
        calls = [r for r in trace if r["branch"] == b]
        assert any(r["action"] == "step" for r in calls), "the test must reuse"
        for prev, r in zip(calls, calls[1:]):
            if r["t"] == prev["t"]:
                assert r["action"] == "compute", f"step {r['step']} reused at its own timestep"


def test_each_chunk_of_a_diffusion_forcing_long_video_is_a_generation():
    """SkyReelsV2DiffusionForcingPipeline makes a long video in chunks, each denoised from noise
    but the frames it carries over (clean, timestep 0), with one timestep per frame, all in one
    run of its sampler. Each chunk is a generation (its noisiest frame's timestep rises back), the
    forced schedule applied to each from its first step, equal to a fresh eager reference of the
    rule per chunk; with nothing cached, equal to eager."""
    import copy
    import zoo_video
    from reference_cache import Reference
    model, _ = zoo_video.skyreels_v2()
    pipe = pipelines.skyreels_df_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    long = dict(num_frames=25, overlap_history=9)      # two chunks of 5 latent frames, 3 shared
    eager = pipelines.run_skyreels_df(pipe, **long)
    sched = dict(step=[2, 4], block=[3], cfg=[5])
    pipe.transformer = torch.compile(model, backend="mixcache",
                                     options={"regions": "eager", "cache": None})
    torch.testing.assert_close(pipelines.run_skyreels_df(pipe, **long), eager, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()
    pipe.transformer = torch.compile(model, backend="mixcache",
                                     options={"regions": "eager", "cache": {"rule": "schedule", **sched}})
    ours = pipelines.run_skyreels_df(pipe, **long)
    actions = ["compute", "compute", "step", "block", "step", "cfg"]    # branch 1's; branch 0
    trace = dit_compile.stats(pipe.transformer)["trace"]               # computes at step 5
    assert [(r["generation"], r["step"], r["branch"], r["action"]) for r in trace] == [
        (g, i, b, "compute" if (i, b) == (5, 0) else a)
        for g in (0, 1) for i, a in enumerate(actions) for b in (0, 1)]

    class PerChunk:
        """A fresh reference at each rise of the noisiest frame's timestep."""
        def __init__(self):
            self.ref, self.last = None, None

        def __call__(self, **kw):
            t = float(kw["timestep"].max())
            if self.last is None or t > self.last:
                self.ref = Reference(model, **sched).start(t)
            self.last = t
            return (self.ref(**kw),)

    pipe.transformer = copy.deepcopy(model)
    pipe.transformer.forward = PerChunk()
    torch.testing.assert_close(ours, pipelines.run_skyreels_df(pipe, **long), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ours, eager, rtol=1e-4, atol=1e-4), "the schedule must change something"

@pytest.mark.parametrize("nets,switches", [
    (1, [dict(control_guidance_end=0.6), dict(control_guidance_start=0.4)]),
    (2, [dict(control_guidance_start=[0.0, 0.0], control_guidance_end=[0.5, 1.0])])])
def test_a_controlnet_switched_on_or_off_is_not_reused_across(nets, switches):
    """FluxControlNetPipeline with ``control_guidance_end`` (``_start``) passes the transformer
    zeros for the ControlNet's residuals from (until) some step; with two nets, the sum of their
    residuals loses one of them (about 40% of its magnitude). The outputs before the switch say
    nothing of it, and ``balanced`` extrapolated them across: at 8 steps it reused step 4, the
    first of the other control, and ended 0.08 (two nets: 0.056) off eager where it is 0.014
    off without a switch. A call whose conditions switched computes."""
    model = tiny_models.flux()[0]
    pipe = pipelines.flux_controlnet_pipeline(model, nets)
    pipe.set_progress_bar_config(disable=True)
    refs = [pipelines.run_flux_controlnet(pipe, **kw) for kw in switches]
    torch._dynamo.reset()
    pipe.transformer = torch.compile(model, backend="mixcache", options={"regions": "eager"})
    for gen, (kw, ref) in enumerate(zip(switches, refs)):
        out = pipelines.run_flux_controlnet(pipe, **kw)
        acts = [r["action"] for r in dit_compile.stats(pipe.transformer)["trace"]
                if r["generation"] == gen]
        assert len(acts) == 8 and "step" in acts[:4], "the test must reuse before the switch"
        assert acts[4] == "compute", f"{kw}: reused at the switch: {acts}"
        switched = [r["switched"] for r in dit_compile.stats(pipe.transformer)["trace"]
                    if r["generation"] == gen]
        assert switched[4] == (True,), "the trace says why"
        assert ((out - ref).norm() / ref.norm()) < 0.03


@pytest.mark.inductor
def test_readme_demo_runs(capsys):
    """The README's first command ends in ``python bench/demo.py``: at 8 steps, each of its rows
    runs; with caching off the backend gives what eager gives, and on the trained model the
    default preset reuses part of the generation (0.62 of the FLOPs at 33.7 dB on the CPU, where
    this was written) and stays well away from a broken video."""
    import demo
    rows = {name: (psnr, frac) for name, _, _, psnr, frac in demo.main(["--cases", "1", "--steps", "8"])}
    assert list(rows) == ["eager", "inductor", "mixcache (cache off)", "mixcache preset quality",
                          "mixcache (default: balanced)", "mixcache preset fast"]
    assert rows["mixcache (cache off)"][1] == 1.0
    assert rows["mixcache (cache off)"][0] > 80 and rows["inductor"][0] > 80   # fp32 rounding apart
    assert rows["mixcache (default: balanced)"][1] < 1.0
    assert rows["mixcache (default: balanced)"][0] > 25
    assert all(0 < frac <= 1 for _, frac in rows.values())
    assert "mixcache (cache off)" in capsys.readouterr().out


def _count_host_reads(monkeypatch) -> list[int]:
    """Host reads of a tensor's values (a host sync where the tensor is on a GPU) made inside the
    executor, from here on: [count]."""
    from dit_compile.runtime.executor import GuardedExecutor
    reads, inside = [0], [False]
    executor_call = GuardedExecutor.__call__

    def counted_call(self, *args):
        inside[0] = True
        try:
            return executor_call(self, *args)
        finally:
            inside[0] = False

    def counting(name):
        original = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            reads[0] += inside[0]
            return original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, read)

    for name in ("__float__", "__bool__", "item", "tolist"):
        counting(name)
    monkeypatch.setattr(GuardedExecutor, "__call__", counted_call)
    return reads


def test_a_generation_reads_its_timesteps_once(monkeypatch):
    """WanPipeline passes each step's timestep as a view of one element of
    ``scheduler.timesteps``, to both guidance branches. The runtime reads the noise level off the
    run's timesteps, copied to the host once (a host sync makes the host wait for the device's
    queue, and the device idle while the host decides): one read in a generation of 12 calls, not
    one a step, or one a call."""
    steps = 6
    schedule = {"rule": "schedule", "cfg": [1, 3, 5]}
    model = tiny_models.wan(layers=3)[0]
    pipe = pipelines.wan_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    pipe.transformer = torch.compile(model, backend="mixcache",
                                     options={"regions": "eager", "cache": schedule})
    ref = pipelines.run_wan(pipe, steps)          # traced and warm
    reads = _count_host_reads(monkeypatch)
    out = pipelines.run_wan(pipe, steps)
    monkeypatch.undo()
    assert reads[0] == 1, f"{reads[0]} host reads in {2 * steps} calls"
    assert torch.equal(out, ref)
    assert {r["action"] for r in dit_compile.stats(pipe.transformer)["trace"]} == {"compute", "cfg"}


def test_mochis_rising_timestep_caches():
    """MochiPipeline passes 1000 (1 - sigma), rising from 0: read as rising on that scale (learned
    under the default; asked for, test_cache.py), one pipeline call is one generation, and a
    forced schedule reuses at its steps exactly what an eager replay of the same rule does.
    (Every call was a generation of its own, and timestep='rising' an error.)"""
    from test_zoo import mochi
    model = mochi()[0]
    pipe = pipelines.mochi_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    replay = copy.deepcopy(model)
    forward, outs = replay.forward, []

    def reuse_steps_3_and_5(*args, **kwargs):
        outs.append(outs[-1] if len(outs) in (3, 5) else forward(*args, **kwargs)[0])
        return (outs[-1],)

    replay.forward = reuse_steps_3_and_5
    pipe.transformer = replay
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="In CPU autocast")
        ref = pipelines.run_mochi(pipe)
        schedule = {"rule": "schedule", "step": [3, 5]}
        pipe.transformer = torch.compile(model, backend="mixcache", fullgraph=True, options={
            "regions": "eager", "cache": schedule})
        out = pipelines.run_mochi(pipe)
    trace = dit_compile.stats(pipe.transformer)["trace"]
    assert [(r["generation"], r["step"]) for r in trace] == [(0, i) for i in range(8)]
    assert [i for i, r in enumerate(trace) if r["action"] == "step"] == [3, 5]
    assert trace[0]["t"] == pytest.approx(1000.0)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def _minimax_h3_denoise(model, conditioning: tuple[int, int], steps: int = 10) -> torch.Tensor:
    """MiniMax-H3's modular denoise loop (no VAEs or text encoders): its own schedulers (video
    and audio shifts 12 and 3) and its own row-timestep step, whose timestep is the rows'
    distinct values, 1 - sigma, rising (``conditioning`` video and audio rows held near 1,
    clean); latents stepped in place, one call a step, from a caller holding ``scheduler``."""
    import zoo_video
    from diffusers.modular_pipelines.minimax_h3.before_denoise import MiniMaxH3SetTimestepsStep
    from diffusers.schedulers.scheduling_minimax_h3 import MiniMaxH3Scheduler

    kw = zoo_video.minimax_h3()[1]
    rows = {k: kw[k] for k in ("token_tags", "position_ids", "video_indices", "audio_indices",
                               "text_indices")}

    class Loop:
        scheduler, audio_scheduler = MiniMaxH3Scheduler(shift=12.0), MiniMaxH3Scheduler(shift=3.0)

        def __call__(self):
            g = torch.Generator().manual_seed(0)
            self.scheduler.set_timesteps(steps)
            self.audio_scheduler.set_timesteps(steps)
            video, audio = torch.randn(8, 16, generator=g), torch.randn(4, 4, generator=g)
            text = torch.randn(1, 6, 16, generator=g)
            cv, ca = conditioning
            for t, ta in zip(self.scheduler.timesteps, self.audio_scheduler.timesteps):
                timestep, index = MiniMaxH3SetTimestepsStep.build_row_timesteps(
                    rows["video_indices"], rows["audio_indices"], cv, ca, rows["text_indices"].numel(),
                    float(t), float(ta), max(float(t), 0.999), 1.0)
                with torch.no_grad():
                    v, a = model(hidden_states=video[None], audio_hidden_states=audio[None],
                                 encoder_hidden_states=text, timestep=timestep,
                                 timestep_indices=index, return_dict=False, **rows)
                video[cv:] = self.scheduler.step(v[0, cv:], t, video[cv:], return_dict=False)[0]
                audio[ca:] = self.audio_scheduler.step(a[0, ca:], ta, audio[ca:],
                                                       return_dict=False)[0]
            return torch.cat([video.flatten(), audio.flatten()])

    return Loop()()


@pytest.mark.parametrize("conditioning", [(0, 0), (4, 1)], ids=["t2va", "keyframes_and_audio"])
def test_minimax_h3s_per_row_timestep_is_learned_rising(conditioning):
    """MiniMax-H3 passes its rows' distinct timesteps (1 - sigma, rising; conditioning rows held
    at 0.999 and 1). Under the default the rise was never learned, since those values differ:
    text-to-video made every call a generation (a hint said so); with conditioning rows, whose 1
    is the largest value at every step, every call was read at one level, as another guidance
    pass of the first step, and nothing was reused, without a word. Now read as rising, as under
    timestep='rising': the same decisions and levels, and reuse. (The timestep's length changes
    after the first step, one distinct value becoming two: that step is a generation of its own.)"""
    import zoo_video
    model = zoo_video.minimax_h3()[0]
    traces, outs = [], []
    for options in ({}, {"timestep": "rising"}):
        torch._dynamo.reset()
        dit_compile.frames.install_trace_hook()
        f = torch.compile(model, backend="mixcache",
                          options={"regions": "eager", "cache": "balanced", **options})
        outs.append(_minimax_h3_denoise(f, conditioning))
        traces.append([(r["generation"], r["step"], r["action"], round(r["t"], 6))
                       for r in dit_compile.stats(f)["trace"]])
    assert traces[0] == traces[1]
    assert [g for g, *_ in traces[0]] == [0] + [1] * (len(traces[0]) - 1)
    assert sum(a != "compute" for _, _, a, _ in traces[0]) >= 3
    assert all(a > b for (*_, a), (*_, b) in zip(traces[0][1:], traces[0][2:]))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)


def test_mochis_first_generation_decides_as_every_later_one():
    """At 64 steps Mochi's timestep (1000 (1 - sigma)) stays below 1 over its first two steps, so
    a fresh state reads it on [0, 1] until the third shows the scale. MixCache's trigger compared
    the change of those first steps per unit of [0, 1], 1000 times too small: it settled at
    once, and the first generation reused from call 34, where every later one, the scale known
    from its start, reused from call 40 (0.23 apart on the same inputs). The range is read when
    the change is folded in, after the scale is known."""
    from test_zoo import mochi
    pipe = pipelines.mochi_pipeline(torch.compile(mochi()[0], backend="mixcache", fullgraph=True,
                                                  options={"regions": "eager"}))
    pipe.set_progress_bar_config(disable=True)
    outs, actions = [], []
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="In CPU autocast")
        for _ in range(2):
            outs.append(pipelines.run_mochi(pipe, steps=64, seed=1))
            trace = dit_compile.stats(pipe.transformer)["trace"]
            last = trace[-1]["generation"]
            actions.append([r["action"] for r in trace if r["generation"] == last])
    assert set(actions[1]) != {"compute"}, "the test's premise: the later generation reuses"
    assert actions[0] == actions[1]
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)


def test_a_reused_call_decides_on_the_host(monkeypatch):
    """Under the default policy, the runtime's work in a reused call is mostly bookkeeping, which
    runs on the host (NumPy): the only tensor ops such a call issues are the extrapolation's (a
    weighted sum of the last computed outputs: a multiply, then an add per further output) and
    the copy the cache keeps of it (the caller owns the one returned). As one-element tensors,
    the per-sample signals cost 24 ops of a few microseconds each there."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from dit_compile.runtime.executor import GuardedExecutor

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen[-1].append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    model = tiny_models.wan(layers=3)[0]
    pipe = pipelines.wan_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    pipe.transformer = torch.compile(model, backend="mixcache", options={"regions": "eager"})
    pipelines.run_wan(pipe, 20)                   # traced and warm
    executor_call, seen = GuardedExecutor.__call__, []

    def counted(self, *args):
        seen.append([])
        with Ops():
            return executor_call(self, *args)
    monkeypatch.setattr(GuardedExecutor, "__call__", counted)
    dit_compile.reset(pipe.transformer)
    pipelines.run_wan(pipe, 20)
    monkeypatch.undo()
    actions = [r["action"] for r in dit_compile.stats(pipe.transformer)["trace"]]
    reused = [ops for ops, action in zip(seen, actions) if action == "step"]
    assert len(seen) == 40 and len(reused) >= 8, actions
    allowed = {"mul", "add_", "_to_copy", "promote_types", "detach", "clone"}
    assert all(set(ops) <= allowed and len(ops) <= 7 for ops in reused), reused


def test_mixcache_deciding_cfg_reuse_reads_only_its_timesteps():
    """MixCache given the cfg granularity measures the guidance difference's rate at each step
    that computes both branches, and reads it at the next cfg decision: copied to the host then,
    not read as the step computes (that read would make the host wait for the step's kernels on
    a GPU). A generation of WanPipeline that reuses cfg still reads only its timesteps."""
    steps = 8
    model = tiny_models.wan(layers=3)[0]
    pipe = pipelines.wan_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    pipe.transformer = torch.compile(model, backend="mixcache", options={
        "regions": "eager", "cache": {"rule": "mixcache", "granularities": ["cfg"],
                                      "budget": 1.0, "warmup": 0.0, "settle": 10.0}})
    pipelines.run_wan(pipe, steps)          # traced and warm
    with pytest.MonkeyPatch.context() as mp:
        reads = _count_host_reads(mp)
        pipelines.run_wan(pipe, steps)
    actions = [r["action"] for r in dit_compile.stats(pipe.transformer)["trace"][-2 * steps:]]
    assert "cfg" in actions, actions
    assert reads[0] == 1, f"{reads[0]} host reads in {2 * steps} calls"


@pytest.mark.gpu
def test_a_balanced_generation_syncs_once_on_gpu():
    """On the GPU, under the default policy: the only host sync inside the executor in a
    generation is the copy of the run's timesteps. The rates a computed call measures reach the
    host by a copy that the next decision waits for alone (an event), so no call waits for its
    own kernels and a reused one never waits for the device at all."""
    steps = 8
    model = tiny_models.wan(layers=3)[0].cuda()
    pipe = pipelines.wan_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    pipe.transformer = torch.compile(model, backend="mixcache", options={"regions": "eager"})
    from dit_compile.runtime.executor import GuardedExecutor
    executor_call, syncs = GuardedExecutor.__call__, []

    def watched(self, *args):
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always")
                return executor_call(self, *args)
        finally:
            torch.cuda.set_sync_debug_mode("default")
            syncs.extend(str(w.message) for w in seen if "synchroniz" in str(w.message))

    with torch.no_grad():
        pipelines.run_wan(pipe, steps, device="cuda")      # traced and warm
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(GuardedExecutor, "__call__", watched)
            pipelines.run_wan(pipe, steps, device="cuda")
    actions = [r["action"] for r in dit_compile.stats(pipe.transformer)["trace"][-2 * steps:]]
    assert "step" in actions and "compute" in actions, actions
    assert len(syncs) == 1, syncs


def _ltx2_pipeline(model, image=False):
    """LTX2Pipeline (``image``: LTX2ImageToVideoPipeline) around ``model``, its other components
    tiny (the VAEs give the latents' scale and the sizes; the connectors turn the given
    embeddings into the model's texts)."""
    from diffusers import (AutoencoderKLLTX2Audio, AutoencoderKLLTX2Video,
                           FlowMatchEulerDiscreteScheduler, LTX2ImageToVideoPipeline, LTX2Pipeline)
    from diffusers.pipelines.ltx2.connectors import LTX2TextConnectors
    torch.manual_seed(0)
    heads = dict(num_attention_heads=2, attention_head_dim=8, num_layers=1,
                 num_learnable_registers=None)
    connectors = LTX2TextConnectors(
        caption_channels=16, text_proj_in_factor=1, video_hidden_dim=16, audio_hidden_dim=16,
        **{f"{m}_connector_{k}": v for m in ("video", "audio") for k, v in heads.items()})
    vae = AutoencoderKLLTX2Video(
        latent_channels=4, block_out_channels=(8,), down_block_types=("LTX2VideoDownBlock3D",),
        decoder_block_out_channels=(8,), layers_per_block=(1, 1), decoder_layers_per_block=(1, 1),
        spatio_temporal_scaling=(True,), decoder_spatio_temporal_scaling=(True,),
        decoder_inject_noise=(False, False), downsample_type=("spatial",),
        upsample_type=("spatiotemporal",), upsample_residual=(True,), upsample_factor=(2,),
        spatial_compression_ratio=32, temporal_compression_ratio=8)
    # Its latents' mean and std have base_channels entries: the model's audio features (8 latent
    # channels x 16 mel bins).
    audio_vae = AutoencoderKLLTX2Audio(base_channels=128, ch_mult=(1,), num_res_blocks=1)
    pipe = (LTX2ImageToVideoPipeline if image else LTX2Pipeline)(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, audio_vae=audio_vae,
        text_encoder=None, tokenizer=None, connectors=connectors, transformer=model, vocoder=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run_ltx2(pipe, steps=6):
    """LTX2Pipeline's default guidance (CFG, spatio-temporal at the model's last block, modality
    isolation): three calls a step, the first of batch 2. The video latents after each step."""
    g = torch.Generator().manual_seed(1)
    text = torch.randn(1, 6, 16, generator=g)
    latents = []
    image = {}
    if "image" in inspect.signature(pipe.__call__).parameters:
        # The image's latents given as the first latent frame (the tiny VAE does not compress
        # by the ratio its config states, so its encoding would not fit): the pipeline keeps
        # those tokens clean, at timestep 0, while the others are denoised.
        image = dict(image=torch.rand(1, 3, 64, 64, generator=g), image_crf=0,
                     latents=torch.randn(1, 4, 2, 2, 2, generator=g))

    def keep(pipe, i, t, kw):
        latents.append(kw["latents"].clone())
        return kw
    with torch.no_grad():
        pipe(prompt_embeds=text, negative_prompt_embeds=torch.zeros_like(text),
             prompt_attention_mask=torch.ones(1, 6), negative_prompt_attention_mask=torch.ones(1, 6),
             height=64, width=64, num_frames=9, num_inference_steps=steps,
             spatio_temporal_guidance_blocks=[1], generator=torch.Generator().manual_seed(2),
             output_type="latent", callback_on_step_end=keep, **image)
    return latents


def _tiny_ltx2():
    return tiny_models.seeded(
        "LTX2VideoTransformer3DModel", in_channels=4, out_channels=4, num_attention_heads=2,
        attention_head_dim=8, cross_attention_dim=16, audio_in_channels=128,
        audio_out_channels=128, audio_num_attention_heads=2, audio_attention_head_dim=8,
        audio_cross_attention_dim=16, num_layers=2, caption_channels=16)


def _reused_at_steps(model, steps):
    """``model`` as an eager reference that reuses each branch's last computed output at
    ``steps`` (a step: a new highest timestep; a branch: the call's place in its step)."""
    forward, kept, calls = model.forward, {}, []

    def reused_at_steps(*args, **kw):
        t = float(kw["timestep"].max())
        calls.append(t)
        step, branch = len(set(calls)) - 1, calls.count(t) - 1
        if step not in steps:
            kept[branch] = forward(*args, **kw)
        return kept[branch]
    model.forward = reused_at_steps
    return model


def _ltx2_forced_schedule_matches_reference(model, image):
    """``model`` compiled in its pipeline under a forced schedule (steps 2 and 4, cfg at 5): every
    call of its three a step in its step and branch, the latents as the eager reference's. The
    pipeline, for more."""
    steps = {2, 4}
    theirs = _run_ltx2(_ltx2_pipeline(_reused_at_steps(copy.deepcopy(model), steps), image=image))
    pipe = _ltx2_pipeline(model, image=image)
    pipe.transformer = torch.compile(model, backend="mixcache", options={
        "regions": "eager", "cache": {"rule": "schedule", "step": sorted(steps), "cfg": [5]}})
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="mixcache")
        ours = _run_ltx2(pipe)
    trace = [(r["generation"], r["step"], r["branch"], r["action"])
             for r in dit_compile.stats(pipe.transformer)["trace"]]
    assert trace == [(0, s, b, "step" if s in steps else "compute")
                     for s in range(5) for b in range(3)] + [
        (0, 5, 0, "cfg"), (0, 5, 1, "compute"), (0, 5, 2, "compute")], trace
    for x, y in zip(ours[:5], theirs[:5]):     # the last step: cfg reuse, not the reference's
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
    return pipe


def test_ltx2_guidance_passes_of_one_sample_cache_as_branches_of_the_step():
    """LTX2Pipeline's default guidance calls the model three times a step at one timestep: a
    batched-CFG call (batch 2), then spatio-temporal and modality-isolation passes of one sample.
    Each is a branch of the step with a cache of its own (a change of shape used to start a
    generation, so nothing was reused): a forced step schedule gives what an eager model that
    reuses each call's last computed output at those steps gives. cfg reuse takes no branch
    difference between calls of two batches (broadcast, it rebuilt a pass at batch 2): the
    passes compute at its step. MixCache ties the branches' step decisions (it failed on the
    passes' other batch)."""
    model = _tiny_ltx2()
    pipe = _ltx2_forced_schedule_matches_reference(model, image=False)

    # MixCache decides a step for every branch at once, each pass's samples as a whole.
    pipe.transformer = torch.compile(model, backend="mixcache", options={
        "regions": "eager", "cache": {"rule": "mixcache", "per_sample": True}})
    dit_compile.reset(pipe.transformer)
    _run_ltx2(pipe)
    trace = dit_compile.stats(pipe.transformer)["trace"]
    by_step = [{r["action"] for r in trace if r["step"] == s} for s in range(6)]
    assert all(len(a) == 1 for a in by_step) and {"step"} in by_step, by_step


def test_ltx2_image_to_video_caches_with_its_image_tokens_at_timestep_zero():
    """LTX2ImageToVideoPipeline hands the model a timestep per token, 0 at the image's (kept
    clean) and the step's elsewhere, with LTX-2's three guidance calls a step. A forced step
    and cfg schedule gives what the eager reference of the same reuse rule gives, every call
    placed in its step and branch."""
    _ltx2_forced_schedule_matches_reference(_tiny_ltx2(), image=True)


@pytest.mark.parametrize("dynamic", [False, None])
def test_the_flops_fraction_weighs_each_call_by_its_forwards_flops(dynamic):
    """Qwen-Image's true CFG with a negative prompt of 64 tokens against the prompt's 4: the
    negative branch's calls cost five times the prompt's, and cfg reuse skips three of them. The
    fraction ``stats`` reports was the mean of the calls' own fractions (0.75 here), not the
    fraction of the generation's FLOPs computed (0.59), which is counted here call by call.
    Each text length its own graph (static shapes), or one graph for both (Dynamo's automatic
    dynamic shapes, at the second length): its calls counted at their own sizes, when asked."""
    from dit_compile.flops import flop_counter
    model, _ = test_zoo.qwenimage()
    compiled = torch.compile(model, backend="mixcache", dynamic=dynamic, options={
        "regions": "eager", "cache": {"rule": "schedule", "cfg": [2, 3, 4]}})
    signature, calls = inspect.signature(model.forward), []
    compiled.register_forward_pre_hook(
        lambda m, args, kwargs: calls.append(signature.bind_partial(*args, **kwargs).arguments),
        with_kwargs=True)
    g, dim = torch.Generator().manual_seed(0), model.config.joint_attention_dim
    pipelines.qwenimage_pipeline(compiled)(
        prompt_embeds=torch.randn(1, 4, dim, generator=g), prompt_embeds_mask=torch.ones(1, 4),
        negative_prompt_embeds=torch.randn(1, 64, dim, generator=g),
        negative_prompt_embeds_mask=torch.ones(1, 64), true_cfg_scale=4.0, height=64, width=64,
        num_inference_steps=6, output_type="latent", generator=g)
    stats = dit_compile.stats(compiled)
    costs = []
    for call in calls:
        with torch.no_grad(), flop_counter() as counter:
            model(**call)
        costs.append(counter.get_total_flops())
    fractions = [r["flops"] for r in stats["trace"]]
    assert len(fractions) == len(costs) == 12 and stats["reused"] == {"cfg": 3}
    assert costs[1] > 4 * costs[0], "the test's premise: the branches differ in cost"
    assert stats["flops_fraction"] == pytest.approx(
        sum(f * c for f, c in zip(fractions, costs)) / sum(costs), rel=1e-6)


def test_a_block_reuse_at_other_sizes_weighs_the_span_at_those_sizes():
    """One graph for three resolutions (Dynamo's automatic dynamic shapes from the second): a
    block-reused call was weighed by the span's share of the forward at the compile's sizes
    (0.63 at 64 pixels, 0.60 at 32), so the fraction ``stats`` reports was 0.631 where the
    FLOPs counted call by call, a full forward and one of the blocks before the span (the probe)
    at each call's sizes, give 0.627; the trace's per-call fractions were the compile's too."""
    import copy
    from dit_compile.flops import flop_counter
    model = tiny_models.wan(layers=3)[0]
    probe = copy.deepcopy(model)
    probe.blocks = probe.blocks[:1]     # what a block reuse computes (the span: blocks 1 and 2)
    compiled = torch.compile(model, backend="mixcache", options={
        "regions": "eager", "cache": {"rule": "schedule", "block": [1, 2, 3]}})
    pipe = pipelines.wan_pipeline(compiled)
    pipe.set_progress_bar_config(disable=True)
    sizes = [64, 32, 48]
    for size in sizes:
        pipelines.run_wan(pipe, steps=5, size=size)
    stats = dit_compile.stats(compiled)
    done = full = 0.0
    for size in sizes:
        x = dict(hidden_states=torch.randn(1, 4, 2, size // 8, size // 8),
                 timestep=torch.tensor([500.0]), encoder_hidden_states=torch.randn(1, 8, 16))
        costs = []
        for m in (model, probe):
            with torch.no_grad(), flop_counter() as counter:
                m(**x)
            costs.append(counter.get_total_flops())
        records = [r for r in stats["trace"] if r["generation"] == sizes.index(size)]
        actions = [r["action"] for r in records]
        assert actions.count("block") == 6, actions   # steps 1 to 3, both guidance branches
        # The trace's own fraction for each call, at its sizes too.
        assert [r["flops"] for r in records] == pytest.approx(
            [1.0 if a == "compute" else costs[1] / costs[0] for a in actions], rel=1e-6)
        done += costs[0] * actions.count("compute") + costs[1] * actions.count("block")
        full += costs[0] * len(actions)
    assert stats["flops_fraction"] == pytest.approx(done / full, rel=1e-6)


def test_torch_compile_of_a_pipeline_says_its_code_is_no_models():
    """``torch.compile(pipe, backend="mixcache")``: Dynamo traces the transformer's forward in
    frames of its own (cached as usual where caching is on); the pipeline's and scheduler's graphs
    are no model's, said as such, not as six fallbacks of 'the traced function' (graph breaks,
    no block stack)."""
    model = tiny_models.wan(layers=2)[0]
    pipe = pipelines.wan_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    ref = pipelines.run_wan(pipe, steps=2)
    compiled = torch.compile(pipe, backend="mixcache", options={"regions": "eager", "cache": None})

    class Called:               # run_wan calls what it is given as the pipeline
        def __call__(self, **kwargs):
            return compiled(**kwargs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = pipelines.run_wan(Called(), steps=2)
    said = [str(w.message) for w in caught if "mixcache" in str(w.message)]
    assert said and all("was given a diffusers pipeline's code" in m for m in said), said
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_flux2_klein_kv_pipeline_compiles_by_regions_as_plain_inductor():
    """Flux2KleinKVPipeline's first step runs the reference image's tokens with the latent's and
    keeps their keys and values; its later steps, the latent's alone, make Dynamo recompile with
    dynamic sizes. A block's tokens are then ``s28 + 6`` and the size it is handed was made as
    another symbol (``s50``) that the shape environment reduced to ``s28``: Inductor bound the
    one, needed the other, and the compile of the regions failed where plain Inductor's ran.
    (An Inductor cache filled by a compile that worked hides it: checked with an empty
    TORCHINDUCTOR_CACHE_DIR, as CI's clean clone has.)"""
    import numpy as np
    from PIL import Image
    kv = pytest.importorskip("diffusers.pipelines.flux2.pipeline_flux2_klein_kv")
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler
    from tiny_models import seeded
    model = seeded("Flux2Transformer2DModel", patch_size=1, in_channels=16, num_layers=1,
                   num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
                   joint_attention_dim=16, timestep_guidance_channels=16,
                   axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False)
    torch.manual_seed(0)
    vae = AutoencoderKLFlux2(down_block_types=("DownEncoderBlock2D",) * 2,
                             up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8),
                             layers_per_block=1, latent_channels=4, norm_num_groups=4).eval()

    def run(transformer):
        pipe = kv.Flux2KleinKVPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae,
                                       text_encoder=None, tokenizer=None, transformer=transformer)
        pipe.set_progress_bar_config(disable=True)
        g = torch.Generator().manual_seed(0)
        image = Image.fromarray(np.random.RandomState(0).randint(0, 255, (64, 64, 3), dtype=np.uint8))
        return pipe(image=[image], prompt_embeds=torch.randn(1, 6, 16, generator=g), height=32,
                    width=32, num_inference_steps=3, output_type="latent", generator=g).images
    ref = run(model)
    # The blocks are the pieces that failed: they compile through Inductor, the rest runs eager.
    out = run(torch.compile(model, backend="mixcache",
                            options={"cache": None, "regions": "blocks"}))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_mixcache_measures_a_step_against_a_range_that_falls_below_zero():
    """EDM's schedulers hand the model ``ln(sigma) / 4``, which falls below zero mid-run
    (StableAudioPipeline's EDMDPMSolverMultistepScheduler, 6 steps: 1.10, 0.80, 0.44, -0.01,
    -0.62, -1.55). The sampler step after the call at -0.01 spans a quarter of that range; read
    against [0, t_first], with no step below zero, it looked nearly free (0.0008 estimated, 0.014
    for the step before) and ``balanced`` reused it: 0.48 off full compute, where reusing the
    step before costs 0.05. Measured against the run's own range, the estimates grow with the
    steps, and that step is computed."""
    import zoo_image
    pipe = zoo_image.stable_audio_edm()
    model = pipe.transformer
    full = zoo_image.run_stable_audio(pipe)
    pipe.transformer = torch.compile(model, backend="mixcache",
                                     options={"regions": "eager", "cache": "balanced"})
    out = zoo_image.run_stable_audio(pipe)
    trace = dit_compile.stats(pipe.transformer)["trace"]
    assert [round(r["t"], 2) for r in trace] == [1.1, 0.8, 0.44, -0.01, -0.62, -1.55]
    assert trace[3]["action"] == "compute" and trace[3]["signal"] > trace[2]["signal"], trace
    assert (out - full).abs().max() < 0.2
