"""The sketch/render split: calibration of the boundary, diffusers' WanPipeline switching at it, and
the online rule (Settle) switching inside any pipeline."""
import copy
import functools
import os
import sys
import warnings

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import dit_compile
import tiny_models
from dit_compile.runtime.policy import rel_l1
from dit_compile.sketch import _boundary, _distance, costs

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
import pipelines  # noqa: E402

STEPS = 5


def wan_kwargs(seed: int, steps: int = STEPS) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(prompt_embeds=torch.randn(1, 8, 16, generator=g),
                negative_prompt_embeds=torch.randn(1, 8, 16, generator=g), height=64, width=64,
                num_frames=5, num_inference_steps=steps, guidance_scale=5.0, output_type="latent",
                latents=torch.randn(1, 4, 2, 8, 8, generator=g))


def wan_pair():
    """A tiny Wan pair: 3 blocks and 2, each its own random weights, one latent and text space."""
    large = tiny_models.wan(layers=3)[0]
    torch.manual_seed(1)
    small = type(large).from_config({**large.config, "num_layers": 2}).eval()
    pipe = pipelines.wan_pipeline(large)
    pipe.set_progress_bar_config(disable=True)
    return large, small, pipe


@pytest.fixture
def models():
    return wan_pair()


def timesteps_of(model: torch.nn.Module) -> tuple[list[float], torch.utils.hooks.RemovableHandle]:
    seen: list[float] = []
    handle = model.register_forward_hook(
        lambda m, args, kwargs, out: seen.append(float(kwargs["timestep"].max())), with_kwargs=True)
    return seen, handle


def test_the_pipeline_switches_to_the_small_model_below_the_boundary(models):
    large, small, pipe = models
    split = dit_compile.sketch_render(pipe, small, 0.5)
    assert pipe.config.boundary_ratio is None and pipe.transformer_2 is None  # left as it was
    big, h1 = timesteps_of(large)
    little, h2 = timesteps_of(small)
    with torch.no_grad():
        split(**wan_kwargs(0))
    h1.remove()
    h2.remove()
    assert big and little and len(big) + len(little) == 2 * STEPS
    assert min(big) >= 500 > max(little)


def test_tolerance_zero_keeps_the_large_model_and_its_output(models):
    large, small, pipe = models
    with torch.no_grad():
        ref = pipe(**wan_kwargs(0)).frames
    cal = dit_compile.calibrate_split(pipe, small, [wan_kwargs(1), wan_kwargs(2)], 0.0)
    assert cal.boundary == 0.0 and cal.small_steps == 0
    assert len(cal.sigmas) == len(cal.distances) == STEPS and min(cal.distances) > 0
    # Calibration leaves the pipeline as it found it.
    assert pipe.transformer is large and pipe.config.boundary_ratio is None
    little, handle = timesteps_of(small)
    with torch.no_grad():
        out = dit_compile.sketch_render(pipe, small, cal)(**wan_kwargs(0)).frames
    handle.remove()
    assert little == [] and torch.equal(out, ref)


def test_a_small_model_equal_to_the_large_one_takes_every_step(models):
    large, _, pipe = models
    twin = copy.deepcopy(large)
    cal = dit_compile.calibrate_split(pipe, twin, [wan_kwargs(1)], 0.0)
    assert cal.distances == [0.0] * STEPS and cal.small_steps == STEPS
    big, handle = timesteps_of(large)
    with torch.no_grad():
        ref = pipe(**wan_kwargs(0)).frames
        out = dit_compile.sketch_render(pipe, twin, cal)(**wan_kwargs(0)).frames
    handle.remove()
    assert len(big) == 2 * STEPS        # all of them from the reference run
    torch.testing.assert_close(out, ref)


def test_a_prediction_that_is_not_finite_is_never_handed_to_the_small_model(models):
    """A small model whose prediction overflows (NaN) at the last step: that step is infinitely
    far, so the small model takes none of the tail, whatever the tolerance, and the user is told.
    A NaN distance once lost every comparison, read as no distance at all: the twin took every
    step and the video was NaN."""
    large, _, pipe = models
    twin = copy.deepcopy(large)     # distance 0 at every step but the one made NaN
    low = []

    def overflow(module, args, kwargs, out):
        if float(kwargs["timestep"].max()) == min(low):
            return (torch.full_like(out[0], float("nan")),)
    hook = large.register_forward_hook(
        lambda m, args, kwargs, out: low.append(float(kwargs["timestep"].max())), with_kwargs=True)
    with torch.no_grad():
        pipe(**wan_kwargs(1))
    hook.remove()
    twin.register_forward_hook(overflow, with_kwargs=True)
    for tolerance in (0.1, float("inf")):
        with pytest.warns(UserWarning, match="not both finite at noise level"):
            cal = dit_compile.calibrate_split(pipe, twin, [wan_kwargs(1)], tolerance)
        assert cal.distances == [0.0] * (STEPS - 1) + [float("inf")]
        assert cal.boundary == 0.0 and cal.small_steps == 0


@pytest.mark.parametrize("rule", [0.5, dit_compile.Settle(2.5)], ids=["boundary", "online"])
def test_each_split_steps_its_own_scheduler(models, rule):
    """A scheduler holds its run's state (timesteps, step index). Two splits of one pipeline
    running at once (here one inside the other's step callback, as two threads would
    interleave) each give what they give alone, and ``pipe``'s scheduler is left as it was:
    a shared one was reset by the inner run, and the outer one stepped past its end."""
    large, small, pipe = models
    before = pipe.scheduler.timesteps.clone()
    outer, inner = (dit_compile.sketch_render(pipe, small, rule) for _ in range(2))
    with torch.no_grad():
        alone = (outer(**wan_kwargs(0, 6)).frames, inner(**wan_kwargs(1, 4)).frames)
    got = []

    def run_inner(p, i, t, kwargs):
        if i == 2:
            got.append(inner(**wan_kwargs(1, 4)).frames)
        return {}
    with torch.no_grad():
        out = outer(**wan_kwargs(0, 6), callback_on_step_end=run_inner).frames
    assert torch.equal(out, alone[0]) and torch.equal(got[0], alone[1])
    assert torch.equal(pipe.scheduler.timesteps, before)


def test_the_calibrated_tail_is_what_the_tolerance_allows(models):
    _, small, pipe = models
    cal = dit_compile.calibrate_split(pipe, small, [wan_kwargs(1)], 0.0)
    c = costs(cal.sigmas, cal.distances)
    for k in range(1, STEPS):
        tol = sum(c[k:])        # exactly the last STEPS - k steps' costs
        got = dit_compile.calibrate_split(pipe, small, [wan_kwargs(1)], tol * (1 + 1e-6))
        assert got.small_steps == STEPS - k
        assert cal.sigmas[k] < got.boundary < cal.sigmas[k - 1]


def test_each_model_of_the_split_keeps_its_own_cache_state(models):
    large, small, pipe = models
    opts = {"cache": {"rule": "schedule", "step": [1, 2, 3, 4]}, "regions": "eager"}
    pipe.transformer = torch.compile(large, backend="mixcache", options=opts)
    split = dit_compile.sketch_render(
        pipe, torch.compile(small, backend="mixcache", options=opts), 0.5)
    with torch.no_grad():
        split(**wan_kwargs(0))
    big, little = dit_compile.stats(large)["trace"], dit_compile.stats(small)["trace"]
    assert len(big) + len(little) == 2 * STEPS
    assert min(r["t"] for r in big) >= 500 > max(r["t"] for r in little)
    # Each model's first step is its own generation's step 0: computed, never a reuse of the
    # other model's output.
    for trace in (big, little):
        assert [r["action"] for r in trace if r["step"] == 0] == ["compute", "compute"]
        assert {r["generation"] for r in trace} == {0}


def test_costs_weigh_each_distance_by_its_step_length():
    """A step's cost is the models' distance there times the noise level the step covers (to the
    next step's; the last step's to zero)."""
    assert costs([1.0, 0.5, 0.1], [0.2, 0.4, 1.0]) == pytest.approx([0.1, 0.16, 0.1])


def test_distance_is_taken_between_guided_predictions():
    """Two calls at a step are the conditional and unconditional predictions: the models are
    compared on the guided one the sampler steps with, uncond + g (cond - uncond)."""
    cond, uncond = torch.ones(4), torch.zeros(4)
    branches = [(cond, cond), (uncond, uncond + 0.5)]   # (large, small): apart on uncond only
    assert _distance(branches, 5.0) == pytest.approx(abs(3.0 - 5.0) / 5.0)
    assert _distance(branches, 1.0) == 0.0               # guidance 1: the conditional alone
    assert _distance([(cond, 2 * cond)], 5.0) == pytest.approx(1.0)   # one call: already guided


def test_distance_takes_the_worst_of_a_second_order_samplers_calls():
    """A second-order sampler (FlowMatchHeun) calls the model twice at one noise level: the
    corrector of one step and the predictor of the next. Each call (guidance off) or pair of
    calls (on) is a prediction of its own; the step's distance is the worst, not the first's,
    and guidance never mixes the two calls of a one-call-a-step sampler."""
    cond, uncond = torch.ones(4), torch.zeros(4)
    apart = [(cond, cond), (uncond, uncond + 0.5)]          # guided distance 0.4 at g = 5
    alike = [(cond, cond), (uncond, uncond)]
    assert _distance(alike + apart, 5.0) == pytest.approx(0.4)
    assert _distance(apart + alike, 5.0) == pytest.approx(0.4)
    assert _distance([(cond, cond), (cond, 1.5 * cond)], 1.0, per_step=1) == pytest.approx(0.5)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(0.001, 0.2), st.floats(0, 2)), min_size=1, max_size=30),
       st.floats(0, 1), st.floats(0, 1))
def test_boundary_rule(steps, tol_a, tol_b):
    """The small model's tail costs at most the tolerance, one more step would cost more, and a
    larger tolerance never hands fewer steps to the small model."""
    gaps, distances = zip(*steps)
    sigmas = [sum(gaps[i:]) for i in range(len(gaps))]       # descending, the last > 0
    lo, hi = sorted((tol_a, tol_b))
    c = costs(sigmas, list(distances))
    for tol in (lo, hi):
        b = _boundary(sigmas, list(distances), tol)
        tail = [i for i, s in enumerate(sigmas) if s < b]
        assert tail == list(range(len(sigmas) - len(tail), len(sigmas)))
        assert sum(c[i] for i in tail) <= tol
        if len(tail) < len(sigmas):
            assert sum(c[i] for i in tail) + c[len(sigmas) - len(tail) - 1] > tol
    n = lambda tol: sum(s < _boundary(sigmas, list(distances), tol) for s in sigmas)  # noqa: E731
    assert n(lo) <= n(hi)


def test_bad_inputs_are_clear_errors(models):
    large, small, pipe = models
    other = type(large).from_config({**large.config, "in_channels": 8})
    with pytest.raises(ValueError, match="in_channels"):
        dit_compile.sketch_render(pipe, other, 0.5)
    with pytest.raises(ValueError, match="transformer itself"):
        dit_compile.calibrate_split(pipe, large, [wan_kwargs(1)], 0.1)
    with pytest.raises(ValueError, match="tolerance"):
        dit_compile.calibrate_split(pipe, small, [wan_kwargs(1)], -1)
    # Each of these got past the checks: the same model as both (in sketch_render), a switch for
    # a tolerance, one run not in a list (a TypeError quoting the pipeline's repr), and a small
    # model of another dtype (the pipeline's raw dtype error mid-generation).
    with pytest.raises(ValueError, match="transformer itself"):
        dit_compile.sketch_render(pipe, torch.compile(large), 0.5)
    with pytest.raises(ValueError, match="tolerance=True"):
        dit_compile.calibrate_split(pipe, small, [wan_kwargs(1)], True)
    with pytest.raises(ValueError, match="a list of at least one calibration run"):
        dit_compile.calibrate_split(pipe, small, wan_kwargs(1), 0.1)
    with pytest.raises(ValueError, match="dtype: torch.float32 vs torch.bfloat16"):
        dit_compile.sketch_render(pipe, copy.deepcopy(small).to(torch.bfloat16), 0.5)
    with pytest.raises(ValueError, match="same timesteps"):
        dit_compile.calibrate_split(pipe, small, [wan_kwargs(1), wan_kwargs(2, steps=3)], 0.1)
    assert pipe.transformer is large and pipe.config.boundary_ratio is None
    with pytest.raises(ValueError, match="boundary"):
        dit_compile.sketch_render(pipe, small, -0.5)
    # A config read from JSON holds a list where one built in Python holds a tuple: the same.
    listed = type(large).from_config({**large.config, "num_layers": 1,
                                      "patch_size": list(large.config.patch_size)})
    assert dit_compile.sketch_render(pipe, listed, 0.5).transformer_2 is listed
    # Another class with the same channels and text width: the pipeline's error mid-generation.
    from diffusers import WanVACETransformer3DModel
    vace = WanVACETransformer3DModel.from_config({**large.config, "vace_layers": [0]})
    with pytest.raises(TypeError, match="small model is a WanVACETransformer3DModel"):
        dit_compile.sketch_render(pipe, vace, 0.5)
    for g2 in (3.0, 0.0):       # any value given, a falsy one too
        with pytest.raises(ValueError, match="drop guidance_scale_2"):
            dit_compile.calibrate_split(pipe, small, [dict(wan_kwargs(1), guidance_scale_2=g2)],
                                        0.1)
    flux = pipelines.flux_pipeline(tiny_models.flux()[0])
    with pytest.raises(TypeError, match="FluxPipeline has none. The online rule"):
        dit_compile.sketch_render(flux, small, 0.5)


def test_each_steps_distance_is_the_worst_over_the_runs(models):
    """With several calibration runs, a step's distance is the worst of the runs' (not the
    best's, nor the last run's alone)."""
    _, small, pipe = models
    runs = [wan_kwargs(3), wan_kwargs(1)]     # the first the farther, here at every step
    each = [dit_compile.calibrate_split(pipe, small, [r], 0.0).distances for r in runs]
    both = dit_compile.calibrate_split(pipe, small, runs, 0.0).distances
    assert both == [max(a, b) for a, b in zip(*each)] != each[-1]


def test_calibration_leaves_a_compiled_transformer_and_the_pipelines_own_boundary(models):
    """Calibration runs the large model eagerly with the pipeline's boundary off, and puts back
    what it found: the compiled wrapper in the ``transformer`` slot (not the model it looked
    through) and the pipeline's own boundary (a split pipeline's, not None)."""
    large, small, pipe = models
    split = dit_compile.sketch_render(pipe, small, 0.5)
    compiled = torch.compile(large, backend="mixcache")      # never called: nothing compiles
    split.transformer = compiled
    cal = dit_compile.calibrate_split(split, small, [wan_kwargs(1, steps=2)], 0.0)
    assert len(cal.sigmas) == 2
    assert split.transformer is compiled and split.config.boundary_ratio == 0.5


def test_calibration_measures_a_model_compiled_in_place_uncached(models):
    """diffusers' way to compile, ``transformer.compile(...)``, leaves no wrapper to look through:
    calibration measured the large model through its cache (distances 0.03 off where its schedule
    reused a step, the calls counted as a generation of it), and Dynamo traced the recording hook.
    It runs both models as they are."""
    large, small, pipe = models
    runs = [wan_kwargs(1, steps=4)]
    expected = dit_compile.calibrate_split(pipe, small, runs, 0.1)
    for m in (large, small):
        m.compile(backend="mixcache", options={"regions": "eager",
                                               "cache": {"rule": "schedule", "step": [1, 2, 3]}})
    with warnings.catch_warnings():
        warnings.simplefilter("error")      # no graph-break or fallback warning: nothing traced
        cal = dit_compile.calibrate_split(pipe, small, runs, 0.1)
    assert cal.distances == expected.distances and cal.boundary == expected.boundary
    for m in (large, small):
        assert m._compiled_call_impl is not None
        with pytest.raises(ValueError, match="no mixcache state"):
            dit_compile.stats(m)                    # neither ran compiled
    with torch.no_grad():
        pipe(**runs[0])
    assert dit_compile.stats(large)["reused"] == {"step": 6}   # compiled again after


def test_a_split_of_a_pipeline_with_its_own_low_noise_expert_is_told(models):
    """Wan 2.2's pipelines hold a second expert in ``transformer_2``: a split at a noise level
    replaced it, and calibration measured the first expert at every step, without a word (Settle
    refuses such a pipeline). A split of a split pipeline, at another boundary, is not told."""
    large, small, pipe = models
    expert = copy.deepcopy(large)
    two = pipelines.wan_pipeline(large)
    two.register_modules(transformer_2=expert)
    two.register_to_config(boundary_ratio=0.875)
    with pytest.warns(UserWarning, match="already switches to its own transformer_2"):
        dit_compile.calibrate_split(two, small, [wan_kwargs(1, steps=2)], 0.0)
    with pytest.warns(UserWarning, match="transformer_2 .*small. in its place"):
        split = dit_compile.sketch_render(two, small, 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dit_compile.sketch_render(split, small, 0.3).transformer_2 is small


def test_a_step_at_the_boundary_is_the_large_models():
    """diffusers' switch runs ``transformer`` where the timestep is >= the boundary's: a
    calibrated step exactly at the boundary is not one of the small model's."""
    cal = dit_compile.Calibration(0.5, 0.1, sigmas=[1.0, 0.75, 0.5, 0.25], distances=[0.0] * 4)
    assert cal.small_steps == 1
    assert dit_compile.Calibration(0.0, 0.0, sigmas=[1.0, 0.5]).small_steps == 0


def test_calibration_places_a_per_token_timestep_at_its_step():
    """Wan 2.2's image-to-video (``expand_timesteps``) passes a timestep per token, zero for the
    image's: a call is at the step's noise level (its largest), so the steps calibrated are the
    scheduler's, not one step at level zero."""
    large, small, _ = wan_pair()
    pipe = pipelines.wan_ti2v_pipeline(large)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    run = dict(image=torch.rand(1, 3, 32, 32, generator=g),
               prompt_embeds=torch.randn(1, 6, 16, generator=g),
               negative_prompt_embeds=torch.randn(1, 6, 16, generator=g), height=32, width=32,
               num_frames=5, num_inference_steps=3, guidance_scale=5.0, output_type="latent",
               generator=g)
    cal = dit_compile.calibrate_split(pipe, small, [run], 0.0)
    pipe.scheduler.set_timesteps(3)
    assert cal.sigmas == pytest.approx([float(t) / 1000 for t in pipe.scheduler.timesteps])
    assert len(cal.distances) == 3 and min(cal.distances) > 0


def test_the_split_pipeline_keeps_the_progress_bar_setting(models):
    _, small, pipe = models
    with pytest.raises(ValueError, match="boundary=True must be a noise level"):
        dit_compile.sketch_render(pipe, small, True)     # a switch, not a noise level
    for rule in (0.5, dit_compile.Settle(1.0)):
        assert dit_compile.sketch_render(pipe, small, rule)._progress_bar_config == {"disable": True}


def test_calibration_without_guidance_takes_the_worst_of_a_second_order_samplers_calls(models):
    """Guidance 1 (Wan's pipeline then calls the model once an evaluation) with Heun's sampler,
    which evaluates twice at each noise level but the first: each call is a prediction of its
    own, and the level's distance is the worse of its two calls' (guidance never mixes them)."""
    from diffusers import FlowMatchHeunDiscreteScheduler
    large, small, pipe = models
    pipe.scheduler = FlowMatchHeunDiscreteScheduler(shift=3.0)
    seen = {m: [] for m in (large, small)}
    hooks = [m.register_forward_hook(
        lambda m, args, kwargs, out: seen[m].append((float(kwargs["timestep"].max()), out[0])),
        with_kwargs=True) for m in (large, small)]
    cal = dit_compile.calibrate_split(pipe, small, [dict(wan_kwargs(1, 3), guidance_scale=1.0)],
                                      0.0)
    for h in hooks:
        h.remove()
    levels = {}
    for (t, big), (_, little) in zip(seen[large], seen[small]):
        levels.setdefault(t, []).append(float((little - big).norm() / big.norm()))
    assert [len(d) for d in levels.values()] == [1, 2, 2]
    assert any(d[1] > d[0] for d in levels.values() if len(d) == 2), "the test's premise"
    assert cal.distances == pytest.approx([max(d) for d in levels.values()], rel=1e-5)


def test_a_small_model_on_another_device_or_a_pipeline_without_its_large_one_is_refused(models):
    large, small, pipe = models
    elsewhere = copy.deepcopy(small).to("meta")
    for rule in (0.5, dit_compile.Settle(1.0)):
        with pytest.raises(ValueError, match="device: cpu vs meta"):
            dit_compile.sketch_render(pipe, elsewhere, rule)
    with pytest.raises(ValueError, match="`transformer` \\(the large model\\) is missing"):
        dit_compile.sketch_render(pipelines.wan_pipeline(None), small, 0.5)


# -- the online rule (Settle) ----------------------------------------------------------------

def outputs_of(model: torch.nn.Module) -> tuple[list, torch.utils.hooks.RemovableHandle]:
    seen: list[tuple[float, torch.Tensor]] = []
    handle = model.register_forward_hook(
        lambda m, args, kwargs, out: seen.append((float(kwargs["timestep"].max()), out[0].clone())),
        with_kwargs=True)
    return seen, handle


def first_settled_step(calls: list[tuple[float, torch.Tensor]], rule: dit_compile.Settle) -> int:
    """The rule by hand, from a large-only run's calls (two a step, conditional first): the first
    step k >= 2 below the warm-up where both branches' change from step k - 2 to k - 1, relative
    L1 per unit of the noise range, is under the rate; len(steps) where there is none."""
    steps = [calls[i:i + 2] for i in range(0, len(calls), 2)]
    first = steps[0][0][0]
    for k in range(2, len(steps)):
        a, b = steps[k - 2], steps[k - 1]
        rates = [float((y[1] - x[1]).abs().mean() / x[1].abs().mean()) / ((x[0] - y[0]) / first)
                 for x, y in zip(a, b)]
        if steps[k][0][0] <= (1 - rule.warmup) * first and max(rates) < rule.rate:
            return k
    return len(steps)


@functools.cache
def large_only_run(steps: int = 8) -> tuple[tuple, list[tuple[float, torch.Tensor]]]:
    """A tiny Wan pair, and its large model's calls in 8 steps of WanPipeline alone (made once:
    the models are never changed, and every example of the test below reads the same run)."""
    large, small, pipe = pair = wan_pair()
    calls, handle = outputs_of(large)
    with torch.no_grad():
        pipe(**wan_kwargs(0, steps))
    handle.remove()
    return pair, calls


@settings(max_examples=4, deadline=None)
@given(st.floats(0.0, 4.0), st.sampled_from([0.0, 0.1, 0.5]))
@example(2.0, 0.0)      # on these models: the rate decides (step 5)
@example(3.0, 0.5)      # the warm-up decides (step 6)
@example(1.0, 0.1)      # never settles: the large model takes every step
@example(2.35, 0.0)     # between the branches' rates at step 4: the worst branch decides
def test_online_split_switches_where_the_rule_first_holds_as_a_boundary_there_would(rate, warmup):
    """Settle hands the generation to the small model at the first step where the large model's
    output has settled (checked against the rule worked out by hand on a large-only run), and
    the video is the one diffusers' own switch gives with its boundary at that step."""
    (large, small, pipe), calls = large_only_run()
    steps = len(calls) // 2
    rule = dit_compile.Settle(rate, warmup)
    k = first_settled_step(calls, rule)
    split = dit_compile.sketch_render(pipe, small, rule)
    little, handle = timesteps_of(small)
    with torch.no_grad():
        out = split(**wan_kwargs(0, steps)).frames
    handle.remove()
    assert len(little) == 2 * (steps - k)
    levels = [t for t, _ in calls[::2]]
    assert split.transformer.switches == [None if k == steps else (k, levels[k])]
    boundary = 0.0 if k == steps else (levels[k] + levels[k - 1]) / 2000
    with torch.no_grad():
        ref = dit_compile.sketch_render(pipe, small, boundary)(**wan_kwargs(0, steps)).frames
    assert torch.equal(out, ref)


def test_online_split_starts_each_generation_on_the_large_model(models):
    large, small, pipe = models
    split = dit_compile.sketch_render(pipe, small, dit_compile.Settle(float("inf"), 0.3))
    assert pipe.transformer is large                    # left as it was
    assert split.transformer.config is large.config and split.transformer.dtype == large.dtype
    big, h1 = timesteps_of(large)
    with torch.no_grad():
        first = split(**wan_kwargs(0, 8)).frames
        second = split(**wan_kwargs(0, 8)).frames      # a new generation: the large model again
        split(**wan_kwargs(1, 2))                       # no change measured before its end
    h1.remove()
    assert torch.equal(first, second)
    (k, level), again, never = split.transformer.switches
    assert again == (k, level) and never is None and level <= 700 < big[2 * k - 1]
    assert len(big) == 2 * k + 2 * k + 2 * 2
    # Nothing of its own to explain (it reported 'no graph', warning of a compile never asked).
    with pytest.raises(TypeError, match="explain split.large and split.small"):
        dit_compile.explain(split.transformer, hidden_states=torch.zeros(1))


def test_reports_of_an_online_split_are_of_both_models_or_refused(models, tmp_path):
    """The split read ``_orig_mod`` through to the large model, so it passed for torch.compile's
    wrapper of it: ``stats`` told the large model's calls alone (10 of 16), ``reset`` left the small
    one's cache, ``explain`` explained the large model and ``export`` saved it alone. The reports
    are refused, naming the two models; ``reset`` and ``wait_for_compiles`` take both."""
    large, small, pipe = models
    opts = {"regions": "eager", "cache": {"rule": "schedule", "step": [2]}}
    pipe.transformer = torch.compile(large, backend="mixcache", options=opts)
    split = dit_compile.sketch_render(pipe, torch.compile(small, backend="mixcache", options=opts),
                                      dit_compile.Settle(float("inf"), 0.3))
    with torch.no_grad():
        split(**wan_kwargs(0, 8))
    online = split.transformer
    (k, _), = online.switches
    assert 0 < k < 8
    for report in (dit_compile.stats, lambda m: dit_compile.explain(m, **wan_kwargs(0)),
                   lambda m: dit_compile.export(m, str(tmp_path / "x"), {}),
                   lambda m: dit_compile.fit_teacache(m, lambda: None)):
        with pytest.raises(TypeError, match=r"OnlineSplit .* split.large and split.small"):
            report(online)
    assert dit_compile.stats(large)["calls"] == 2 * k
    assert dit_compile.stats(small)["calls"] == 2 * (8 - k)
    assert dit_compile.wait_for_compiles(online) == 0
    dit_compile.reset(online)
    for m in (large, small):
        assert dit_compile.stats(m)["calls"] == 0 and dit_compile.stats(m)["cached_bytes"] == 0


def test_online_split_through_mixcache_matches_eager(models):
    """Both models compiled, caching off: the online rule's split, and a fixed one (0.5), give
    what they give eagerly."""
    large, small, pipe = models
    rule = dit_compile.Settle(float("inf"), 0.3)
    with torch.no_grad():
        ref = dit_compile.sketch_render(pipe, small, rule)(**wan_kwargs(0, 8)).frames
        fixed = dit_compile.sketch_render(pipe, small, 0.5)(**wan_kwargs(0)).frames
    opts = {"cache": None, "regions": "eager"}
    pipe.transformer = torch.compile(large, backend="mixcache", options=opts)
    compiled_small = torch.compile(small, backend="mixcache", options=opts)
    with torch.no_grad():
        out = dit_compile.sketch_render(pipe, compiled_small, rule)(**wan_kwargs(0, 8)).frames
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        out = dit_compile.sketch_render(pipe, compiled_small, 0.5)(**wan_kwargs(0)).frames
        torch.testing.assert_close(out, fixed, rtol=1e-5, atol=1e-5)
    # Cached: each model keeps its own state, and the small model's first call is its own
    # generation's step 0, computed, never a reuse of the large model's output. (The large
    # model reuses only past the switch, never reached: the rule reads no change across a
    # reused step.)
    torch._dynamo.reset()
    opts = {"cache": {"rule": "schedule", "step": list(range(1, 8))}, "regions": "eager"}
    late = {"cache": {"rule": "schedule", "step": [6, 7]}, "regions": "eager"}
    pipe.transformer = torch.compile(large, backend="mixcache", options=late)
    split = dit_compile.sketch_render(
        pipe, torch.compile(small, backend="mixcache", options=opts), rule)
    with torch.no_grad():
        split(**wan_kwargs(0, 8))
    k = split.transformer.switches[0][0]
    little = dit_compile.stats(small)["trace"]
    assert len(dit_compile.stats(large)["trace"]) == 2 * k and len(little) == 2 * (8 - k)
    assert [r["action"] for r in little if r["step"] == 0] == ["compute", "compute"]
    assert {r["generation"] for r in little} == {0}


def test_online_rule_reads_no_change_across_a_step_the_large_models_cache_reused(models):
    """The large model compiled with a cache that reuses its step 3: that output is step 2's, so
    its change reads zero. The rule reads the model's own change from one step to the next, so
    it never takes one across a reused call, and it decides as uncached: on these models at rate
    1 it never settles. It once read the reuse as settled and switched at step 4."""
    large, small, pipe = models
    rule = dit_compile.Settle(1.0, 0.1)
    split = dit_compile.sketch_render(pipe, small, rule)
    with torch.no_grad():
        split(**wan_kwargs(0, 8))
    assert split.transformer.switches == [None]
    opts = {"cache": {"rule": "schedule", "step": [3]}, "regions": "eager"}
    pipe.transformer = torch.compile(large, backend="mixcache", options=opts)
    split = dit_compile.sketch_render(pipe, small, rule)
    with torch.no_grad():
        split(**wan_kwargs(0, 8))
    reused = {r["step"] for r in dit_compile.stats(large)["trace"] if r["action"] != "compute"}
    assert reused == {3} and split.transformer.switches == [None]

class _FirstK(torch.nn.Module):
    """The large model for the first ``k`` calls, the small one after: an online split's output
    written out by hand, once its switch is known. Other attributes are the large model's."""

    def __init__(self, large, small, k):
        super().__init__()
        self.models, self.k, self.calls = (large, small), k, 0     # a tuple: not submodules

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self.models[self.calls > self.k](*args, **kwargs)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.models[0], name)



def test_online_split_reads_the_latent_and_timestep_under_the_forwards_own_names():
    """HiDreamImagePipeline passes its timestep as ``timesteps``: every call of the split was
    refused (a TypeError asking for ``timestep``), though Settle is for any pipeline. The image
    is the one a model that runs large for the first k calls and small after gives."""
    large = tiny_models.hidream()[0]
    torch.manual_seed(1)
    # One llama layer per block, as HiDream reads them.
    small = type(large).from_config({**large.config, "num_layers": 1, "num_single_layers": 1,
                                     "llama_layers": (1, 3)}).eval()
    pipe = pipelines.hidream_pipeline(large)
    pipe.set_progress_bar_config(disable=True)
    split = dit_compile.sketch_render(pipe, small, dit_compile.Settle(float("inf"), 0.4))
    with torch.no_grad():
        out = pipelines.run_hidream(split, steps=4, size=64)
    k = split.transformer.switches[0][0]
    assert 2 <= k < 4
    pipe.transformer = _FirstK(large, small, k)
    with torch.no_grad():
        assert torch.equal(out, pipelines.run_hidream(pipe, steps=4, size=64))


def test_a_small_model_of_another_condition_width_is_refused_naming_it(monkeypatch):
    """Flux's text and pooled widths were not compared (only Wan's names were): the split ran
    the large model's steps and failed at the switch on a matrix product. Refused up front now;
    a family whose name for a width is not known fails at its first small call with an error
    naming the configs' differences, the width among them."""
    large = tiny_models.flux()[0]
    pipe = pipelines.flux_pipeline(large)
    pipe.set_progress_bar_config(disable=True)
    for key in ("joint_attention_dim", "pooled_projection_dim"):
        small = type(large).from_config({**large.config, "num_layers": 1, key: 16}).eval()
        with pytest.raises(ValueError, match=f"{key}: 32 vs 16"):
            dit_compile.sketch_render(pipe, small, dit_compile.Settle(float("inf"), 0.4))
    monkeypatch.setattr(dit_compile.sketch, "_SHARED", ("in_channels", "out_channels"))
    split = dit_compile.sketch_render(pipe, small, dit_compile.Settle(float("inf"), 0.4))
    with torch.no_grad(), pytest.raises(ValueError, match="first call.*pooled_projection_dim: "
                                                          "32 vs 16") as told:
        pipelines.run_flux(split, steps=6)
    assert isinstance(told.value.__cause__, RuntimeError)


def test_compiling_the_online_split_itself_is_told_and_runs_the_models_as_they_are(models):
    """torch.compile on the OnlineSplit (the pipeline's transformer) would trace its Python clock
    and fail deep inside it: it is never traced, the user is told once to compile the two
    models, and the split gives what it gives uncompiled."""
    import warnings
    large, small, pipe = models
    rule = dit_compile.Settle(float("inf"), 0.3)
    with torch.no_grad():
        ref = dit_compile.sketch_render(pipe, small, rule)(**wan_kwargs(0, 8)).frames
    split = dit_compile.sketch_render(pipe, small, rule)
    split.transformer = torch.compile(split.transformer, backend="mixcache")
    with warnings.catch_warnings(record=True) as told, torch.no_grad():
        warnings.simplefilter("always")
        outs = [split(**wan_kwargs(0, 8)).frames for _ in range(2)]
    assert all(torch.equal(out, ref) for out in outs)
    assert len([w for w in told if "compile the two models" in str(w.message)]) == 1


def test_online_split_in_a_pipeline_without_a_boundary():
    """Settle needs no switch of the pipeline's own: Flux (one call a step) takes it, and gives
    what a model that runs large for the first k calls and small after gives."""
    large = tiny_models.flux()[0]
    torch.manual_seed(1)
    small = type(large).from_config({**large.config, "num_layers": 1}).eval()
    pipe = pipelines.flux_pipeline(large)
    pipe.set_progress_bar_config(disable=True)
    split = dit_compile.sketch_render(pipe, small, dit_compile.Settle(float("inf"), 0.4))
    out = pipelines.run_flux(split, steps=6)
    k = split.transformer.switches[0][0]
    assert 2 <= k < 6

    pipe.transformer = _FirstK(large, small, k)
    assert torch.equal(out, pipelines.run_flux(pipe, steps=6))


def test_online_rule_on_a_rising_timestep_decides_from_the_first_generation_on():
    """Lumina-Next passes 1 - sigma, which rises: the split's clock learns that at a run's
    second step and reads the first step's level again. The split kept that level as first
    read (0 where it is 1), so the first change's step length was 0.86 for 0.14 and the first
    generation switched at step 2 whatever the rate (0.5 included, which never holds here);
    the second, its direction known, decided right. Both now switch where the rule, worked out
    by hand on a large-only run at noise level 1 - timestep, first holds."""
    import zoo_image
    large, _ = zoo_image.lumina_next()
    torch.manual_seed(1)
    small = type(large).from_config({**large.config, "num_layers": 2}).eval()
    pipe = pipelines.lumina_next_pipeline(large)
    pipe.set_progress_bar_config(disable=True)
    calls = []     # (noise level, output): one call a step (guidance batched)
    hook = large.register_forward_hook(
        lambda m, args, kwargs, out: calls.append((1 - float(kwargs["timestep"].min()),
                                                   out[0].clone())), with_kwargs=True)
    with torch.no_grad():
        pipelines.run_lumina_next(pipe, steps=8)
    hook.remove()
    first = calls[0][0]
    for rate in (0.5, 2.0):
        rule = dit_compile.Settle(rate, 0.1)
        k = next((k for k in range(2, 8) if calls[k][0] <= 0.9 * first and float(
            (rel_l1(calls[k - 1][1], calls[k - 2][1]) * first
             / (calls[k - 2][0] - calls[k - 1][0])).max()) < rate), None)
        split = dit_compile.sketch_render(pipe, small, rule)
        with torch.no_grad():
            for _ in range(2):
                pipelines.run_lumina_next(split, steps=8)
        assert [s and s[0] for s in split.transformer.switches] == [k, k]
    assert k is not None      # one rate of the two switches, the other never


def _zimage_pair_and_large_run(steps: int, **kwargs):
    """A tiny Z-Image and a 2-layer small one of its family, ZImagePipeline on the large one, and
    its calls over a large-only run of ``steps``: (noise level, outputs) each (the timestep
    passed is 1 - sigma; the outputs a list, one tensor per sample)."""
    large = tiny_models.zimage()[0]
    torch.manual_seed(1)
    small = type(large).from_config({**large.config, "n_layers": 2}).eval()
    pipe = pipelines.zimage_pipeline(large)
    pipe.set_progress_bar_config(disable=True)
    calls = []
    hook = large.register_forward_hook(
        lambda m, args, kwargs, out: calls.append((1 - float(args[1].min()),
                                                   [x.clone() for x in out[0]])), with_kwargs=True)
    with torch.no_grad():
        pipelines.run_zimage(pipe, steps, **kwargs)
    hook.remove()
    return large, small, pipe, calls


def test_online_split_in_a_pipeline_that_passes_lists_of_latents():
    """ZImagePipeline passes its latents as a list, one tensor per sample (guidance batched: the
    conditional and unconditional ones), and the model answers with a list: the rule reads each
    sample's change (the worst decides), as worked out by hand on a large-only run, and the
    image is the one a model that runs large for the first k calls and small after gives. It
    was refused (a TypeError asking for tensors), though Settle is for any pipeline."""
    large, small, pipe, calls = _zimage_pair_and_large_run(6)
    first, rule = calls[0][0], dit_compile.Settle(2.7, 0.1)
    k = next(k for k in range(2, 6) if calls[k][0] <= 0.9 * first and max(
        float(rel_l1(x[None], y[None]).max()) for x, y in zip(calls[k - 1][1], calls[k - 2][1])
    ) * first / (calls[k - 2][0] - calls[k - 1][0]) < rule.rate)
    split = dit_compile.sketch_render(pipe, small, rule)
    with torch.no_grad():
        out = pipelines.run_zimage(split, 6)
    assert split.transformer.switches == [(k, calls[k][0])] and 2 <= k < 6

    pipe.transformer = _FirstK(large, small, k)
    with torch.no_grad():
        assert torch.equal(out, pipelines.run_zimage(pipe, 6))
    # Guidance turned off from step 3 on (cfg_truncation): half the samples, the same
    # generation, on the small model to its end (as one batch, not a new generation that went
    # back to the large model).
    with torch.no_grad():
        out = pipelines.run_zimage(split, 6, cfg_truncation=0.5)
        pipe.transformer.calls = 0
        ref = pipelines.run_zimage(pipe, 6, cfg_truncation=0.5)
    assert split.transformer.switches[1:] == [(k, calls[k][0])] and torch.equal(out, ref)


def test_online_split_bad_inputs_are_clear_errors(models):
    large, small, pipe = models
    for bad in (dict(rate=-1.0), dict(rate=1.0, warmup=1.0), dict(rate=True)):
        with pytest.raises(ValueError, match="Settle: (rate|warmup)="):
            dit_compile.Settle(**bad)
    split = dit_compile.sketch_render(pipe, small, 0.5)
    with pytest.raises(ValueError, match="transformer_2"):
        dit_compile.sketch_render(split, small, dit_compile.Settle(1.0))
    online = dit_compile.sketch_render(pipe, small, dit_compile.Settle(1.0))
    with pytest.raises(TypeError, match="OnlineSplit: the pipeline called the transformer without "
                                        "tensors"):
        online.transformer(hidden_states=[], timestep=torch.tensor([999.0]))   # an empty list
    with pytest.raises(ValueError, match="in_channels"):
        dit_compile.sketch_render(pipe, type(large).from_config({**large.config, "in_channels": 8}),
                                  dit_compile.Settle(1.0))


def test_online_split_keeps_the_switches_of_its_last_generations(models):
    """``switches`` holds the last ``KEEP`` generations' (a long-running server makes many)."""
    _, small, pipe = models
    split = dit_compile.sketch_render(pipe, small, dit_compile.Settle(float("inf")))
    split.transformer.KEEP = 2
    with warnings.catch_warnings(record=True) as told, torch.no_grad():
        warnings.simplefilter("always")
        for _ in range(3):
            split(**wan_kwargs(0, 2))
    assert split.transformer.switches == [None, None]
    # Not compiled itself: nothing to tell (the warning is for torch.compile on the split).
    assert not [w for w in told if "compile the two models" in str(w.message)]


def test_online_rule_under_a_second_order_sampler_reads_changes_between_levels(models):
    """Heun's sampler evaluates twice at a noise level: no change is read between two calls at
    one level (no step length to weigh it by: it would read as infinitely fast and hold the
    switch back a step), so at rate inf the split hands over at the first step past the
    warm-up, as under Euler."""
    from diffusers import FlowMatchHeunDiscreteScheduler
    large, small, pipe = models
    pipe.scheduler = FlowMatchHeunDiscreteScheduler(shift=3.0)
    split = dit_compile.sketch_render(pipe, small, dit_compile.Settle(float("inf"), 0.3))
    (big, h1), (little, h2) = timesteps_of(large), timesteps_of(small)
    with torch.no_grad():
        split(**wan_kwargs(0, 4))
    h1.remove()
    h2.remove()
    levels = (big + little)[::2]    # per step (two calls a step): Heun's, all but the first twice
    k = next(i for i, t in enumerate(levels) if t <= 0.7 * levels[0])
    assert levels[k - 1] == levels[k - 2], "the test's premise: a second evaluation before it"
    assert split.transformer.switches == [(k, levels[k])]


def test_online_warm_up_ends_at_the_first_level_fallen_by_exactly_the_warm_up(models):
    """The warm-up lasts until the noise level has fallen by ``warmup`` of the first level: a
    step landing on that bound (500 of 1000 at warm-up 0.5) is past it, so at rate inf the small
    model takes over there, not a step later."""
    from dit_compile.sketch import OnlineSplit
    large, small, _ = models
    _, kw = tiny_models.wan(layers=3)
    split = OnlineSplit(large, small, dit_compile.Settle(float("inf"), 0.5))
    negative = torch.randn_like(kw["encoder_hidden_states"])
    x = kw["hidden_states"]
    with torch.no_grad():
        for t in (1000.0, 750.0, 500.0, 250.0):
            for text in (kw["encoder_hidden_states"], negative):
                split(hidden_states=x, timestep=torch.tensor([t]), encoder_hidden_states=text,
                      return_dict=False)
            x = 0.9 * x
    assert split.switches == [(2, 500.0)]


def test_online_rate_zero_never_hands_over(models):
    """The change must be below the rate: at rate 0 the large model takes every step, even one
    whose output does not change at all (its output projection zeroed but its bias)."""
    large, small, pipe = models
    with torch.no_grad():
        large.proj_out.weight.zero_()
        large.proj_out.bias.fill_(0.5)
    split = dit_compile.sketch_render(pipe, small, dit_compile.Settle(0.0, 0.0))
    little, handle = timesteps_of(small)
    with torch.no_grad():
        split(**wan_kwargs(0, 4))
    handle.remove()
    assert split.transformer.switches == [None] and little == []


def test_online_rule_reads_an_eager_large_model_past_its_cache_state_of_an_earlier_run(models):
    """A large model that once ran compiled with a cache keeps that state (hung on its
    parameters), its last record a reuse. Run eagerly in a split after, none of its calls is
    served from that cache: the rule reads its changes, and decides as on a model that never
    ran compiled."""
    large, small, pipe = models
    rule = dit_compile.Settle(float("inf"), 0.3)
    fresh = dit_compile.sketch_render(pipe, small, rule)
    with torch.no_grad():
        fresh(**wan_kwargs(0, 4))
    opts = {"cache": {"rule": "schedule", "step": [3]}, "regions": "eager"}
    pipe.transformer = torch.compile(large, backend="mixcache", options=opts)
    with torch.no_grad():
        pipe(**wan_kwargs(0, 4))
    assert dit_compile.stats(large)["trace"][-1]["action"] != "compute", "the test's premise"
    pipe.transformer = large
    split = dit_compile.sketch_render(pipe, small, rule)
    with torch.no_grad():
        split(**wan_kwargs(0, 4))
    assert split.transformer.switches == fresh.transformer.switches != [None]


def test_online_split_names_each_branch_to_both_models(models):
    """Wan's pipeline names each call's guidance branch for diffusers' cache hooks
    (``cache_context``): the split passes it on to the small model as to the large one."""
    import contextlib
    large, small, pipe = models
    heard = {large: [], small: []}
    for m in (large, small):
        @contextlib.contextmanager
        def cache_context(name, _m=m, **kwargs):
            heard[_m].append(name)
            yield
        m.cache_context = cache_context
    split = dit_compile.sketch_render(pipe, small, dit_compile.Settle(float("inf"), 0.3))
    with torch.no_grad():
        split(**wan_kwargs(0, 4))
    assert split.transformer.switches != [None]
    assert heard[large] == heard[small] == ["cond", "uncond"] * 4


def test_online_rule_reads_no_change_across_guidance_turned_off():
    """Z-Image with guidance turned off from step 5 of 8 (cfg_truncation): its list of samples
    halves there, and no sample of the one is known to be which of the other, so no change is
    read across it: the rule decides on the last change read before it, as worked out by hand
    on a large-only run. Read across it (the one sample left against the first of the two), the
    change falls below the rate and the split switched at step 6."""
    large, small, pipe, calls = _zimage_pair_and_large_run(8, cfg_truncation=0.5)
    first, rule = calls[0][0], dit_compile.Settle(2.0, 0.1)

    def rate(j):    # the change from call j - 1 to call j, per unit of the noise range
        (s, xs), (t, ys) = calls[j - 1], calls[j]
        return max(float(rel_l1(y[None], x[None]).max()) for x, y in zip(xs, ys)) * first / (s - t)
    same = [j for j in range(1, 8) if len(calls[j][1]) == len(calls[j - 1][1])]
    assert [len(c[1]) for c in calls] == [2] * 5 + [1] * 3, "the test's premise"
    assert rate(5) < rule.rate, "the test's premise: read across, the change would switch"
    k = next((k for k in range(2, 8) if calls[k][0] <= 0.9 * first
              and rate(max(j for j in same if j < k)) < rule.rate), None)
    split = dit_compile.sketch_render(pipe, small, rule)
    with torch.no_grad():
        pipelines.run_zimage(split, 8, cfg_truncation=0.5)
    assert split.transformer.switches == [None if k is None else (k, calls[k][0])]


def test_online_rule_never_decides_on_a_change_read_before_a_reuse(models):
    """The large model's cache reuses step 4, which the warm-up keeps from switching. At step 5
    the change a computed step 4 would give is unknown, and the rule once read the one before
    the reuse (steps 2 to 3: below the rate, where steps 3 to 4 read uncached are above it) and
    switched there. A reuse leaves its branch's change unknown until two computed steps in a
    row read it again: the switch is where the split's own large calls put it by hand."""
    large, small, pipe = models
    warmup, reused = 0.4, 4

    def record(calls):
        return lambda m, args, kwargs, out: calls.append(
            (float(kwargs["timestep"].max()), out[0].clone()))

    def rate(calls, step):      # the change from step - 1 to step, the worse branch's
        first = calls[0][0]
        return max(float(rel_l1(calls[2 * step + b][1], calls[2 * step - 2 + b][1]).amax())
                   * first / (calls[2 * step - 2][0] - calls[2 * step][0]) for b in (0, 1))
    uncached = []
    hook = large.register_forward_hook(record(uncached), with_kwargs=True)
    with torch.no_grad():
        pipe(**wan_kwargs(2, 8))
    hook.remove()
    rule = dit_compile.Settle((rate(uncached, 3) + rate(uncached, 4)) / 2, warmup)
    assert rate(uncached, 3) < rule.rate < rate(uncached, 4), "the test's premise"
    assert uncached[2 * reused][0] > (1 - warmup) * 1000 >= uncached[2 * reused + 2][0], (
        "the test's premise: the warm-up ends after the reused step")
    compiled = torch.compile(large, backend="mixcache", options={
        "cache": {"rule": "schedule", "step": [reused]}, "regions": "eager"})
    calls = []
    compiled.register_forward_hook(record(calls), with_kwargs=True)
    pipe.transformer = compiled
    split = dit_compile.sketch_render(pipe, small, rule)
    with torch.no_grad():
        split(**wan_kwargs(2, 8))
    assert {r["step"] for r in dit_compile.stats(large)["trace"] if r["action"] != "compute"} == {
        reused}
    switch = split.transformer.switches[0]
    assert switch is None or switch[0] >= reused + 3, (
        f"switched at {switch}: on a change read before the reuse")
    # Two computed steps in a row before k, both after the reuse; the levels of every step.
    levels = [t for t, _ in uncached[::2]]
    k = next((k for k in range(reused + 3, 8) if levels[k] <= (1 - warmup) * levels[0]
              and rate(calls, k - 1) < rule.rate), None)
    assert split.transformer.switches == [None if k is None else (k, levels[k])]


def test_online_split_warms_up_over_a_range_that_falls_below_zero():
    """Settle's warm-up is a share of the noise range, as mixcache's: where the sampler run's
    timesteps fall below zero (StableAudioPipeline's EDM scheduler, ``ln(sigma) / 4``: 1.10, 0.80,
    0.44, -0.01, -0.62, -1.55), the range reaches the run's lowest. Half of it has fallen at
    -0.62 (step 4); read against [0, 1.10] by magnitude, the switch came at 0.44 (step 2), a
    quarter of the way down."""
    import zoo_image
    pipe = zoo_image.stable_audio_edm(layers=3)
    small = zoo_image.stable_audio_edm(layers=2).transformer
    split = dit_compile.sketch_render(pipe, small, dit_compile.Settle(float("inf"), 0.5))
    zoo_image.run_stable_audio(split)
    [(step, level)] = split.transformer.switches
    assert step == 4 and level == pytest.approx(-0.616, abs=1e-3)
