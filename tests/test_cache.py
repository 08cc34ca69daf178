"""Cache guards and runtime state: forced schedules against an eager reference, lifecycle rules,
per-sample decisions, memory bound, bad input."""
import copy
import dataclasses
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dit_compile
import dit_compile.backend as backend
import random_dits
import tiny_models
from dit_compile.runtime.cache import CacheState, Step
from dit_compile.runtime.policy import PolicyError, make_policy
from reference_cache import Reference

STEPS = (900.0, 750.0, 600.0, 450.0, 300.0, 150.0)


def generation(f, kw, steps=STEPS, branches=2, text="encoder_hidden_states", timestep="timestep"):
    """One sampler run: per step, one call per guidance branch (different text, same timestep);
    token ids as text differ by a rotation."""
    outs = []
    with torch.no_grad():
        for t in steps:
            for b in range(branches):
                other = (kw[text] * (1.0 - 2.0 * b) if kw[text].is_floating_point()
                         else kw[text].roll(b, -1))
                call = dict(kw, **{timestep: torch.full_like(kw[timestep], t), text: other})
                y = f(**call)
                outs.append(y[0] if isinstance(y, tuple) else y)
    return outs


def compiled(model, cache, **opts):
    return torch.compile(model, backend="mixcache", fullgraph=True,
                         options={"regions": "eager", "cache": cache, **opts})


def _rd(model):
    return lambda **kw: model(**kw)


schedules = st.fixed_dictionaries({
    "step": st.sets(st.integers(1, len(STEPS) - 1)),
    "cfg": st.sets(st.integers(1, len(STEPS) - 1)),
    "block": st.sets(st.integers(1, len(STEPS) - 1)),
})


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(spec=random_dits.specs().filter(lambda s: len(s.depths) == 1),
       sched=schedules, branches=st.integers(1, 3), order=st.sampled_from([False, True, 2]),
       broken=st.booleans(), data=st.data())
def test_forced_schedules_match_eager_reference(spec, sched, branches, order, broken, data):
    """Up to three guidance branches a step, each rebuilt from its own difference to branch 0;
    dual-stream blocks, whose two streams have one shape where the image has 3 tokens as the text
    does, each rebuilt from its own residual; step reuse extrapolated to each order. ``broken``: a
    graph break before the blocks, the blocks' graph cached by the call's inputs as the first
    graph recorded them (runtime.relay)."""
    torch._dynamo.reset()
    model, kw = random_dits.build(dataclasses.replace(spec, broken=broken))
    n = spec.depths[0]
    a = data.draw(st.integers(1, n - 1))
    b = data.draw(st.integers(a + 1, n))
    cache = {"rule": "schedule", **{k: sorted(v) for k, v in sched.items()}, "span": [a, b],
             "extrapolate": order}
    f = (torch.compile(model, backend="mixcache", options={"regions": "eager", "cache": cache})
         if broken else compiled(model, cache))
    ours = generation(f, kw, branches=branches)
    assert dit_compile.stats(f)["calls"] == len(STEPS) * branches     # each call cached
    ref = Reference(model, step=sched["step"], cfg=sched["cfg"], block=sched["block"],
                    span=(a, b), order=int(order)).start(STEPS[0])
    theirs = generation(ref, kw, branches=branches)
    for i, (x, y) in enumerate(zip(ours, theirs)):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5, msg=f"call {i}")


def test_streams_of_data_dependent_length_pair_by_what_is_known():
    """A stream whose length is known only at run time (HunyuanVideo 1.5 keeps the text tokens its
    masks select) is never compared to a guess: the executor pairs block outputs with inputs by
    shape where the wiring does not say, and ``==`` on such a size makes the compile guard on a
    value it cannot know, which fails it. Unknown counts as different; equal symbols as equal."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    from dit_compile.runtime.executor import _same_shape
    env = ShapeEnv()
    u = env.create_unbacked_symint()
    with FakeTensorMode(shape_env=env):
        text, image = torch.empty(1, u, 8), torch.empty(1, 4, 8)
        assert not _same_shape(text, image) and not _same_shape(image, text)
        assert _same_shape(text, torch.empty(1, u, 8)) and _same_shape(image, torch.empty(1, 4, 8))


@pytest.mark.parametrize("order", [False, 2])
def test_rising_timestep_option(order):
    """A pipeline that passes 1 - sigma (Lumina 2, Z-Image): its timestep rises through a
    generation. With timestep='rising' steps, branches and generations are told apart as for a
    falling one, and a forced schedule (extrapolated in the timestep, to each order) matches the
    eager reference over two generations in a row, the second starting from the cache's scratch."""
    model, kw = tiny_models.wan(layers=3)
    kw["return_dict"] = False
    rising = tuple(1.0 - t / 1000.0 for t in STEPS)
    sched = dict(step=[3, 5], cfg=[2], block=[4])
    f = compiled(model, {"rule": "schedule", **sched, "extrapolate": order}, timestep="rising")
    for _ in range(2):
        ours = generation(f, kw, steps=rising)
        ref = Reference(model, **sched, order=int(order), rising=True).start(rising[0])
        for i, (x, y) in enumerate(zip(ours, generation(ref, kw, steps=rising))):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5, msg=f"call {i}")
    s = dit_compile.stats(f)
    assert s["reused"] == {"step": 8, "cfg": 2, "block": 4}
    assert [r["step"] for r in s["trace"] if r["branch"] == 0] == list(range(len(STEPS))) * 2


def test_rising_timestep_seen_under_the_default_says_so_once():
    """Unasked, a rising timestep makes every call a new generation: nothing is reused (never a
    stale reuse), and the user is told once which option fits. A timestep past [0, 1000] under
    timestep='rising' is an error that says what the option reads; one that falls within [0, 1]
    or [0, 1000], a hint that names timestep='falling'."""
    model, kw = tiny_models.wan(layers=2)
    kw["return_dict"] = False
    rising = tuple(1.0 - t / 1000.0 for t in STEPS)
    f = compiled(model, {"rule": "schedule", "step": [2, 3, 4]})
    with pytest.warns(UserWarning) as rec:
        generation(f, kw, steps=rising)
        generation(f, kw, steps=rising)
    hints = [str(w.message) for w in rec if "timestep" in str(w.message)]
    assert len(hints) == 1 and "options={'timestep': 'rising'}" in hints[0], hints
    assert dit_compile.stats(f)["reused"] == {}
    torch._dynamo.reset()
    f = compiled(model, {"rule": "schedule", "step": [2]}, timestep="rising")
    with pytest.raises(Exception, match=r"1 - sigma, in \[0, 1\] or \[0, 1000\]"):
        generation(f, kw, steps=tuple(2 * t for t in STEPS))
    # Read as rising, a timestep that falls within [0, 1] (Flux's t / 1000), or within [0, 1000]
    # (Wan's): the hint turns round.
    for i, steps in enumerate((tuple(t / 1000.0 for t in STEPS), STEPS)):
        torch._dynamo.reset()     # another schedule: a state of its own, which has not told yet
        f = compiled(model, {"rule": "schedule", "step": [2 + i]}, timestep="rising")
        with pytest.warns(UserWarning, match="options={'timestep': 'falling'}"):
            generation(f, kw, steps=steps)
        assert dit_compile.stats(f)["reused"] == {}


def test_first_block_reuses_at_exactly_its_threshold():
    """The README: the first block's output changed by at most the threshold (relative to the
    last computed) reuses; at exactly it, too."""
    from dit_compile.runtime.cache import BranchCache
    policy = make_policy({"rule": "first_block", "threshold": 0.5}, 4)
    bc = BranchCache()
    bc.span, bc.probe = [torch.zeros(1, 4, 8)], torch.ones(1, 4, 8)
    step = Step(0, 3, 0, 500.0)
    assert policy.block(step, CacheState(), bc, torch.full((1, 4, 8), 1.5)) == (True, 0.5)
    assert not policy.block(step, CacheState(), bc, torch.full((1, 4, 8), 1.51))[0]


def test_executors_past_the_trace_are_counted_and_let_go():
    """A dynamic-shape graph's calls are weighed at their sizes when stats asks, by the executor
    that ran them: each recompile (a torch._dynamo.reset() between requests) left one more
    executor held for that, graphs and compiled pieces, until dit_compile.reset. Those no kept
    record holds are counted as a new one comes, and let go; the fraction is the same."""
    import gc
    import weakref
    from dit_compile.runtime.cache import TRACE_GENERATIONS

    class Executor:         # an executor's part the count reads: 2 of 4 units a call computed
        def flops_at(self, sizes, work, calls):
            return work[0] * 4.0, calls * 4.0
    st, refs = CacheState(), []
    for g in range(TRACE_GENERATIONS + 8):
        ex = Executor()
        refs.append(weakref.ref(ex))
        for step in range(2):
            st.record(Step(g, step, 0, 1.0 - step / 2), "compute", 1.0, sized=(ex, (5,), (0.5, 0.0, 0.0)))
        del ex
    gc.collect()
    assert sum(r() is not None for r in refs) == TRACE_GENERATIONS
    assert st.stats()["flops_fraction"] == pytest.approx(0.5)


def test_a_run_of_rising_calls_is_never_taken_for_steps():
    """Under the default, each call of a rising timestep starts a generation, and so does the next
    generation's first call, lower, however short the generations (three steps: below the hint,
    that call used to be the last one-step generation's step 1, reusing what it cached). Calls
    that rise before a falling pipeline runs (a warm-up over t) leave nothing behind: its steps
    count as a fresh model's (past the hint, every call used to be a generation for good, through
    dit_compile.reset too)."""
    st = CacheState()
    calls = [st.begin(t, "sig", latent=torch.full((1,), t)) for t in (0.1, 0.5, 0.9) * 2]
    assert [(s.generation, s.step) for s in calls] == [(g, 0) for g in range(6)]

    st = CacheState()
    with pytest.warns(UserWarning, match="'timestep': 'rising'"):
        for t in (0.0, 250.0, 500.0, 999.0):
            st.begin(t, "sig", latent=torch.full((1,), t))
    x = [torch.randn(1) for _ in range(3)]
    calls = [st.begin(t, "sig", latent=x[i]) for i, t in enumerate((999.0, 900.0, 800.0))
             for _ in range(2)]          # two guidance branches a step
    assert [(s.generation, s.step, s.branch) for s in calls] == [
        (4, i, b) for i in range(3) for b in range(2)]


def test_guidance_passes_of_another_shape_at_one_timestep_are_branches_of_the_step():
    """LTX2Pipeline's default guidance: at each step a batched-CFG call (batch 2), then
    spatio-temporal and modality-isolation passes of one sample, at the same timestep of the same
    sampler run. Each is the step's next branch (a pass is never batch halves, and leaves the
    generation's layout as it was); the first step sets each position's signature. A pass of
    another signature than its position's starts a generation, and so does any change of shape
    outside a sampler run (nothing tells a pass from a new generation of another shape there) or
    in a new run. A pass that raised is placed again as it was."""
    latent = torch.randn(1, 4)

    def step(st, t, sigs=("batch 2", "batch 1", "batch 1"), run=None):
        return [(c.generation, c.step, c.branch, c.halves) for c in (
            st.begin(t, sig, halves=sig == "batch 2", groups=2 if sig == "batch 2" else 1,
                     latent=latent.repeat(2, 1) if sig == "batch 2" else latent, run=run)
            for sig in sigs)]

    st, run = CacheState(), torch.tensor([900.0, 600.0, 300.0])
    assert step(st, 900.0, run=run) + step(st, 600.0, run=run) == [
        (0, s, b, b == 0) for s in range(2) for b in range(3)]
    placement = st.placement()
    assert step(st, 300.0, ("batch 2",), run=run) == [(0, 2, 0, True)]
    placement = st.placement()
    failed = st.begin(300.0, "batch 1", latent=latent, run=run)
    st.abandon(placement, failed)
    assert step(st, 300.0, ("batch 1", "batch 3"), run=run) == [(0, 2, 1, False), (1, 0, 0, False)]

    st = CacheState()
    assert step(st, 900.0) == [(0, 0, 0, True), (1, 0, 0, False), (1, 0, 1, False)]
    st = CacheState()
    assert step(st, 900.0, ("batch 2",), run=run) + step(st, 900.0, ("batch 1",),
                                                     run=torch.tensor([900.0])) == [
        (0, 0, 0, True), (1, 0, 0, False)]


def test_another_text_at_the_timestep_of_a_sampler_run_is_a_branch_even_on_another_latent():
    """CosmosVideoToWorldPipeline noises its condition frames afresh for each guidance call: the
    unconditional call comes at the step's timestep on another latent, and was read as the next
    step (six steps counted as twelve of one branch, each dropping the other text's cache:
    nothing ever reused). Within a sampler run another text than the step's first call's is the
    next branch; the same text on another latent is still the next step (Heun evaluating again
    at the level), and outside a run nothing tells it from a new generation's call."""
    cond, uncond = torch.randn(1, 3, 4), torch.randn(1, 3, 4)

    def place(st, calls, run):
        return [(c.generation, c.step, c.branch) for c in (
            st.begin(t, "sig", text=text, latent=torch.randn(1, 4), run=run)
            for t, text in calls)]

    run = torch.tensor([900.0, 600.0, 600.0, 300.0])
    calls = [(900.0, cond), (900.0, uncond), (600.0, cond), (600.0, uncond),
             (600.0, cond), (600.0, uncond), (300.0, cond), (300.0, uncond)]
    assert place(CacheState(), calls, run) == [
        (0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1), (0, 2, 0), (0, 2, 1), (0, 3, 0), (0, 3, 1)]
    assert place(CacheState(), calls[:2], None) == [(0, 0, 0), (1, 0, 0)]


def test_the_noise_level_is_read_again_once_the_timestep_changes():
    """A timestep tensor passed again unmodified keeps its noise level without another host read;
    one written to in place since, or another tensor, or the same read in the other direction,
    is read again."""
    state = CacheState(timestep="falling")
    t = torch.tensor([900.0, 400.0])
    assert state.noise_level(t) == 900.0
    t.fill_(500.0)
    assert state.noise_level(t) == 500.0
    assert state.noise_level(torch.tensor([300.0])) == 300.0
    state = CacheState(timestep="rising")
    t = torch.tensor([0.25, 0.5])
    assert state.noise_level(t) == 0.75
    state.rising = False
    assert state.noise_level(t) == 0.5
    with torch.inference_mode():        # no version counter: read every time
        t = torch.tensor([0.25])
        assert state.noise_level(t) == 0.25
        t.fill_(0.125)
        assert state.noise_level(t) == 0.125


def test_a_timestep_viewing_the_sampler_run_is_read_off_the_runs_host_copy(monkeypatch):
    """A timestep that is a view of one element of the sampler run's timesteps (a pipeline's
    ``t.expand(batch)``) takes that element's value from the run, copied to the host once; a write
    to the run is seen (a view shares its version counter). Anything else, a copy, several
    elements, another dtype, is read itself."""
    run = torch.tensor([999.0, 750.0, 500.0, 250.0])
    state = CacheState(timestep="falling")
    copies = []
    tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: copies.append(t) or tolist(t))
    levels = [state.noise_level(t.expand(2), run) for t in run]
    assert levels == [999.0, 750.0, 500.0, 250.0] and copies == [run]
    run.mul_(0.5)
    assert state.noise_level(run[1].expand(2), run) == 375.0 and len(copies) == 2
    assert state._run_value(run[1].clone(), run) is None
    assert state._run_value(run[1:3], run) is None
    assert state._run_value(run[1].expand(2), run.double()) is None
    assert state._run_value(run[::2][1].expand(1), run) == 250.0
    assert state._run_value(run[1], None) is None
    rising = CacheState(timestep="rising")
    unit = torch.tensor([0.0, 0.25, 0.5])
    assert rising.noise_level(unit[2], unit) == 0.5
    assert rising.noise_level(unit[1].expand(3), unit) == 0.75


def test_per_token_timesteps_that_fall_below_a_held_maximum_are_steps():
    """Diffusion forcing (SkyReels-V2, asynchronous) denoises the first frames while the last stay
    at full noise: the per-token maximum holds for a few steps while the latent moves. Those calls
    are the generation's next steps, not new generations (which would drop the cache each time);
    the next generation, back at full noise everywhere, is one."""
    model, kw = tiny_models.wan(layers=2)
    kw["return_dict"] = False
    first = (999.0, 800.0, 600.0, 400.0, 200.0, 100.0)     # the first frame's tokens
    last = (999.0, 999.0, 999.0, 700.0, 400.0, 200.0)      # the second frame's, held at first
    f = compiled(model, {"rule": "schedule", "step": [4]})
    with torch.no_grad():
        for _ in range(2):
            for a, b in zip(first, last):
                ts = torch.tensor([[a] * 16 + [b] * 16])
                x = kw["hidden_states"] * (a / 1000)
                for sign in (1.0, -1.0):
                    f(**dict(kw, hidden_states=x, timestep=ts,
                             encoder_hidden_states=kw["encoder_hidden_states"] * sign))
    trace = dit_compile.stats(f)["trace"]
    assert [(r["generation"], r["step"], r["branch"]) for r in trace] == [
        (g, i, b) for g in (0, 1) for i in range(6) for b in (0, 1)]
    assert [r["action"] for r in trace].count("step") == 4


def test_wan_forced_schedule_matches_reference_and_counts():
    model, kw = tiny_models.wan(layers=4)
    kw["return_dict"] = False
    sched = dict(step=[2], cfg=[1, 3], block=[4, 5])
    f = compiled(model, {"rule": "schedule", **sched, "span": [1, 4]})
    ours = generation(f, kw)
    ref = Reference(model, **sched, span=(1, 4)).start(STEPS[0])
    for x, y in zip(ours, generation(ref, kw)):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
    s = dit_compile.stats(f)
    assert s["calls"] == 12
    assert s["reused"] == {"step": 2, "cfg": 2, "block": 4}
    assert [(r["step"], r["branch"]) for r in s["trace"]][:4] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert 0 < s["flops_fraction"] < 1


def test_a_block_reuse_saves_the_flops_of_every_block_of_its_span():
    """A block reuse's FLOPs are the call's less those of the span it skips, its first block
    included: over Wan's alike blocks the saving is proportional to the span's length (the
    first block left out, a span of one block saved nothing)."""
    model, kw = tiny_models.wan(layers=4)
    kw["return_dict"] = False
    saved = {}
    for n in (1, 2, 3):
        torch._dynamo.reset()
        f = compiled(model, {"rule": "schedule", "block": [2], "span": [1, 1 + n]})
        generation(f, kw, steps=STEPS[:3], branches=1)
        flops = [r["flops"] for r in dit_compile.stats(f)["trace"] if r["action"] == "block"]
        assert len(flops) == 1
        saved[n] = 1.0 - flops[0]
    assert saved[1] > 0
    assert saved[2] == pytest.approx(2 * saved[1]) and saved[3] == pytest.approx(3 * saved[1])


@pytest.mark.parametrize("order", [True, 2])
def test_extrapolated_step_reuse_matches_reference(order):
    """Steps 3 and 5 reused after three computed steps: first order reads two, second order
    three, and the two differ (so neither stands in for the other unseen)."""
    model, kw = tiny_models.wan(layers=2)
    kw["return_dict"] = False
    sched = dict(step=[3, 5])
    ours = generation(compiled(model, {"rule": "schedule", **sched, "extrapolate": order}), kw)
    refs = {k: generation(Reference(model, **sched, order=k).start(STEPS[0]), kw) for k in (1, 2)}
    for x, y in zip(ours, refs[int(order)]):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
    reused = 6      # step 3, branch 0
    assert not torch.allclose(ours[reused], ours[reused - 2])
    assert not torch.allclose(refs[1][reused], refs[2][reused], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("order", [1, 2])
def test_extrapolation_in_bf16_is_rounded_once(order):
    """A bf16 model's extrapolated output is the exact polynomial's value rounded to bf16 (within
    half an ulp, 2**-8 relative): summed in bf16, the large weights of both signs would add up the
    roundings of every term."""
    from dit_compile.runtime.cache import extrapolate
    g = torch.Generator().manual_seed(0)
    ys = [torch.randn(4096, generator=g) * 3 + k * torch.linspace(0, 1, 4096) for k in range(3)]
    pts = [(t, [y.to(torch.bfloat16)]) for t, y in zip((900.0, 870.0, 830.0), ys)]
    exact = extrapolate([(t, [y.double() for y in v]) for t, v in pts], 790.0, order)[0]
    got = extrapolate(pts, 790.0, order)[0]
    assert got.dtype == torch.bfloat16
    assert ((got.double() - exact).abs() <= exact.abs() * 2.0 ** -8).all()


def test_no_cache_option_reuses_nothing_and_no_recompiles(monkeypatch):
    model, kw = tiny_models.wan(layers=3)
    kw["return_dict"] = False
    traces = []
    real = backend.find_regions
    monkeypatch.setattr(backend, "find_regions", lambda gm: traces.append(1) or real(gm))
    f = compiled(model, {"rule": "first_block", "threshold": 1e-9})
    ref = generation(lambda **k: model(**k), kw)
    for x, y in zip(generation(f, kw), ref):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)
    assert dit_compile.stats(f)["reused"] == {}
    assert len(traces) == 1, "no recompilation across steps and branches"


def test_new_generation_drops_cache():
    model, kw = tiny_models.wan(layers=3)
    kw["return_dict"] = False
    f = compiled(model, {"rule": "schedule", "step": [1, 2, 3, 4, 5]})
    generation(f, kw)
    first = generation(f, kw)           # the timestep goes up: a new generation
    ref = generation(lambda **k: model(**k), kw, steps=STEPS[:1])
    torch.testing.assert_close(first[0], ref[0], rtol=1e-6, atol=1e-6)
    gens = {r["generation"] for r in dit_compile.stats(f)["trace"]}
    assert len(gens) == 2
    assert [r["action"] for r in dit_compile.stats(f)["trace"] if r["step"] == 0] == ["compute"] * 4


def _calls(f, kw, texts):
    """One call per (timestep, text) in order; ``texts[k]`` lists step k's branch texts."""
    with torch.no_grad():
        return [f(**dict(kw, timestep=torch.full_like(kw["timestep"], t), encoder_hidden_states=e))[0]
                for t, es in zip(STEPS, texts) for e in es]


def test_prompt_change_mid_generation_is_never_served_from_cache():
    """A new prompt (same shapes) for branch 0 from step 3 on: its first call computes, for the
    new prompt; the other branch keeps its cache. Equal embeddings rebuilt as a new tensor at
    every step are the same prompt and keep reusing."""
    model, kw = tiny_models.wan(layers=3)
    kw["return_dict"] = False
    cond, uncond = kw["encoder_hidden_states"], -kw["encoder_hidden_states"]
    other = torch.randn_like(cond)
    f = compiled(model, {"rule": "schedule", "step": [1, 2, 3, 4]})
    texts = [[cond.clone(), uncond]] * 3 + [[other, uncond]] * 2
    outs = _calls(f, kw, texts)
    actions = [(r["step"], r["branch"], r["action"]) for r in dit_compile.stats(f)["trace"]]
    assert actions[2:6] == [(1, 0, "step"), (1, 1, "step"), (2, 0, "step"), (2, 1, "step")]
    assert actions[6:] == [(3, 0, "compute"), (3, 1, "step"), (4, 0, "step"), (4, 1, "step")]
    ref = _calls(_rd(model), kw, texts)
    torch.testing.assert_close(outs[6], ref[6], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs[8], outs[6])    # step reuse of the new prompt's output


def test_one_step_sampler_called_again_keeps_state_bounded():
    """A one-step generation repeated looks like one step with ever more branches: past
    MAX_BRANCHES calls at one timestep a new generation starts, so the cached state stays bounded."""
    from dit_compile.runtime.cache import MAX_BRANCHES, find_state
    model, kw = tiny_models.wan(layers=3)
    kw["return_dict"] = False
    f = compiled(model, {"rule": "schedule", "step": [1]})
    generation(f, kw, steps=STEPS[:1], branches=3 * MAX_BRANCHES)
    state = find_state(f)
    assert len(state.branches) <= MAX_BRANCHES
    assert len({r["generation"] for r in dit_compile.stats(f)["trace"]}) == 3
    assert all(r["action"] == "compute" for r in dit_compile.stats(f)["trace"])


def test_same_timestep_on_another_latent_is_not_a_guidance_branch():
    """Guidance branches share the step's latent. The same timestep on another latent is a new
    generation at the first step (a one-step run followed by another run starting where it ended)
    and a new step later (a sampler that evaluates twice at one timestep, as Heun's does, or
    timesteps rounded to one value in bf16): never a branch rebuilt from another's difference."""
    model, kw = tiny_models.wan(layers=3)
    kw["return_dict"] = False
    f = compiled(model, {"rule": "schedule", "cfg": [1, 2, 3]})
    cond, uncond = kw["encoder_hidden_states"], -kw["encoder_hidden_states"]
    latents = [torch.randn_like(kw["hidden_states"]) for _ in range(4)]
    calls = [(900.0, 0, cond), (900.0, 0, uncond),   # a one-step run: two branches, one latent
             (900.0, 1, cond), (900.0, 1, uncond),   # the next run starts at the same timestep
             (750.0, 2, cond), (750.0, 2, uncond),   # its step 1
             (750.0, 3, cond), (750.0, 3, uncond)]   # evaluated again at 750 on a new latent
    with torch.no_grad():
        outs = [f(**dict(kw, hidden_states=latents[x], timestep=torch.tensor([t]),
                         encoder_hidden_states=e))[0] for t, x, e in calls]
        ref = [model(**dict(kw, hidden_states=latents[x], timestep=torch.tensor([t]),
                            encoder_hidden_states=e))[0] for t, x, e in calls]
    seen = [(r["generation"], r["step"], r["branch"], r["action"]) for r in dit_compile.stats(f)["trace"]]
    assert seen == [(0, 0, 0, "compute"), (0, 0, 1, "compute"), (1, 0, 0, "compute"),
                    (1, 0, 1, "compute"), (1, 1, 0, "compute"), (1, 1, 1, "cfg"),
                    (1, 2, 0, "compute"), (1, 2, 1, "cfg")]
    for i in (2, 3, 4, 6):
        torch.testing.assert_close(outs[i], ref[i], rtol=1e-5, atol=1e-5)
    # Rebuilt from this generation's own difference, taken at its first step.
    torch.testing.assert_close(outs[5], outs[4] + (ref[3] - ref[2]), rtol=1e-5, atol=1e-5)


def _rel(a, b):
    return (a - b).abs().flatten(1).mean(1) / b.abs().flatten(1).mean(1)


def _modulated(model, kw, x, t):
    """What the first block's self-attention reads (its timestep-modulated input), caught by a
    hook on diffusers' own module: the signal TeaCache reads."""
    seen = []
    hook = model.blocks[0].attn1.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append((args[0] if args else kwargs["hidden_states"]).clone()),
        with_kwargs=True)
    try:
        with torch.no_grad():
            model(**dict(kw, hidden_states=x, timestep=torch.full_like(kw["timestep"], t)))
    finally:
        hook.remove()
    return seen[0]


def _teacache_reference(model, kw, threshold, signal, start, coefficients=None):
    """TeaCache (``signal="modulated"``, or ``"input"`` on the latent) and EasyCache
    (``"output"``) written out over one Euler sampler run, per sample of the batch: the change
    since the last call (of the first block's modulated input or of the latent, through
    TeaCache's polynomial where ``coefficients`` are given, or the latent's times the output's
    rate of change per input change between the last two computes) accumulates from the last
    compute, and the whole step reuses the last output while every sample's sum stays below the
    threshold. Also returns the signal of each call: the largest sum, where one was taken."""
    import numpy as np
    x, prev, acc, rate = kw["hidden_states"].clone(), None, None, None
    computed, outs, actions, signals = [], [], [], []
    for i, t in enumerate(STEPS):
        seen = _modulated(model, kw, x, t) if signal == "modulated" else x
        if prev is not None and (signal != "output" or rate is not None):
            change = _rel(seen, prev) * (1.0 if signal != "output" else rate)
            if coefficients is not None:
                change = torch.from_numpy(np.polyval(coefficients, change.double().numpy())
                                          ).float().clamp_min(0)
            acc = change if acc is None else acc + change
            signals.append(float(acc.max()))
        else:
            signals.append(None)
        if i >= start and computed and acc is not None and bool((acc < threshold).all()):
            y = computed[-1][1]
            actions.append("step")
        else:
            with torch.no_grad():
                y = model(**dict(kw, hidden_states=x, timestep=torch.full_like(kw["timestep"], t)))[0]
            if computed:
                rate = _rel(y, computed[-1][1]) / _rel(x, computed[-1][0]).clamp_min(1e-12)
            computed.append((x, y))
            acc = None
            actions.append("compute")
        outs.append(y)
        prev, x = seen, x + (STEPS[i + 1] - t if i + 1 < len(STEPS) else -t) / 1000.0 * y
    return outs, actions, signals


@pytest.mark.parametrize("signal,threshold,coefficients,nested", [
    ("modulated", 0.15, None, False), ("input", 0.1, None, False), ("output", 0.3, None, False),
    # Flatter than the identity (more reuse), the first below zero near zero change.
    ("modulated", 0.15, [-3.0, 1.0, -0.01], False), ("input", 0.1, [0.5, 0.0], False),
    ("modulated", 0.15, None, True)])   # read inside a nested block (nest_blocks)
def test_teacache_and_easycache_match_eager_reference(signal, threshold, coefficients, nested):
    """Per sample of a batch of two latents, inside an Euler sampler whose latent moves."""
    model, kw = tiny_models.wan(layers=3, batch=2)
    if nested:
        dit_compile.nest_blocks(model)
    kw["return_dict"] = False
    kw["hidden_states"][1] *= 2.0
    # From a step where the rule, started a step sooner, would reuse (the premise): not before.
    start = 3 if signal == "output" else 2      # EasyCache has its rate after two computes
    ref, actions, signals = _teacache_reference(model, kw, threshold, signal, start, coefficients)
    early = _teacache_reference(model, kw, threshold, signal, start - 1, coefficients)[1]
    assert early[start - 1] == "step" and actions[start - 1] == "compute"
    assert "step" in actions and actions.count("compute") >= 2, actions     # the premise
    if coefficients is not None:    # the polynomial decides: without it, other decisions
        assert _teacache_reference(model, kw, threshold, signal, start)[1] != actions
    rule = {"rule": "teacache", "threshold": threshold, "signal": signal, "start": start}
    f = compiled(model, rule if coefficients is None else dict(rule, coefficients=coefficients))
    x, outs = kw["hidden_states"].clone(), []
    with torch.no_grad():
        for i, t in enumerate(STEPS):
            outs.append(f(**dict(kw, hidden_states=x, timestep=torch.full_like(kw["timestep"], t)))[0])
            x = x + (STEPS[i + 1] - t if i + 1 < len(STEPS) else -t) / 1000.0 * outs[-1]
    trace = dit_compile.stats(f)["trace"]
    assert [r["action"] for r in trace] == actions
    # The sums too, not only the decisions they led to: the trace shows what the rule added up.
    got = [r["signal"] for r in trace]
    assert [g is None for g in got] == [s is None for s in signals], (got, signals)
    assert [g for g in got if g is not None] == pytest.approx(
        [s for s in signals if s is not None], rel=1e-4, abs=1e-7)
    for i, (a, b) in enumerate(zip(outs, ref)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"call {i}")


def test_teacache_polynomial_below_zero_adds_nothing():
    """A fitted polynomial may dip below zero near zero change. The mapped change is clamped
    there: a still step adds nothing to the sum, and takes back nothing that earlier steps added,
    or the rule would reuse past its threshold after every step that hardly moved."""
    pol = make_policy({"rule": "teacache", "threshold": 0.35, "signal": "input",
                       "coefficients": [1.0, -0.1]}, None)       # change - 0.1
    state = CacheState()
    state.begin(1000.0, "sig")
    bc = state.branch(0)
    bc.outputs = [(1000.0, [torch.zeros(1, 4)])]
    bc.last_input = torch.ones(1, 4)
    decisions = []
    for step, move in enumerate((1.3, 1.01, 1.3), start=1):    # relative changes 0.3, 0.01, 0.3
        latent = bc.last_input * move
        decisions.append(pol.step(Step(0, step, 0, 1000.0 - 100 * step), state, latent))
        bc.last_input = latent
    assert [a for a, _ in decisions] == ["step", "step", "compute"]
    assert [sig for _, sig in decisions] == pytest.approx([0.2, 0.2, 0.4])


def test_teacache_polynomial_of_large_coefficients_is_evaluated_exactly():
    """A polynomial fitted over small changes (degree 7 over changes near 0.02, as fit_teacache
    returns for a model whose latent moves little) has coefficients near 1e15 whose terms cancel
    to a value near 0.1. The rule adds up that value as float64 gives it: in float32 it was off
    by tenths of itself, and the rule reused where it should not, or the other way round."""
    from dit_compile.runtime.policy import polyval
    coefficients = (1e16 * np.poly([0.02] * 7)).tolist()      # 1e16 (x - 0.02)^7, then + 0.1
    coefficients[-1] += 0.1
    x = torch.tensor([0.013, 0.02, 0.025, 0.026], dtype=torch.float32)
    expected = np.polyval(coefficients, x.double().numpy())     # the float32 changes, exactly
    got = polyval(tuple(coefficients), x)
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.double().numpy(), expected, rtol=1e-6)
    pol = make_policy({"rule": "teacache", "threshold": 1.0, "signal": "input",
                       "coefficients": coefficients}, None)
    state = CacheState()
    state.begin(1000.0, "sig")
    bc = state.branch(0)
    bc.outputs = [(1000.0, [torch.zeros(1, 4)])]
    bc.last_input = torch.ones(1, 4)
    _, signal = pol.step(Step(0, 1, 0, 900.0), state, torch.full((1, 4), 1.025))
    assert signal == pytest.approx(float(np.polyval(coefficients, np.float32(1.025) - 1.0)),
                                   rel=1e-5)


@pytest.mark.parametrize("in_place", [False, True])
def test_residual_step_reuse_matches_eager_reference(in_place):
    """``step_mode="residual"``: a reused step returns this call's latent plus the output's
    residual over the latent at the last compute (what the model added), not the old output.
    The latent at the last compute is a copy: a sampler that steps its latent in place
    (``x.add_(...)``) gets the same."""
    model, kw = tiny_models.wan(layers=3)
    kw["return_dict"] = False
    reuse = {2, 4, 5}
    f = compiled(model, {"rule": "schedule", "step": sorted(reuse), "step_mode": "residual"})
    x, last = kw["hidden_states"].clone(), None
    with torch.no_grad():
        for i, t in enumerate(STEPS):
            call = dict(kw, hidden_states=x, timestep=torch.tensor([t]))
            ours = f(**call)[0]
            if i in reuse:
                theirs = x + (last[1] - last[0])
            else:
                theirs = model(**call)[0]
                last = (x.clone(), theirs)
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5, msg=f"step {i}")
            x = x.add_(0.2 * ours) if in_place else x + 0.2 * ours
    assert [r["action"] for r in dit_compile.stats(f)["trace"]].count("step") == len(reuse)


def test_fit_teacache_fits_the_changes_every_branch_saw():
    """``fit_teacache``: while ``run`` generates, every call computes, and the polynomial is the
    least-squares fit of the output's relative change on the modulated input's between each
    branch's consecutive calls, per sample, as computed here from the eager model."""
    import numpy as np
    model, kw = tiny_models.wan(layers=3, batch=2)
    kw["return_dict"] = False
    kw["hidden_states"][1] *= 2.0
    texts = [kw["encoder_hidden_states"], -kw["encoder_hidden_states"]]

    def sample(f):
        x, calls = kw["hidden_states"].clone(), []
        with torch.no_grad():
            for i, t in enumerate(STEPS):
                ys = [f(**dict(kw, hidden_states=x, timestep=torch.full_like(kw["timestep"], t),
                               encoder_hidden_states=e))[0] for e in texts]
                calls.append((x, t, ys))
                dt = (STEPS[i + 1] if i + 1 < len(STEPS) else 0.0) - t
                x = x + dt / 1000.0 * (ys[1] + 3.0 * (ys[0] - ys[1]))    # a guided Euler step
        return calls

    f = compiled(model, {"rule": "teacache", "threshold": 10.0, "start": 1})
    runs = []
    fitted = dit_compile.fit_teacache(f, lambda: runs.append(sample(f)), degree=2)
    assert len(runs) == 2           # the first compiled the model, the second was recorded
    assert dit_compile.stats(f)["calls"] == 0       # dropped after, as reset does
    ref = sample(model)
    torch.testing.assert_close(runs[1][-1][2][0], ref[-1][2][0], rtol=1e-5, atol=1e-5)  # no reuse
    mods = [_modulated(model, kw, x, t) for x, t, _ in ref]
    x = torch.cat([_rel(mods[i], mods[i - 1]) for i in range(1, len(ref)) for _ in texts])
    y = torch.cat([_rel(ref[i][2][b], ref[i - 1][2][b]) for i in range(1, len(ref))
                   for b in range(len(texts))])
    expected = np.polyfit(x.double().numpy(), y.double().numpy(), 2)
    np.testing.assert_allclose(fitted, expected, rtol=1e-3, atol=1e-4 * np.abs(expected).max())
    # Once the model has run, one recorded run is all it takes; the fit is the same.
    again = dit_compile.fit_teacache(f, lambda: runs.append(sample(f)), degree=2)
    assert len(runs) == 3
    np.testing.assert_allclose(again, fitted, rtol=1e-6, atol=1e-9)
    # Another compile of the same module ran since: its state is the model's now, and the first
    # run of this one replaces it with this configuration's own.
    h = compiled(model, {"rule": "first_block", "threshold": 0.1})
    generation(h, kw)
    again = dit_compile.fit_teacache(f, lambda: runs.append(sample(f)), degree=2)
    assert len(runs) == 5
    np.testing.assert_allclose(again, fitted, rtol=1e-6, atol=1e-9)
    # Twice the state asked to record is no longer the model's after the run: the first run's
    # (h's, which f's calls replace) and the second's (f's, which h's calls replace at its end):
    # what f's calls recorded into it is not taken.
    generation(h, kw)
    calls = iter([[f], [f, h]])

    def ends_elsewhere():
        for g in next(calls):
            generation(g, kw, steps=STEPS[:4])
    with pytest.raises(ValueError, match="nothing recorded"):
        dit_compile.fit_teacache(f, ends_elsewhere, degree=2)

    def stopped():
        generation(f, kw)
        raise RuntimeError("stopped")
    with pytest.raises(RuntimeError, match="stopped"):
        dit_compile.fit_teacache(f, stopped, degree=2)
    assert dit_compile.stats(f)["calls"] == 0       # dropped after a run that raised, too

    # One step's change per sample (both branches see one latent): two points cannot fix a
    # polynomial of degree 4, nor of degree 2 (three coefficients).
    for degree in (4, 2):
        with pytest.raises(ValueError, match=f"2 distinct changes recorded, too few for a "
                                             f"polynomial of degree {degree}"):
            dit_compile.fit_teacache(f, lambda: generation(f, kw, steps=STEPS[:2]), degree=degree)

    g = compiled(tiny_models.wan(layers=3)[0], {"rule": "first_block", "threshold": 0.1})
    with pytest.raises(ValueError, match="nothing recorded: the model must be compiled with a teacache"):
        dit_compile.fit_teacache(g, lambda: generation(g, tiny_models.wan(layers=3)[1]))
    # EasyCache's signal takes no coefficients: fitting them for it would hand the user numbers
    # that the same rule then refuses.
    e = compiled(tiny_models.wan(layers=3)[0], {"rule": "teacache", "threshold": 0.1,
                                                "signal": "output"})
    with pytest.raises(ValueError, match="nothing recorded: the model must be compiled with a teacache"):
        dit_compile.fit_teacache(e, lambda: generation(e, tiny_models.wan(layers=3)[1]))
    for degree in (0, 8, True, 2.0):     # up to 8 coefficients
        with pytest.raises(ValueError, match=rf"degree={degree!r}: must be an integer from 1 to 7"):
            dit_compile.fit_teacache(f, lambda: None, degree=degree)


def test_fit_teacache_of_a_high_degree_over_small_changes_is_the_least_squares_fit():
    """Over a 25-step run the latent moves by 1-3% a step, and the column of x^7 is 1e-12 of the
    constant's: the fit is still numpy.polyfit's (least squares, whatever the degree), not one
    whose solver cut off the high degrees (degree 7 fitted no better than 5)."""
    model, kw = tiny_models.wan(layers=3, batch=2)
    kw["return_dict"] = False
    kw["hidden_states"][1] *= 2.0
    steps = np.linspace(980.0, 20.0, 25).tolist()

    def sample(f):
        x, calls = kw["hidden_states"].clone(), []
        with torch.no_grad():
            for i, t in enumerate(steps):
                y = f(**dict(kw, hidden_states=x, timestep=torch.full_like(kw["timestep"], t)))[0]
                calls.append((x, y))
                x = x + ((steps[i + 1] if i + 1 < len(steps) else 0.0) - t) / 1000.0 * y
        return calls

    f = compiled(model, {"rule": "teacache", "threshold": 0.1, "signal": "input"})
    fitted = dit_compile.fit_teacache(f, lambda: sample(f), degree=np.int64(7))   # NumPy's too
    ref = sample(model)
    x = torch.cat([_rel(ref[i][0], ref[i - 1][0]) for i in range(1, len(ref))]).double().numpy()
    y = torch.cat([_rel(ref[i][1], ref[i - 1][1]) for i in range(1, len(ref))]).double().numpy()
    assert x.max() < 0.05       # the premise: small changes
    expected = np.polyfit(x, y, 7)
    np.testing.assert_allclose(np.polyval(fitted, x), np.polyval(expected, x), atol=1e-5)


@pytest.mark.parametrize("signal", ["modulated", "input"])
def test_latent_updated_in_place_is_seen_to_change(signal):
    """A sampler that updates its latent in place (``x.add_(...)``) gets the decisions of one that
    makes a new tensor: the input a rule compares against is a copy, not the live tensor (the
    latent itself, under ``signal="input"``)."""
    model, kw = tiny_models.wan(layers=3)
    kw["return_dict"] = False
    cache = {"rule": "teacache", "threshold": 0.5, "signal": signal}
    runs = []
    f = compiled(model, cache)
    for in_place in (False, True):
        dit_compile.reset(f)
        x = kw["hidden_states"].clone()
        with torch.no_grad():
            for t in STEPS:
                v = f(**dict(kw, hidden_states=x, timestep=torch.tensor([t])))[0]
                x = x.add_(0.3 * v) if in_place else x + 0.3 * v
        runs.append(([r["signal"] for r in dit_compile.stats(f)["trace"]], x))
    assert runs[0][0] == runs[1][0]
    assert all(sig is None or sig > 0 for sig in runs[1][0])
    torch.testing.assert_close(runs[0][1], runs[1][1])


def test_guidance_branches_with_prompts_of_different_lengths_are_one_generation():
    """A negative prompt of another length than the prompt (Qwen-Image trims each to its own) is
    the other branch of the same generation, and caching goes on."""
    model, kw = tiny_models.wan(layers=3)
    kw["return_dict"] = False
    f = compiled(model, {"rule": "schedule", "step": [2, 3]})
    texts = [[kw["encoder_hidden_states"], torch.randn(1, 3, 16)]] * 4
    _calls(f, kw, texts)
    s = dit_compile.stats(f)
    assert {r["generation"] for r in s["trace"]} == {0}
    assert s["reused"] == {"step": 4}


def test_a_recompile_for_the_other_branchs_text_length_keeps_the_cache():
    """The second branch's text length makes Dynamo recompile with dynamic shapes at its first
    call, and both branches run that graph from then on. It computes what the first graph did,
    so branch 0 keeps what it had: the first generation decides and comes out as every later one
    (the cache used to be dropped at step 1, and the default preset reused nothing in the first
    generation of a Qwen-Image pipeline)."""
    model, kw = tiny_models.wan(layers=2)
    f = compiled(model, "balanced")
    pos, neg = torch.randn(1, 7, 16), torch.randn(1, 5, 16)
    ts = torch.linspace(1000, 125, 8).tolist() + [0.0]

    def generation():
        x = kw["hidden_states"].clone()
        with torch.no_grad():
            for t, nxt in zip(ts, ts[1:]):
                call = dict(hidden_states=x, timestep=torch.full((1,), t), return_dict=False)
                c = f(**call, encoder_hidden_states=pos)[0]
                u = f(**call, encoder_hidden_states=neg)[0]
                x = x + (nxt - t) / 1000 * (u + 4 * (c - u))
        return x

    first, second = generation(), generation()
    acts = [[r["action"] for r in dit_compile.stats(f)["trace"] if r["generation"] == g]
            for g in (0, 1)]
    assert acts[0] == acts[1] and "step" in acts[0]
    torch.testing.assert_close(first, second, rtol=0, atol=0)


def test_per_token_timesteps_give_the_noise_level():
    """Wan 2.2's per-token timesteps (batch, tokens) are zero on the conditioning frame's tokens:
    the call's noise level is the largest, so steps and generations are told apart as usual."""
    model, kw = tiny_models.wan(layers=3)
    kw["return_dict"] = False
    f = compiled(model, {"rule": "schedule", "step": [2]})
    tokens = 2 * 4 * 4          # frames x (8 / 2) x (8 / 2) patches
    with torch.no_grad():
        for t in STEPS[:3]:
            ts = torch.full((1, tokens), t)
            ts[:, :16] = 0.0        # the first frame is the condition
            f(**dict(kw, timestep=ts))
    trace = dit_compile.stats(f)["trace"]
    assert [(r["generation"], r["step"], r["t"], r["action"]) for r in trace] == [
        (0, 0, STEPS[0], "compute"), (0, 1, STEPS[1], "compute"), (0, 2, STEPS[2], "step")]


def test_residual_step_mode_needs_an_output_shaped_like_the_latent():
    from diffusers import WanTransformer3DModel
    torch.manual_seed(0)
    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8,
                                  in_channels=8, out_channels=4, text_dim=16, freq_dim=16,
                                  ffn_dim=32, num_layers=3, rope_max_seq_len=32).eval()
    f = compiled(model, {"rule": "schedule", "step": [1], "step_mode": "residual"})
    with torch.no_grad(), pytest.raises(
            Exception, match=r"step_mode='residual'.*\(1, 8, 2, 8, 8\).*\(1, 4, 2, 8, 8\)"):
        f(hidden_states=torch.randn(1, 8, 2, 8, 8), timestep=torch.tensor([900.0]),
          encoder_hidden_states=torch.randn(1, 5, 16), return_dict=False)


@pytest.mark.parametrize("change", ["latent shape", "timestep dtype"])
def test_shape_or_dtype_change_mid_generation_is_a_new_generation(change):
    """A forced schedule would reuse at step 2: a call of another signature there computes, as the
    first call of a new generation (UniPC hands int64 timesteps where others hand floats)."""
    model, kw = tiny_models.wan(layers=3)
    kw["return_dict"] = False
    f = compiled(model, {"rule": "schedule", "step": [1, 2, 3]})
    generation(f, kw, steps=STEPS[:2], branches=1)
    t = torch.tensor([STEPS[2]])
    if change == "latent shape":
        other = dict(kw, hidden_states=torch.randn(1, 4, 2, 8, 12), timestep=t)
    else:
        other = dict(kw, timestep=t.to(torch.int64))
    with torch.no_grad():
        y = f(**other)[0]
        torch.testing.assert_close(y, model(**other)[0], rtol=1e-5, atol=1e-5)
    trace = dit_compile.stats(f)["trace"]
    assert trace[-1]["action"] == "compute"
    assert trace[-1]["generation"] == trace[0]["generation"] + 1


# One step: the timestep falls or the sampler starts again; tokens; the timestep's dtype; the
# prompt of each guidance branch.
change = st.tuples(st.sampled_from(["next", "restart"]), st.sampled_from([4, 6]),
                   st.sampled_from([torch.float32, torch.int64]), st.integers(0, 1), st.integers(2, 3))


@settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck))
@given(steps=st.lists(change, min_size=2, max_size=8), falls=st.lists(st.integers(40, 90), min_size=8),
       branches=st.integers(1, 2))
def test_no_call_is_served_from_another_shape_dtype_prompt_or_generation(steps, falls, branches):
    """Any sequence of steps (one call per guidance branch, on one latent) under a schedule that
    reuses every step it may: a call whose shape or timestep dtype differs from the step before,
    whose branch's prompt differs from that branch's last, or whose timestep rises (a new sampler
    run), computes; any other call computes or reuses its own branch's last output computed,
    never an older one nor another branch's (a prompt left and taken again included: one prompt
    is kept per branch). The rule may compute more than this (below a one-call generation that
    rose, the next call starts another: a one-step sampler's), never reuse more; the second step,
    falling on the first's shapes and prompts, reuses."""
    spec = random_dits.Spec(dim=8, depths=(3,), cross_attn=True, adaln=True, gated=False,
                            two_streams=False, extra_input=False, batch=1, tokens=4)
    model, _ = random_dits.build(spec)
    texts = [torch.randn(1, 3, 6) for _ in range(4)]
    torch._dynamo.reset()
    f = compiled(model, {"rule": "schedule", "step": list(range(1, 20))})
    t, shapes, prompts, computed = 999.0, None, [None, None], [None, None]

    def close(a, b):
        return b is not None and a.shape == b.shape and torch.allclose(a, b, rtol=1e-5, atol=1e-5)

    for i, ((move, tokens, dtype, *prompt), fall) in enumerate(zip(steps, falls)):
        rises = i > 0 and move == "restart" and t < 999.0
        t = 999.0 if i == 0 or rises else t - fall
        latent = torch.randn(1, tokens, 4)
        new = i == 0 or rises or (tokens, dtype) != shapes
        shapes = (tokens, dtype)
        for b in range(branches):
            kw = dict(hidden_states=latent, encoder_hidden_states=texts[prompt[b]],
                      timestep=torch.tensor([t]).to(dtype))
            changed = new or prompt[b] != prompts[b]
            prompts[b] = prompt[b]
            with torch.no_grad():
                out, ref = f(**kw)[0], model(**kw)[0]
            where = f"step {i}, branch {b} of {steps[:i + 1]}"
            if changed:
                assert close(out, ref), f"{where}: not computed"
            else:
                assert close(out, ref) or close(out, computed[b]), f"{where}: another output"
                assert i != 1 or close(out, computed[b]), f"{where}: not reused"
            computed[b] = out if close(out, ref) else computed[b]


@pytest.mark.parametrize("first", [True, False], ids=["autocast then off", "off then autocast"])
def test_autocast_switched_mid_generation_reuses_nothing_of_the_other(first):
    """Dynamo recompiles when autocast is switched on or off; that graph computes the same ops
    but returns other dtypes. A forced reuse at step 2 handed back the bf16 output cached under
    autocast where the call returns float32 (and the other way round)."""
    model, kw = tiny_models.wan(layers=3)
    kw["return_dict"] = False
    f = compiled(model, {"rule": "schedule", "step": [2]})
    with torch.no_grad():
        for i, t in enumerate(STEPS[:3]):
            with torch.autocast("cpu", torch.bfloat16, enabled=(i < 2) == first):
                call = dict(kw, timestep=torch.tensor([t]))
                y, ref = f(**call)[0], model(**call)[0]
    assert y.dtype == ref.dtype
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    assert [r["action"] for r in dit_compile.stats(f)["trace"]][-1] == "compute"


def test_schedule_past_the_last_step_is_said_once():
    """Steps count from 0: a schedule that names the last step (3 of 0..3) names a step that
    applied, and only those past it are said."""
    model, kw = tiny_models.wan(layers=3)
    kw["return_dict"] = False
    f = compiled(model, {"rule": "schedule", "step": [2, 3, 9], "block": [12]})
    generation(f, kw, steps=STEPS[:4], branches=1)
    with pytest.warns(UserWarning, match=r"names steps \{'step': \[9\], 'block': \[12\]\}, past the "
                      r"last step \(3"):
        generation(f, kw, steps=STEPS[:4], branches=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        generation(f, kw, steps=STEPS[:4], branches=1)
    assert dit_compile.stats(f)["reused"] == {"step": 6}


@pytest.mark.parametrize("cache", [{"rule": "schedule", "cfg": [1, 2]},
                                   {"rule": "fastercache", "every": 2}])
def test_cfg_reuse_without_a_second_branch_is_said_once(cache):
    """Guidance off (or a guidance-distilled model): each step calls the transformer once, so
    there is no branch to rebuild another from. That is said when the generation ends, not left
    to look like a schedule that applied; with two branches nothing is said."""
    model, kw = tiny_models.wan(layers=3)
    kw["return_dict"] = False
    f = compiled(model, cache)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        generation(f, kw, steps=STEPS[:4], branches=2)
        generation(f, kw, steps=STEPS[:4], branches=2)
        generation(f, kw, steps=STEPS[:4], branches=1)
    assert dit_compile.stats(f)["reused"]["cfg"] > 0
    with pytest.warns(UserWarning, match="one guidance branch per step"):
        generation(f, kw, steps=STEPS[:4], branches=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        generation(f, kw, steps=STEPS[:4], branches=1)


def test_cfg_reuse_on_three_batched_branches_says_why_it_never_applied():
    """Perturbed-attention guidance batches [uncond, cond, perturbed] in one call: guidance is on,
    but cfg reuse does not take thirds. The warning, given as the next generation starts, said
    guidance was off."""
    policy, state = make_policy({"rule": "schedule", "cfg": [1]}, 4), CacheState()
    with pytest.warns(UserWarning) as caught:
        for g in range(2):
            for i, t in enumerate(STEPS[:3]):
                s = state.begin(t, "sig", groups=3, latent=torch.full((3,), 10.0 * g + i))
                policy.step(s, state, torch.zeros(3))
                state.record(s, "compute", 1.0)
    said = [str(w.message) for w in caught]
    assert len(said) == 1 and "perturbed-attention guidance" in said[0], said
    assert [r["groups"] for r in state.stats()["trace"]] == [3] * 6


@pytest.mark.parametrize("cache,kept", [({"rule": "schedule", "step": [2]}, False),
                                         ({"rule": "schedule", "cfg": [2]}, True)])
def test_branch_differences_are_kept_only_for_cfg_reuse(cache, kept):
    """A branch difference is a whole output's worth of memory: a policy that never reuses cfg
    keeps none (it kept one per branch, a fifth of what the step rule caches, counted against
    cache_memory)."""
    from dit_compile.runtime.cache import find_state
    model, kw = tiny_models.wan(layers=3)
    kw["return_dict"] = False
    f = compiled(model, cache)
    generation(f, kw, steps=STEPS[:3], branches=2)
    assert bool(find_state(f).cfg_diff) == kept


def test_trace_is_bounded_and_counts_are_not():
    """A long-running server: the per-call trace keeps the last generations only, while the counts
    cover every call since the last reset."""
    from dit_compile.runtime.cache import TRACE_GENERATIONS
    model, kw = tiny_models.wan(layers=3)
    kw["return_dict"] = False
    f = compiled(model, {"rule": "schedule", "step": [1]})
    runs = TRACE_GENERATIONS + 3
    for _ in range(runs):
        generation(f, kw, steps=STEPS[:2], branches=1)
    stats = dit_compile.stats(f)
    assert stats["calls"] == 2 * runs and stats["reused"] == {"step": runs}
    assert stats["flops_fraction"] == pytest.approx(0.5)
    gens = [r["generation"] for r in stats["trace"]]
    assert sorted(set(gens)) == list(range(runs - TRACE_GENERATIONS, runs))
    assert len(gens) == 2 * TRACE_GENERATIONS
    dit_compile.reset(f)
    generation(f, kw, steps=STEPS[:1], branches=1)
    assert dit_compile.stats(f)["calls"] == 1 and len(dit_compile.stats(f)["trace"]) == 1


def test_reset_and_two_models_share_nothing():
    m1, kw = tiny_models.wan(layers=3)
    m2, _ = tiny_models.wan(layers=3)
    kw["return_dict"] = False
    f1 = compiled(m1, {"rule": "schedule", "step": [1, 2]})
    f2 = compiled(m2, {"rule": "schedule", "step": [1, 2]})
    generation(f1, kw, steps=STEPS[:2])
    assert dit_compile.stats(f1)["cached_bytes"] > 0
    with pytest.raises(ValueError, match="no mixcache state"):
        dit_compile.stats(f2)
    generation(f2, kw, steps=STEPS[:1])
    assert dit_compile.stats(f2)["calls"] == 2
    dit_compile.reset(f1)
    assert dit_compile.stats(f1)["cached_bytes"] == 0
    with torch.no_grad():   # after reset, the same timestep is a fresh generation, not a branch
        f1(**dict(kw, timestep=torch.tensor([STEPS[1]])))
    assert dit_compile.stats(f1)["trace"][-1]["action"] == "compute"


def test_two_threads_generating_at_once_share_nothing():
    """Two threads run a generation each with one compiled model, call by call in turns (a
    server running two pipelines at once). Each thread's generation reuses as the schedule says
    and equals the same generation run alone; one state for both would take one thread's calls
    for the other's steps and branches. A thread that ended leaves no state behind."""
    import threading
    from dit_compile.runtime.cache import model_states
    if tuple(int(p) for p in torch.__version__.split(".")[:2]) < (2, 12):
        # Reproduced with backend="eager", no dit_compile: after compiled code ran in two
        # threads at once, torch 2.11's Dynamo traces a later model's graph break in the main
        # thread otherwise (Z-Image's lazy rotary table: one fragment of the forward, not four),
        # and test_a_break_only_the_first_call_makes_is_traced_past then fails in this process.
        pytest.skip("torch 2.11: compiled code run in two threads changes later traces")
    model, kw = tiny_models.wan(layers=3)
    kw["return_dict"] = False
    f = compiled(model, {"rule": "schedule", "step": [2], "cfg": [1, 3], "block": [4]})
    latents = [torch.randn_like(kw["hidden_states"]) for _ in range(2)]
    alone = []
    for x in latents:
        dit_compile.reset(f)
        alone.append(generation(f, dict(kw, hidden_states=x)))
    expected = dit_compile.stats(f)["reused"]
    assert expected == {"step": 2, "cfg": 2, "block": 2}
    turns, outs = threading.Barrier(2), {}

    class InTurns:              # every call waits for the other thread's call of that turn
        def __call__(self, **call):
            turns.wait()
            return f(**call)

    def run(i):
        outs[i] = generation(InTurns(), dict(kw, hidden_states=latents[i]))
    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(2):
        for a, b in zip(outs[i], alone[i]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    # This thread's (its last generation, after the reset) and each worker's: one generation each.
    assert [s.stats()["reused"] for s in model_states(model)] == [expected] * 3
    # A state made for a new thread drops those of the threads that ended. stats in a thread
    # is of its own state, not of the one that ran last.
    seen = {}

    def one_step():
        generation(f, kw, STEPS[:1])
        seen["worker"] = dit_compile.stats(f)["calls"]
    last = threading.Thread(target=one_step)
    last.start()
    last.join()
    assert len(model_states(model)) == 2        # this thread's and the last one's
    assert seen["worker"] == 2 and dit_compile.stats(f)["calls"] == 2 * len(STEPS), seen


def test_a_reset_in_one_thread_leaves_another_threads_generation_alone():
    """The README's own loops reset between generations, in a thread each: a thread's reset is
    its own (thread A, halfway through, goes on as alone while B, new, resets and generates; a
    reset of every thread's restarted A). Threads making their first calls at once each get a
    state (they raced to add theirs, and a call raised KeyError)."""
    import sys
    import threading
    from dit_compile.runtime.cache import find_state, model_states
    if tuple(int(p) for p in torch.__version__.split(".")[:2]) < (2, 12):
        pytest.skip("torch 2.11: compiled code run in two threads changes later traces")
    model, kw = tiny_models.wan(layers=3)
    kw["return_dict"] = False
    f = compiled(model, {"rule": "schedule", "step": [2], "cfg": [1, 3], "block": [4]})
    alone = generation(f, kw)
    half, rest, outs = threading.Event(), threading.Event(), {}

    def a():
        outs["a"] = generation(f, kw, STEPS[:3])
        half.set()
        rest.wait()
        outs["a"] += generation(f, kw, STEPS[3:])

    def b():
        half.wait()
        dit_compile.reset(f)
        outs["b"] = generation(f, dict(kw, hidden_states=-kw["hidden_states"]))
        rest.set()
    threads = [threading.Thread(target=a), threading.Thread(target=b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for x, y in zip(outs["a"], alone):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    # This thread has a state: its reset is its own.
    mine = find_state(model, threading.current_thread())
    workers = [s for s in model_states(model) if s is not mine]
    dit_compile.reset(f)
    assert dit_compile.stats(f)["calls"] == 0
    assert [s.stats()["calls"] for s in workers] == [2 * len(STEPS)] * 2
    # A thread with none resets nothing of the others' (its stats read the last one's).
    seen = {}

    def keeper():
        dit_compile.reset(f)
        seen["calls"] = [s.stats()["calls"] for s in workers]
    t = threading.Thread(target=keeper)
    t.start()
    t.join()
    assert seen == {"calls": [2 * len(STEPS)] * 2}, seen
    # New threads' first calls at once, many times over.
    interval, errors = sys.getswitchinterval(), []
    sys.setswitchinterval(1e-6)
    try:
        for _ in range(30):
            start = threading.Barrier(4)

            def first():
                start.wait()
                try:
                    generation(f, kw, STEPS[:1], branches=1)
                except Exception as e:  # noqa: BLE001 (the race's KeyError, RuntimeError)
                    errors.append(e)
            threads = [threading.Thread(target=first) for _ in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
    finally:
        sys.setswitchinterval(interval)
    assert not errors, errors


def test_a_rise_within_a_sampler_run_by_its_rounding_is_the_next_step():
    """KDPM2's interpolated timesteps round to just below the next one (554.99994, then 555.0):
    one run of the sampler, one generation, where each such rise started another (a forced
    schedule reused twice in one pipeline call, and the presets' warm-up restarted). A rise
    beyond rounding (custom sigmas that go up) still starts one, as a rise with no run does."""
    from dit_compile.runtime.cache import CacheState
    run = torch.tensor([999.0, 777.0, 554.99994, 555.0, 333.0, 111.000008, 111.0])
    state = CacheState()
    steps = [state.begin(float(t), "signature", run=run) for t in run]
    assert [(s.generation, s.step) for s in steps] == [(0, i) for i in range(len(run))]
    assert state.begin(700.0, "signature", run=run).generation == 1, "a rise of a quarter"
    state = CacheState()
    state.begin(555.0 - 6e-5, "signature")
    assert state.begin(555.0, "signature").generation == 1, "no run to ask"


def test_another_sampler_run_is_a_new_generation_whatever_its_timestep():
    """A call from another run of the sampler (another ``scheduler.timesteps`` tensor) starts a
    generation even below the last call's timestep; one from the same run is its next step, and a
    call from no pipeline leaves the timestep to decide."""
    from dit_compile.runtime.cache import CacheState
    state, first, second = CacheState(), torch.tensor([1.0, 0.5]), torch.tensor([0.4, 0.2])
    assert state.begin(1.0, "signature", run=first).generation == 0
    step = state.begin(0.5, "signature", run=first)
    assert (step.generation, step.step) == (0, 1), "the same run's next step"
    step = state.begin(0.4, "signature", run=second)
    assert (step.generation, step.step) == (1, 0), "another run, started lower"
    del second          # a dead run is another run, even where a new tensor takes its address
    step = state.begin(0.2, "signature", run=torch.tensor([0.4, 0.2]))
    assert (step.generation, step.step) == (2, 0)
    step = state.begin(0.1, "signature")
    assert (step.generation, step.step) == (2, 1), "no pipeline: the timestep decides"


class Sampler:
    """What the runtime reads of a diffusers pipeline (``runtime/sampler.py``): a ``__call__``
    whose ``self.scheduler.timesteps`` is a new tensor at each run. The model is called with
    ``timesteps`` as given, one call per guidance branch (``generation``)."""

    def __init__(self, f, timesteps):
        self.f, self.timesteps = f, timesteps
        self.scheduler = type("Scheduler", (), {"timesteps": None})()

    def __call__(self, kw):
        self.scheduler.timesteps = torch.tensor(STEPS)
        return generation(self.f, kw, steps=self.timesteps)


@pytest.mark.parametrize("order", [False, 2])
def test_a_rising_timestep_is_learned_from_the_sampler_run(order):
    """Under the default timestep='auto', a pipeline whose timestep rises (1 - sigma: Z-Image,
    Lumina 2) shows it at its second step, within one run of its sampler: from there the
    timestep is read as rising, and what the first step left (outputs an extrapolation of each
    order reads, the trace) is read again as such. Two generations in a row: the outputs and the
    trace of timestep='rising'. The same model called by a falling pipeline next (one state, which
    learned the rise) is read as falling again, its timestep within [0, 1] (Flux's t / 1000) or,
    after a rising one again, past it (Wan's), and its schedule reuses as ever."""
    model, kw = tiny_models.wan(layers=3)
    kw["return_dict"] = False
    rising = tuple(1.0 - t / 1000.0 for t in STEPS)
    unit = tuple(t / 1000.0 for t in STEPS)
    cache = {"rule": "schedule", "step": [2, 3, 5], "cfg": [4], "block": [1], "extrapolate": order}
    told = compiled(model, cache, timestep="rising")
    outs = [Sampler(told, rising)(kw) for _ in range(2)]
    expected = dit_compile.stats(told)
    assert expected["reused"] == {"step": 12, "cfg": 2, "block": 4}

    def actions(trace):
        return [(r["step"], r["branch"], r["action"]) for r in trace]

    torch._dynamo.reset()
    f = compiled(model, cache)
    for steps in (rising, unit, rising, STEPS):
        learned = [Sampler(f, steps)(kw) for _ in range(2)]
        trace = dit_compile.stats(f)["trace"][-len(expected["trace"]):]
        assert actions(trace) == actions(expected["trace"]), steps
        levels = [r["t"] for r in trace if r["branch"] == 0]
        assert levels == pytest.approx([1.0 - t for t in steps] * 2 if steps is rising
                                       else list(steps) * 2), steps
        if steps is rising:
            for a, b in zip(sum(outs, []), sum(learned, [])):
                torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("timestep", ["rising", "auto"])
def test_a_timestep_rising_on_the_thousand_scale_is_read_so(timestep):
    """MochiPipeline (its scheduler inverts the sigmas) passes 1000 (1 - sigma): a timestep that
    rises from 0 to 1000, whose first steps stay below 1 at its default 64. Asked for, or learned
    from the sampler run (on [0, 1] at the second step, moved to [0, 1000] at the third), it is
    read as rising on that scale: the noise level is 1000 - t, and a forced schedule matches the
    eager reference over two generations in a row. (It used to make every call a generation
    under the default, and to be an error under timestep='rising', which the hint advised.)"""
    model, kw = tiny_models.wan(layers=3)
    kw["return_dict"] = False
    steps = (0.0, 0.5, 150.0, 400.0, 700.0, 950.0)
    # First order, and no cfg reuse at step 2: an extrapolation through 0 and 0.5 (a quadratic
    # through 0, 0.5 and 150) to 400 amplifies float32's rounding past the tolerance.
    sched = dict(step=[3, 5], block=[4])
    f = compiled(model, {"rule": "schedule", **sched, "extrapolate": 1},
                 **({"timestep": "rising"} if timestep == "rising" else {}))
    for _ in range(2):
        ours = Sampler(f, steps)(kw)
        ref = Reference(model, **sched, order=1, rising=True).start(steps[0])
        for i, (x, y) in enumerate(zip(ours, generation(ref, kw, steps=steps))):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5, msg=f"call {i}")
    s = dit_compile.stats(f)
    assert s["reused"] == {"step": 8, "block": 4}
    assert [r["t"] for r in s["trace"] if r["branch"] == 0] == pytest.approx(
        [1000.0 - t for t in steps] * 2)


def test_a_call_that_learned_the_rise_and_raised_unlearns_it():
    """A call that raises is placed again at its retry as it was (``abandon``): where it was the
    one that showed the timestep rising, the noise levels it read again as rising are read as
    falling again, and the retry learns the rise anew."""
    state, run = CacheState(), torch.tensor([1000.0, 500.0])
    first = state.begin(0.0, "signature", run=run, timestep=torch.tensor(0.0))
    bc = state.branch(0)
    bc.outputs = [(first.t, [torch.zeros(1)])]
    bc.signals["prev_t"], state.signals["cfg"] = first.t, {1: {"t": first.t}}
    state.record(first, "compute", 1.0)
    kept = state.placement()
    second = state.begin(0.5, "signature", run=run, timestep=torch.tensor(0.5))
    assert (second.generation, second.step, second.t) == (0, 1, 0.5)
    assert (state.t_first, bc.outputs[0][0], bc.signals["prev_t"]) == (1.0, 1.0, 1.0)
    assert state.signals["cfg"][1]["t"] == 1.0 and state.records[0].t == 1.0
    state.abandon(kept, second)         # drops what branch 0 kept and the shared signals
    assert (state.t_first, state.records[0].t) == (0.0, 0.0)
    retry = state.begin(0.5, "signature", run=run, timestep=torch.tensor(0.5))
    assert (retry.generation, retry.step, retry.t) == (0, 1, 0.5)
    assert state.t_first == 1.0 and state.records[0].t == 1.0


def _sharing_all_but(dst, src, own):
    """``dst`` made to share every module and parameter of ``src`` but the module at ``own``."""
    head, _, rest = own.partition(".")
    for name, module in src.named_children():
        if name != head:
            setattr(dst, name, module)
        elif rest:
            _sharing_all_but(getattr(dst, name), module, rest)
    for name, p in src.named_parameters(recurse=False):
        setattr(dst, name, p)


@pytest.mark.parametrize("own", ["blocks", "blocks.1.ffn.net.2"])
def test_models_sharing_a_module_never_take_each_others_cache(own):
    """Two models of one class that share a module (the one whose parameter holds the cache
    state) run one graph on other weights: Wan 2.2-like experts handing over mid-generation.
    The second model's call at a step the schedule reuses once got the first model's output;
    later, where the two differed in one layer only (16 parameters told models apart)."""
    a, kw = tiny_models.wan(layers=3)
    kw["return_dict"] = False
    torch.manual_seed(1)
    b = type(a).from_config(a.config).eval()
    _sharing_all_but(b, a, own)
    apart = [n for (n, p), q in zip(b.named_parameters(), a.parameters()) if p is not q]
    assert apart and all(n.startswith(own + ".") for n in apart)
    cache = {"rule": "schedule", "step": [2, 3]}
    fa, fb = compiled(a, cache), compiled(b, cache)
    x = kw["hidden_states"]
    with torch.no_grad():
        for i, t in enumerate(STEPS[:4]):
            call = dict(kw, hidden_states=x, timestep=torch.full_like(kw["timestep"], t))
            out = (fa if i < 2 else fb)(**call)[0]
            if i == 2:      # b's first call: computed; its second (step 3) reuses its own
                torch.testing.assert_close(out, b(**call)[0], rtol=1e-5, atol=1e-5)
            x = x - 0.05 * out
    assert [r["action"] for r in dit_compile.stats(fb)["trace"]] == ["compute"] * 3 + ["step"]


def test_stats_of_a_cached_model_outlive_its_compile_with_caching_off():
    """A/B against full compute: the model compiled again with cache=None (the baseline) runs
    after the cached one; ``stats`` still reports the cached configuration (the last that
    cached), which dropping the states at that compile once made an error. The baseline's own
    ``stats`` says it caches nothing (it reported the cached compile's state, as its own)."""
    model, kw = tiny_models.wan(layers=3)
    kw["return_dict"] = False
    cached = compiled(model, {"rule": "schedule", "step": [2]})
    generation(cached, kw)
    baseline = compiled(model, None)
    generation(baseline, kw, steps=STEPS[:2])
    assert dit_compile.stats(cached)["reused"] == {"step": 2}
    assert dit_compile.stats(model)["reused"] == {"step": 2}       # the module: the last state
    with pytest.raises(ValueError, match="compiled with cache=None"):
        dit_compile.stats(baseline)



def test_a_wrapper_of_a_model_compiled_in_place_says_its_options_are_not_used():
    """torch.compile's wrapper of a module compiled in place (``model.compile``) runs the
    in-place compile, never its own: a wrapper given cache=None got the in-place compile's
    reuse, with no word of it, and its ``stats`` said it cached nothing. The backend says so
    once per wrapper (not for a wrapper of the same options), and ``stats`` reports the
    compile in effect."""
    model, kw = tiny_models.wan(layers=3)
    kw["return_dict"] = False
    cache = {"rule": "schedule", "step": [2]}
    model.compile(backend="mixcache", options={"regions": "eager", "cache": cache})
    same = torch.compile(model, backend="mixcache", options={"cache": cache, "regions": "eager"})
    off = compiled(model, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        generation(same, kw, steps=STEPS[:1])
        assert not [w for w in caught if "compiled in place" in str(w.message)]
        dit_compile.reset(model)
        generation(off, kw)
        generation(off, kw)
    told = [str(w.message) for w in caught if "compiled in place" in str(w.message)]
    assert len(told) == 1 and "wrapper's options {'regions': 'eager', 'cache': None}" in told[0]
    assert dit_compile.stats(off)["reused"] == {"step": 4}     # two generations, two branches

def _fail_next_forward(monkeypatch) -> list:
    """A list to append to: the next forward the executor runs raises, as an OOM inside it."""
    from dit_compile.runtime.executor import Executor
    fail, run = [], Executor.run

    def failing(self, env, start=0, stop=None):
        if fail:
            fail.pop()
            raise torch.OutOfMemoryError("simulated, inside the forward")
        return run(self, env, start, stop)

    monkeypatch.setattr(Executor, "run", failing)
    return fail


def test_a_retried_first_branch_leaves_the_others_their_difference(monkeypatch):
    """Branch 0's call at a cfg-reuse step raises, and is retried: branch 1 is still rebuilt from
    its difference (the failure once voided every branch's, so branch 1 computed there, silently
    off the schedule), and the generation comes out as one without the failure."""
    model, kw = tiny_models.wan(layers=3)
    kw["return_dict"] = False
    cache = {"rule": "schedule", "cfg": [2]}
    fail, made = _fail_next_forward(monkeypatch), []

    def calls(**call):
        made.append(call)
        if len(made) == 5:      # step 2, branch 0
            fail.append(True)
            with pytest.raises(torch.OutOfMemoryError):
                f(**call)
        return f(**call)

    f = compiled(copy.deepcopy(model), cache)
    failed = generation(calls, kw, steps=STEPS[:4])
    assert len(made) == 8 and not fail, "the failure was not made"
    assert [r["action"] for r in dit_compile.stats(f)["trace"]][4:6] == ["compute", "cfg"]
    clean = generation(compiled(copy.deepcopy(model), cache), kw, steps=STEPS[:4])
    for a, b in zip(failed, clean):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_call_that_raises_is_retried_in_its_place(monkeypatch):
    """A call that raises mid-forward (an OOM, an interrupt) once stayed counted: its retry
    was placed as the step's next branch, so branch 0 kept the last step's outputs, and the next
    scheduled reuse returned those (two steps old). A call that raises is not counted, its
    retry is the call again, and the generation comes out as one without the failure."""
    model, kw = tiny_models.wan(layers=3)
    kw["return_dict"] = False
    f = compiled(model, {"rule": "schedule", "step": [3]})
    fail = _fail_next_forward(monkeypatch)

    def loop():
        x, outs = kw["hidden_states"], []
        with torch.no_grad():
            for i, t in enumerate(STEPS[:5]):
                call = dict(kw, hidden_states=x, timestep=torch.full_like(kw["timestep"], t))
                if i == 2:
                    fail.append(True)
                    with pytest.raises(torch.OutOfMemoryError):
                        f(**call)
                outs.append(f(**call)[0])
                x = x - 0.05 * outs[-1]
        return outs

    failed = loop()
    trace = [(r["step"], r["branch"], r["action"]) for r in dit_compile.stats(f)["trace"]]
    assert trace == [(0, 0, "compute"), (1, 0, "compute"), (2, 0, "compute"), (3, 0, "step"),
                     (4, 0, "compute")]
    dit_compile.reset(f)
    x, clean = kw["hidden_states"], []
    with torch.no_grad():
        for t in STEPS[:5]:
            clean.append(f(**dict(kw, hidden_states=x, timestep=torch.full_like(kw["timestep"], t)))[0])
            x = x - 0.05 * clean[-1]
    for a, b in zip(failed, clean):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_run_that_goes_on_below_a_one_step_generation_is_its_next_step():
    """Wan 2.2's low-noise expert: one step in a run, then a new run that starts above it
    and takes two. Its second call is that run's next step, although the rule for a row of
    one-step generations with no sampler to ask (a rising timestep not declared) would take
    it for another generation's first."""
    from dit_compile.runtime.cache import CacheState
    state, first, second = CacheState(), torch.tensor([0.9, 0.2]), torch.tensor([0.9, 0.4, 0.1])
    state.begin(0.2, "signature", run=first)
    assert state.begin(0.4, "signature", run=second).generation == 1
    step = state.begin(0.1, "signature", run=second)
    assert (step.generation, step.step) == (1, 1)
    # Without a sampler, the same calls after a rise are read as the next generation's first.
    state = CacheState()
    for t in (0.2, 0.4, 0.1):
        step = state.begin(t, "signature")
    assert (step.generation, step.step) == (2, 0)


def test_a_run_that_repeats_its_first_timestep_on_a_new_latent_is_one_generation():
    """UniPC on flow sigmas at a large shift rounds its first two timesteps alike (999, 999, 997
    over 85 steps): the second call, on the updated latent, is the run's second step. It was taken
    for a new generation, so a forced schedule applied a step late and warned it never applied."""
    from dit_compile.runtime.cache import CacheState
    run, a, b = torch.tensor([999.0, 999.0, 997.0]), torch.zeros(2), torch.ones(2)
    state = CacheState()
    steps = [state.begin(t, "signature", latent=x, run=run)
             for t, x in ((999.0, a), (999.0, a), (999.0, b), (999.0, b), (997.0, a))]
    assert [(s.generation, s.step, s.branch) for s in steps] == [
        (0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1), (0, 2, 0)]
    # With no sampler to ask, the same latent change at the first step is the next one-step
    # generation's call, as before.
    state = CacheState()
    steps = [state.begin(t, "signature", latent=x) for t, x in ((999.0, a), (999.0, b))]
    assert [s.generation for s in steps] == [0, 1]


def test_guidance_cut_off_goes_on_with_the_generation_under_every_policy():
    """A batched-CFG call (equal latent halves), then half the batch at a lower timestep:
    guidance turned off for the last steps (SD3CFGCutoffCallback), the same generation, steps
    counted on, nothing cached before kept. Seen by a state told nothing of halves (a policy
    that does not look for them), as by one that was. Halves that differ (two prompts, two
    noises) halved are not that: a new generation."""
    from dit_compile.runtime.cache import CacheState
    x = torch.randn(1, 4, 2, 8, 8)
    for told in (False, True):
        state = CacheState()
        state.begin(900.0, "batch 2", halves=told, latent=torch.cat([x, x]))
        state.branch(0).outputs.append((900.0, [x]))
        step = state.begin(750.0, "batch 1", latent=x)
        assert (step.generation, step.step) == (0, 1)
        assert not state.branch(0).outputs, "what was cached under guidance is dropped"
    state = CacheState()
    state.begin(900.0, "batch 2", latent=torch.cat([x, -x]))
    assert state.begin(750.0, "batch 1", latent=x).generation == 1
    # Batched guidance of two prompts, then of one (a callback dropped a sample: [n0, n1, p0, p1]
    # to [n0, p0]): still guidance, a new layout. It was taken for guidance ended, and the steps
    # left ran without cfg reuse (all computed, 0.77 off the reference).
    y = torch.randn(1, 4, 2, 8, 8)
    state = CacheState()
    state.begin(900.0, "batch 4", halves=True, latent=torch.cat([x, y, x, y]))
    step = state.begin(750.0, "batch 2", halves=True, latent=torch.cat([x, x]))
    assert (step.generation, step.halves) == (1, True)


def test_a_copy_or_a_saved_model_carries_no_cache_state():
    """The cache state is the runtime's, not the model's: ``torch.save(model)`` after a cached
    generation works (the states are keyed by thread, and a thread does not pickle), and neither
    the loaded model nor a deep copy brings any state along."""
    import copy
    import io
    from dit_compile.runtime.cache import model_states
    model, kw = tiny_models.wan(layers=3)
    kw["return_dict"] = False
    generation(compiled(model, {"rule": "schedule", "step": [1]}), kw, steps=STEPS[:2])
    assert len(model_states(model)) == 1 and dit_compile.stats(model)["cached_bytes"] > 0
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert model_states(loaded) == [] and model_states(copy.deepcopy(model)) == []
    assert len(model_states(model)) == 1


def test_model_compiled_again_with_other_options_gets_a_fresh_state():
    """Compiling the same model again with another cache configuration (as a benchmark does from
    one method to the next) starts from a fresh state: no counters, no cache, and the new
    configuration's settings (under CUDA graphs, copies of what it caches)."""
    from dit_compile.runtime.cache import find_state
    model, kw = tiny_models.wan(layers=3)
    kw["return_dict"] = False
    generation(compiled(model, {"rule": "schedule", "step": [1, 2, 3]}), kw, steps=STEPS[:4])
    first = find_state(model)
    assert first.stats()["flops_fraction"] == pytest.approx(0.25) and not first.clone
    torch._dynamo.reset()
    f = torch.compile(model, backend="mixcache",
                      options={"regions": "eager", "cache": {"rule": "schedule", "step": [2]},
                               "mode": "reduce-overhead"})
    generation(f, kw, steps=STEPS[:4])
    s = dit_compile.stats(f)
    assert s["calls"] == 8 and s["flops_fraction"] == pytest.approx(0.75)
    assert find_state(model) is not first and find_state(model).clone


@pytest.mark.parametrize("order", [0, 1])
def test_a_caller_writing_into_what_it_was_returned_changes_nothing_reused(order):
    """What a call returns is the caller's: a sampler may reuse the buffer once it has stepped.
    The runtime cached the very tensors it returned (and an order-0 step reuse returned the
    cached ones), so zeroing an output changed every later reuse of it."""
    model, kw = tiny_models.wan(layers=2)
    kw["return_dict"] = False
    cache = {"rule": "schedule", "step": [2, 3], "cfg": [4], "extrapolate": order}

    def scribbled(**call):
        y = f(**call)[0]
        kept = y.clone()
        y.zero_()
        return kept

    f = compiled(copy.deepcopy(model), cache)
    untouched = generation(f, kw, steps=STEPS[:5])
    f = compiled(copy.deepcopy(model), cache)
    for a, b in zip(generation(scribbled, kw, steps=STEPS[:5]), untouched):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("span", [None, [1, 5]])
def test_a_branch_with_a_block_skipped_keeps_the_generation(span):
    """diffusers' skip-layer guidance hooks a block away for one extra branch of some steps, then
    removes the hook: Dynamo traces that branch into a graph with one block fewer, so a default
    span resolves to another end there. The model's graphs still share one state (it used to be
    replaced at each switch, restarting the generation mid-way and the forced schedule's step
    count with it), and the other branches run the schedule where their own graph held. A span
    given for the whole model, which that graph's blocks do not hold, runs the branch uncached
    with a warning (it raised mid-generation, naming the smaller graph's count as the model's)."""
    import zoo_video
    from diffusers.hooks import HookRegistry, LayerSkipConfig
    from diffusers.hooks.layer_skip import _apply_layer_skip_hook
    from dit_compile.runtime.cache import find_state
    model, kw = zoo_video.motif_video()
    # In place, as the guider's hooks find the blocks by their names in the model.
    cache = {"rule": "schedule", "block": [3]} | ({"span": span} if span else {})
    model.compile(backend="mixcache", options={"regions": "eager", "cache": cache})
    uncond = torch.randn_like(kw["encoder_hidden_states"])
    states = []
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i, t in enumerate(STEPS[:4]):
            call = dict(kw, timestep=torch.full((1,), t), return_dict=False)
            model(**call)
            model(**dict(call, encoder_hidden_states=uncond))
            if i == 1:
                _apply_layer_skip_hook(model, LayerSkipConfig(indices=[1],
                                                              fqn="single_transformer_blocks"),
                                       name="skip")
                model(**call)
                HookRegistry.check_if_exists_or_initialize(model).remove_hook("skip", recurse=True)
            states.append(find_state(model))
    assert all(s is states[0] for s in states)
    trace = [(r["generation"], r["step"], r["branch"], r["action"])
             for r in dit_compile.stats(model)["trace"]]
    # Step 2 computes: the hook's removal leaves the blocks' forward in their __dict__, which
    # Dynamo's guards on the first graph reject, so branches 0 and 1 run a new graph from there.
    skipped = [] if span else [(0, 1, 2, "compute")]    # uncached: not counted
    assert trace == [(0, 0, 0, "compute"), (0, 0, 1, "compute"), (0, 1, 0, "compute"),
                     (0, 1, 1, "compute"), *skipped, (0, 2, 0, "compute"),
                     (0, 2, 1, "compute"), (0, 3, 0, "block"), (0, 3, 1, "block")]
    said = [str(w.message) for w in caught if "a call that skips some" in str(w.message)]
    assert len(said) == (1 if span else 0)


def test_states_on_several_parameters_the_last_used_is_the_models_and_reset_drops_all():
    """Graphs of one model can anchor their states on different parameters (traced in another
    order). ``stats`` then reads the state used last, and ``reset`` drops every one of them, so
    no graph of the model reuses anything after it."""
    from dit_compile.runtime.cache import StateFactory, find_state
    model, kw = tiny_models.wan(layers=3)
    kw["return_dict"] = False
    f = compiled(model, {"rule": "schedule", "step": [1]})
    generation(f, kw, steps=STEPS[:2])
    mine = find_state(model)
    params = [p for p in model.parameters() if getattr(p, "_dit_compile_state", None) is None]
    other = StateFactory(None, False, key=mine.key)(params[-1])
    assert find_state(model) is mine        # the other one has not been used yet
    other.begin(900.0, "sig")
    assert find_state(model) is other
    generation(f, kw, steps=STEPS[:1])
    assert find_state(model) is mine and dit_compile.stats(f)["calls"] == 6
    other.current[0] = [torch.ones(1)]
    dit_compile.reset(f)
    assert mine.stats()["calls"] == 0 and not mine.branches and not other.current


def _settling_and_moving(batch_kw):
    """Latents per step for a batch of two: sample 0's holds still (its probe settles), sample 1's
    is redrawn at every step (its probe keeps moving), so a First-Block-Cache decision splits."""
    g = torch.Generator().manual_seed(0)
    x = batch_kw["hidden_states"]
    return [torch.cat([x[:1], torch.randn(x[1:].shape, generator=g)]) for _ in STEPS]


def _run(f, kw, latents):
    with torch.no_grad():
        return [f(**dict(kw, hidden_states=x, timestep=torch.full_like(kw["timestep"], t)))[0]
                for x, t in zip(latents, STEPS)]


def test_block_decisions_are_per_sample_unless_asked_for_one_per_batch():
    """A batch of two gives each sample what it gets alone under First-Block-Cache, at steps
    where one sample reuses the span and the other computes it (per_sample, the default).
    ``per_sample=False``: where the samples disagree, the batch computes the span for both
    (plain eager, no reuse at that step); where they agree, it reuses for both."""
    model, kw = tiny_models.wan(layers=4, batch=2)
    kw["return_dict"] = False
    latents = _settling_and_moving(kw)
    cache = {"rule": "first_block", "threshold": 0.35}
    f = compiled(model, cache)
    both = _run(f, kw, latents)
    split = {r["step"] for r in dit_compile.stats(f)["trace"]
             if r["action"] == "block" and r["flops"] == 1.0}
    assert split, "the premise: the two samples disagree at some step"
    torch._dynamo.reset()
    g = compiled(tiny_models.wan(layers=4)[0], cache)
    alone = []
    for i in range(2):
        dit_compile.reset(g)
        one = {k: (v[i:i + 1] if torch.is_tensor(v) else v) for k, v in kw.items()}
        alone.append(_run(g, one, [x[i:i + 1] for x in latents]))
    for k, y in enumerate(both):
        torch.testing.assert_close(y, torch.cat([alone[0][k], alone[1][k]]), rtol=1e-5, atol=1e-5)

    torch._dynamo.reset()
    f = compiled(model, {**cache, "per_sample": False})
    outs = _run(f, kw, latents)
    joint = {r["step"]: r for r in dit_compile.stats(f)["trace"]}
    assert all(joint[s]["action"] == "compute" for s in split)
    assert all(r["flops"] < 1.0 for r in joint.values() if r["action"] == "block")
    with torch.no_grad():
        for step in split:
            eager = model(**dict(kw, hidden_states=latents[step],
                                 timestep=torch.full_like(kw["timestep"], STEPS[step])))[0]
            torch.testing.assert_close(outs[step], eager, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("span", [(1, 3), (1, 4)])
def test_dual_stream_blocks_of_one_shape_reuse_each_stream_own_residual(span):
    """Image and text streams of one shape (3 tokens each): the span's outputs are rebuilt from
    their own streams, as the eager reference does (the span ending mid-stack leaves both streams
    to the blocks after it)."""
    spec = random_dits.Spec(dim=8, depths=(4,), cross_attn=True, adaln=True, gated=True,
                            two_streams=True, extra_input=False, batch=1, tokens=3)
    model, kw = random_dits.build(spec)
    sched = dict(block=[2, 3, 5])
    ours = generation(compiled(model, {"rule": "schedule", **sched, "span": list(span)}), kw,
                      branches=1)
    ref = Reference(model, **sched, span=span).start(STEPS[0])
    for x, y in zip(ours, generation(ref, kw, branches=1)):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


class _Altered(torch.nn.Linear):
    """A LoRA at its initialisation: the same numbers, another graph for its block."""

    def forward(self, x):
        return super().forward(x) * 1.0


@pytest.mark.parametrize("text_len,altered", [(6, False), (16, False), (16, True)])
def test_flux_block_reuse_pairs_each_stream_with_itself(text_len, altered):
    """Flux's blocks carry the text and the image tokens; at equal lengths (16 and 16 here, as at
    256x256 with 256 text tokens) the two have one shape, and the image stream leaving the span
    must still be rebuilt from the image stream entering it. Eager reference: hooks on the
    model's own first and last span blocks (diffusers' Flux blocks return (text, image)).
    ``altered``: one block computes what its neighbours do not (a LoRA on its projection), so
    its streams are told apart by its own graph; they were told apart by shape, and swapped."""
    model, kw = tiny_models.flux()
    if altered:
        q = model.transformer_blocks[1].attn.to_q
        model.transformer_blocks[1].attn.to_q = _Altered(q.in_features, q.out_features)
        model.transformer_blocks[1].attn.to_q.load_state_dict(q.state_dict())
    kw = dict(kw, encoder_hidden_states=torch.randn(1, text_len, 32),
              txt_ids=torch.randn(text_len, 3), return_dict=False)
    f = compiled(model, {"rule": "schedule", "block": [1, 2], "span": [1, 4]})
    ref, _ = tiny_models.flux()
    seen: dict = {}

    def enter(mod, args, out):
        seen["in"] = out[1]

    def leave(mod, args, out):
        if seen.get("reuse"):
            return (out[0], seen["in"] + seen["res"])
        seen["res"] = out[1] - seen["in"]
    ref.transformer_blocks[0].register_forward_hook(enter)
    ref.single_transformer_blocks[-1].register_forward_hook(leave)
    x = kw["hidden_states"]
    with torch.no_grad():
        for step, t in enumerate((0.9, 0.7, 0.5)):
            x = x + 0.3 * torch.randn_like(x)
            call = dict(kw, hidden_states=x, timestep=torch.tensor([t]))
            seen["reuse"] = step in (1, 2)
            torch.testing.assert_close(f(**call)[0], ref(**call)[0], rtol=1e-5, atol=1e-5)
    assert [r["action"] for r in dit_compile.stats(f)["trace"]] == ["compute", "block", "block"]


@pytest.mark.parametrize("cache", [
    {"rule": "first_block", "threshold": 0.05, "max_reuse": 1},
    {"rule": "mixcache", "budget": 10.0, "warmup": 0.0, "settle": 3.0, "max_reuse": 1,
     "granularities": ["block"]}])
def test_consecutive_reuse_is_bounded_per_sample(cache):
    """Sample 0's latent holds still and may reuse the span at every step; sample 1's jumps and
    computes. Sample 0 still reuses at most ``max_reuse`` times in a row, as it does alone (a
    call where only some samples reuse is not a full compute for the others)."""
    model, kw = tiny_models.wan(layers=4, batch=2)
    kw["return_dict"] = False
    g = torch.Generator().manual_seed(1)
    steps = tuple(float(t) for t in range(1000, 0, -100))
    f = compiled(model, cache)
    both = []
    with torch.no_grad():
        for t in steps:
            x = kw["hidden_states"].clone()
            x[1] = 3 * torch.randn(x[1].shape, generator=g)
            both.append(f(**dict(kw, hidden_states=x, timestep=torch.full((2,), t)))[0])
    torch._dynamo.reset()
    one = {k: (v[:1] if torch.is_tensor(v) else v) for k, v in kw.items()}
    alone = generation(compiled(tiny_models.wan(layers=4)[0], cache), one, steps=steps, branches=1)
    assert [r["action"] for r in dit_compile.stats(f)["trace"]].count("block") >= 3
    for y, a in zip(both, alone):
        torch.testing.assert_close(y[:1], a, rtol=1e-5, atol=1e-5)


def test_three_guidance_branches_each_rebuilt_from_its_own_difference():
    model, kw = tiny_models.wan(layers=3)
    kw["return_dict"] = False
    sched = dict(cfg=[1, 2, 4])
    ours = generation(compiled(model, {"rule": "schedule", **sched}), kw, branches=3)
    theirs = generation(Reference(model, **sched).start(STEPS[0]), kw, branches=3)
    for i, (x, y) in enumerate(zip(ours, theirs)):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5, msg=f"call {i}")


class InPlaceBlock(torch.nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.lin, self.ada = torch.nn.Linear(d, d), torch.nn.Linear(d, d)

    def forward(self, x, t):
        x += torch.tanh(self.lin(x)) * self.ada(t)[:, None]
        return x


class InPlaceNet(torch.nn.Module):
    """Blocks that add to the residual stream in place: a block's output is its input tensor."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.proj, self.t, self.out = torch.nn.Linear(d, d), torch.nn.Linear(2, d), torch.nn.Linear(d, d)
        self.blocks = torch.nn.ModuleList(InPlaceBlock(d) for _ in range(4))

    def forward(self, hidden_states, timestep, encoder_hidden_states):
        t = self.t(torch.stack([torch.sin(timestep / 100), torch.cos(timestep / 100)], -1))
        x = self.proj(hidden_states) + encoder_hidden_states.mean(1, keepdim=True)
        for b in self.blocks:
            x = b(x, t)
        return (self.out(x),)


def test_blocks_writing_their_stream_in_place_keep_the_rule():
    """The stream read before the probe and the span is the value before the blocks wrote into
    it: the probe's residual is not 0 and the span's cached residual is the real one."""
    torch.manual_seed(0)
    model = InPlaceNet().eval()
    kw = dict(hidden_states=torch.randn(1, 8, 16), timestep=torch.tensor([500.0]),
              encoder_hidden_states=torch.randn(1, 3, 16))
    sched = dict(block=[2, 4])
    ours = generation(compiled(model, {"rule": "schedule", **sched}), kw, branches=1)
    ref = Reference(model, **sched).start(STEPS[0])
    for x, y in zip(ours, generation(ref, kw, branches=1)):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
    f = compiled(InPlaceNet().eval(), {"rule": "first_block", "threshold": 0.05})
    generation(f, kw, branches=1)
    assert all(r["signal"] is None or r["signal"] > 0.05 for r in dit_compile.stats(f)["trace"])


def test_memory_bound_is_a_clear_error():
    model, kw = tiny_models.wan(layers=3)
    kw["return_dict"] = False
    f = compiled(model, {"rule": "schedule", "step": [1]}, cache_memory=64)
    with pytest.raises(dit_compile.CacheMemoryError, match=r"cache_memory=64"):
        generation(f, kw, steps=STEPS[:2])
    # The call that raised is not counted and keeps nothing over the bound (each retry once
    # piled more on, counted as the step's next branch, until a generation began unsaid).
    stats = dit_compile.stats(f)
    assert stats["calls"] == 0 and stats["cached_bytes"] <= 64


def test_a_cache_of_exactly_the_memory_bound_fits():
    """``cache_memory`` is a bound the cache may reach: only exceeding it raises. A generation
    whose cache comes to exactly the bound runs (it raised at the bound) and one byte less does
    not."""
    cache = {"rule": "schedule", "step": [1]}
    model, kw = tiny_models.wan(layers=3)
    kw["return_dict"] = False
    f = compiled(model, cache)
    generation(f, kw, steps=STEPS[:2])
    need = dit_compile.stats(f)["cached_bytes"]
    assert need > 0
    torch._dynamo.reset()
    f = compiled(tiny_models.wan(layers=3)[0], cache, cache_memory=need)
    generation(f, kw, steps=STEPS[:2])
    assert dit_compile.stats(f)["cached_bytes"] == need
    torch._dynamo.reset()
    f = compiled(tiny_models.wan(layers=3)[0], cache, cache_memory=need - 1)
    with pytest.raises(dit_compile.CacheMemoryError, match=f"cache_memory={need - 1}"):
        generation(f, kw, steps=STEPS[:2])


def test_copies_kept_under_inference_mode_count_against_the_bound():
    """An inference tensor has no version counter, so the text a branch is compared with is kept
    as a copy: 2 branches x 512 tokens x 16 floats, 64 KiB that cached_bytes (and cache_memory)
    left out."""
    model, kw = tiny_models.wan(layers=2)
    kw.update(encoder_hidden_states=torch.randn(1, 512, 16), return_dict=False)
    f = compiled(model, {"rule": "schedule", "step": [1]})
    with torch.inference_mode():
        generation(f, kw, steps=STEPS[:2])
    assert dit_compile.stats(f)["cached_bytes"] >= 2 * 512 * 16 * 4


@pytest.mark.parametrize("cache,match", [
    ({"rule": "schedule", "block": [2], "span": [1, 9]}, r"span=\[1, 9\].*has 3 blocks"),
    ({"rule": "schedule", "block": [2], "probe": 3}, r"probe=3"),
    ({"rule": "schedule", "block": [2], "probe": 2, "span": [1, 3]},
     r"span=\[1, 3\]: must satisfy probe \(2\) <= start"),     # the probe's blocks always run
])
def test_bad_cache_options(cache, match):
    """What waits for the blocks to be counted: said at the first call, through torch.compile."""
    model, kw = tiny_models.wan(layers=3)
    with pytest.raises(Exception, match=match):
        compiled(model, cache)(**kw, return_dict=False)


@pytest.mark.parametrize("cache,match", [
    ({"rule": "schedule", "step": [0]}, "step 0 cannot reuse"),
    ({"rule": "first_block", "threshold": -0.1}, r"threshold=-0.1"),
    ({"rule": "teacache", "threshold": 0}, r"threshold=0: must be a number in \(0, 10\]"),
    ({"rule": "fastercache", "every": 1}, r"every=1"),
    ({"rule": "magic"}, r"cache rule 'magic'"),
    ({"rule": "schedule", "step": [2], "extrapolate": 3}, r"extrapolate=3: must be"),
    ({"rule": "mixcache", "extrapolate": "yes"}, r"extrapolate='yes': must be"),
    ({"rule": "teacache", "threshold": 0.1, "treshold": 1}, r"unknown key\(s\) \['treshold'\]"),
    ({"rule": "teacache", "threshold": 0.1, "signal": "latent"}, r"signal='latent': must be 'modulated'"),
    ({"rule": "teacache", "threshold": 0.1, "coefficients": [1, float("nan")]}, r"coefficients=.*finite"),
    ({"rule": "teacache", "threshold": 0.1, "coefficients": 2.0}, r"coefficients=2.0: must be a list"),
    ({"rule": "teacache", "threshold": 0.1, "coefficients": [1.0], "signal": "output"},
     r"signal 'output' \(EasyCache\) is already"),
    # A list of rules used to merge by overwriting: the second schedule dropped the first's steps,
    # the last rule's start applied to every rule, and nothing said so.
    ([{"rule": "schedule", "step": [1, 2]}, {"rule": "schedule", "cfg": [3]}],
     r"'schedule' given twice"),
    ([{"rule": "first_block", "threshold": 0.1, "start": 4},
      {"rule": "schedule", "step": [2], "start": 0}], r"'start' is given twice, 4 and 0"),
    # Booleans are ints to Python; none of these is a number or a switch the user meant.
    ({"rule": "schedule", "block": [1], "probe": True}, r"probe=True"),
    ({"rule": "schedule", "block": [1], "span": [1, 2, 3]},
     r"span=\[1, 2, 3\]: must be \[start, end\]"),
    ({"rule": "schedule", "block": [1], "span": 5}, r"span=5: must be \[start, end\]"),
    ({"rule": "schedule", "step": [1], "max_reuse": True}, r"max_reuse=True"),
    ({"rule": "schedule", "step": [1], "per_sample": "yes"}, r"per_sample='yes': must be true"),
    ({"rule": "first_block", "threshold": 0.1, "start": -3}, r"start=-3: must be a step index"),
    ({"rule": "mixcache", "granularities": "step"}, r"granularities='step': a non-empty list"),
    # A residual step reuse extrapolated nothing, whatever the order asked.
    ({"rule": "schedule", "step": [2], "step_mode": "residual", "extrapolate": 1},
     r"extrapolate=1 with step_mode='residual'"),
])
def test_bad_cache_options_before_any_trace(cache, match):
    """Said by Options.parse, before the model is seen (test_backend's bad options go through
    torch.compile)."""
    with pytest.raises(PolicyError, match=match):
        make_policy(cache, None)


def test_a_list_of_rules_adds_them_up():
    policy = make_policy([{"rule": "schedule", "step": [1, 2], "start": 2},
                          {"rule": "fastercache", "every": 2, "start": 2}], 4)
    assert (policy.step_steps, policy.cfg_every, policy.start) == ({1, 2}, 2, 2)


@pytest.mark.parametrize("cache,match", [
    ({"rule": "schedule", "step": [2], "start": 1}, r"start=1 sets the threshold rules' first"),
    ({"rule": "schedule", "step": [2], "span": [1, 2]}, r"span=\[1, 2\] sets the blocks block"),
    ({"rule": "first_block", "threshold": 0.1, "extrapolate": 1}, r"extrapolate=1 sets how a"),
    ({"rule": "mixcache", "probe": 2}, r"mixcache: probe=2 sets block reuse's probe"),
])
def test_a_key_no_rule_given_reads_is_said_to_do_nothing(cache, match):
    """Taken silently, it left the user believing it did something. Its default value says
    nothing, and neither does the key where a rule that reads it is asked for."""
    with pytest.warns(UserWarning, match=match):
        make_policy(cache, None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make_policy({"rule": "schedule", "step": [2], "start": 0, "span": [None, None]}, None)
        make_policy({"rule": "first_block", "threshold": 0.1, "start": 1, "probe": 2}, None)


def test_numpy_values_are_taken_as_the_python_ones():
    """Steps from ``np.arange``, a float32 threshold, one span as an array and as a tuple: once
    refused, or a raw "truth value of an array is ambiguous"."""
    policy = make_policy([{"rule": "schedule", "step": list(np.arange(1, 3)), "block": [1],
                           "span": np.array([1, 3]), "max_reuse": np.int64(2)},
                          {"rule": "first_block", "threshold": np.float32(0.5), "span": (1, 3)}],
                         4)
    assert (policy.step_steps, policy.span, policy.first_block, policy.max_reuse) == (
        {1, 2}, (1, 3), 0.5, 2)
    # A set of NumPy integers, and the options' own flags as NumPy booleans.
    assert make_policy({"rule": "schedule", "step": set(np.arange(1, 3))}, 4).step_steps == {1, 2}
    opts = dit_compile.Options.parse({"share_blocks": np.False_, "lower_moe": np.True_})
    assert (opts.share_blocks, opts.lower_moe) == (False, True)


@pytest.mark.parametrize("cache", [{"rule": "schedule", "block": [1], "probe": 2},
                                   {"rule": "first_block", "threshold": 0.1, "probe": 2},
                                   {"rule": "mixcache", "probe": 2, "granularities": ["block"]}])
def test_span_starts_after_the_probe_unless_given(cache):
    """``span`` defaults to ``[probe, n_blocks)`` whatever the probe (a probe of 2 alone used to be
    refused: the default span started at block 1)."""
    assert make_policy(cache, 5).span == (2, 5)
    assert make_policy(dict(cache, span=[3, 4]), 5).span == (3, 4)


def test_wan_pipeline_with_cache_two_generations():
    import sys, os
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
    import pipelines
    model, _ = tiny_models.wan(layers=3)
    pipe = pipelines.wan_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    ref = pipelines.run_wan(pipe, steps=4)
    pipe.transformer = compiled(model, {"rule": "schedule", "cfg": [1, 2, 3]})
    first = pipelines.run_wan(pipe, steps=4)
    assert first.shape == ref.shape and not torch.equal(first, ref)     # reuse changed something
    # The second generation starts from nothing cached: the same seed gives the same video.
    torch.testing.assert_close(pipelines.run_wan(pipe, steps=4), first, rtol=0, atol=0)
    trace = dit_compile.stats(pipe.transformer)["trace"]
    assert len(trace) == 16
    assert [r["branch"] for r in trace[:4]] == [0, 1, 0, 1]
    assert {r["generation"] for r in trace} == {0, 1}
    assert [r["action"] for r in trace if r["branch"] == 1 and r["step"] > 0] == ["cfg"] * 6


@pytest.mark.parametrize("threshold", [0.2, 0.5])
def test_first_block_rule_reproduces_diffusers_first_block_cache(threshold):
    """The first_block rule over mixcache's guard points gives what diffusers' own hook gives."""
    import os, sys
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
    import pipelines
    from diffusers.hooks import FirstBlockCacheConfig
    model, _ = tiny_models.wan(layers=4)
    pipe = pipelines.wan_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    model.enable_cache(FirstBlockCacheConfig(threshold=threshold))
    ref = pipelines.run_wan(pipe, steps=8)
    model.disable_cache()
    pipe.transformer = compiled(model, {"rule": "first_block", "threshold": threshold,
                                        "per_sample": False})
    out = pipelines.run_wan(pipe, steps=8)
    assert dit_compile.stats(pipe.transformer)["reused"].get("block", 0) > 0
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.inductor
def test_reuse_through_inductor_equals_it_on_the_eager_regions():
    """Every reuse path with the regions compiled by Inductor, against the same rule on the FX
    regions as they are, which take any layout. Inductor's regions take the strides they were
    traced with, and HunyuanVideo's streams are not laid out alike: they enter its blocks
    contiguous and leave them as transposed views, its image tokens a slice of the joint sequence
    (a batch stride past their own size). A reused span's output (input plus cached residual,
    all samples or some) must enter the next region laid out as a computed one: before, it took
    a layout of its own and the region refused it.

    The span ends at the first single-stream block, whose image tokens (a slice of its joint
    sequence) and text tokens enter the next block's Inductor graph: the same layouts the
    epilogue takes after a span to the end, under ``regions="blocks"``, which leaves the prologue
    (half the Inductor time) to run as it is."""
    model, kw = tiny_models.hunyuan(batch=2)
    kw["return_dict"] = False
    kw["encoder_hidden_states"] = kw["encoder_hidden_states"] * torch.tensor([1.0, 10.0])[:, None, None]
    span = [1, 3]       # transformer_blocks.1, single_transformer_blocks.0
    caches = {"schedule": {"rule": "schedule", "block": [1, 2], "step": [3], "cfg": [4], "span": span},
              "per sample": {"rule": "first_block", "threshold": 0.3, "span": span}}
    for name, cache in caches.items():
        outs, trace = {}, {}
        for regions in ("eager", "blocks"):
            torch._dynamo.reset()
            f = torch.compile(model, backend="mixcache", options={"regions": regions, "cache": cache})
            outs[regions] = generation(f, kw, steps=tuple(range(900, 0, -100)))
            trace[regions] = [(r["action"], r.get("reused"))
                              for r in dit_compile.stats(f)["trace"][-len(outs[regions]):]]
        assert trace["blocks"] == trace["eager"], name
        actions = {a for a, _ in trace["blocks"]}
        # The premise: every reuse path ran (some samples only, in the per-sample case).
        assert ({"block", "step", "cfg"} <= actions if name == "schedule" else
                any(m is not None for a, m in trace["blocks"] if a == "block")), trace
        for a, b in zip(outs["blocks"], outs["eager"]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.inductor
def test_reduce_overhead_keeps_copies_of_what_it_returns():
    """CUDA graphs overwrite a graph's outputs on the next replay, so a cache holding the returned
    tensors would reuse whatever the replay wrote (a known failure of hook-based caches). Under
    mode="reduce-overhead" the runtime caches copies: a caller that overwrites every returned
    output in place, as a replay would, must get the same generation as one that does not."""
    steps = tuple(float(t) for t in range(1000, 0, -50))
    model, kw = tiny_models.wan(layers=3)
    kw["return_dict"] = False
    f = torch.compile(model, backend="mixcache", mode="reduce-overhead")
    g = torch.compile(tiny_models.wan(layers=3)[0], backend="mixcache",
                      options={"mode": "reduce-overhead", "cache": "balanced"})

    def run(f, overwrite):
        def call(**k):
            y = f(**k)
            kept = y[0].clone()
            if overwrite:
                y[0].fill_(1e4)          # what the next replay would leave in the buffer
            return (kept,)
        outs = generation(call, kw, steps=steps)
        return outs, [r["action"] for r in dit_compile.stats(f)["trace"][-len(outs):]]

    with torch.no_grad():
        clean, actions = run(f, overwrite=False)
        dirty, _ = run(f, overwrite=True)
        # The same, with the mode given as an option beside others (torch.compile refuses both);
        # compiled afresh, so it cannot borrow the first model's graph.
        torch._dynamo.reset()
        dirty_too, _ = run(g, overwrite=True)
    assert "step" in actions, "the default policy must reuse for this test to mean anything"
    for a, b, c in zip(clean, dirty, dirty_too):
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(a, c)


def _replaying(fn):
    """``fn`` as a CUDA graph runs it: its outputs are written into buffers of its own, which its
    next call (the same piece at the next forward) overwrites."""
    buffers = []

    def run(*args):
        leaves, spec = torch.utils._pytree.tree_flatten(fn(*args))
        if not buffers:
            buffers.extend(torch.empty_like(x) if torch.is_tensor(x) else None for x in leaves)
        for b, x in zip(buffers, leaves):
            if b is not None:
                b.copy_(x)
        return torch.utils._pytree.tree_unflatten(
            [x if b is None else b for b, x in zip(buffers, leaves)], spec)
    return run


@pytest.mark.parametrize("mode", ["reduce-overhead", None])
def test_replayed_piece_outputs_never_reach_the_cache(monkeypatch, mode):
    """Every piece's outputs overwritten by its next call, as CUDA graph replays do, under a forced
    schedule reusing steps, guidance branches and block spans: the generation is the one without
    replays, under mode="reduce-overhead" and without it (the cache keeps copies of the outputs
    it returns; it once held the buffers themselves, which the same replays changed). What the
    caller keeps without a copy is overwritten: the simulation replays."""
    real = backend.compile_pieces
    monkeypatch.setattr(backend, "compile_pieces",
                        lambda *a, **k: [_replaying(fn) for fn in real(*a, **k)])
    model, kw = tiny_models.wan(layers=4)
    kw["return_dict"] = False
    cache = {"rule": "schedule", "step": [2, 5], "cfg": [1, 3], "block": [3, 4], "span": [1, 4],
             "extrapolate": 1}
    f = compiled(model, cache, mode=mode)
    held = []

    def call(**k):      # the caller keeps copies, as it must of what a CUDA graph returns
        y = f(**k)
        held.append(y[0])
        return tuple(v.clone() for v in y)

    replayed = generation(call, kw)
    assert not all(torch.equal(a, b) for a, b in zip(held, replayed)), "nothing was replayed"
    monkeypatch.setattr(backend, "compile_pieces", real)
    torch._dynamo.reset()
    plain = generation(compiled(tiny_models.wan(layers=4)[0], cache), kw)
    for a, b in zip(replayed, plain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_cuda_graph_replays_do_not_reach_the_cache():
    """The same under real CUDA graphs: on a GPU, mode="reduce-overhead" records each compiled
    piece as a graph whose replays write into the same output buffers. Every granularity reuses
    something here, so a cache holding a buffer a later replay rewrites (a step output, a branch
    difference, a span residual) shows up as a difference from the same schedule run eagerly."""
    model, kw = tiny_models.wan(layers=4)
    model = model.cuda()
    kw = {k: v.cuda() for k, v in kw.items()}
    kw["return_dict"] = False
    sched = {"rule": "schedule", "step": [2, 5], "cfg": [3], "block": [4], "extrapolate": 1}

    def run(f):
        # The caller's copy: a replay may rewrite the buffer it was handed (the pipeline consumes
        # it at once, as this does).
        out = generation(lambda **k: tuple(t.clone() for t in f(**k)), kw)
        return out, [r["action"] for r in dit_compile.stats(f)["trace"][-len(out):]]

    with torch.no_grad():
        ref, ref_actions = run(compiled(model, sched))
        torch._dynamo.reset()
        graphs = torch.compile(model, backend="mixcache", fullgraph=True,
                               options={"mode": "reduce-overhead", "cache": sched})
        run(graphs)             # the first generation warms up and records the graphs
        out, actions = run(graphs)
    assert actions == ref_actions and {"step", "cfg", "block"} <= set(actions)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_blocks_marked_as_nested_compile_regions_are_guarded_blocks(nested_wan_blocks):
    model, kw = tiny_models.wan(layers=4)
    kw["return_dict"] = False
    report = dit_compile.explain(model, **kw)
    assert "4 blocks" in str(report)
    graphs = []
    real = backend.find_regions
    sched = dict(step=[2], cfg=[1, 3], block=[4, 5])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(backend, "find_regions", lambda gm: graphs.append(gm) or real(gm))
        f = compiled(model, {"rule": "schedule", **sched, "span": [1, 4]})
        ours = generation(f, kw)
    assert any(n.target is torch.ops.higher_order.invoke_subgraph
               for n in graphs[0].graph.nodes), "the blocks reached the backend as subgraph calls"
    ref = Reference(model, **sched, span=(1, 4)).start(STEPS[0])
    for x, y in zip(ours, generation(ref, kw)):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
    assert dit_compile.stats(f)["reused"] == {"step": 2, "cfg": 2, "block": 4}


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_prompt_or_latent_changed_in_place_is_a_change(mode):
    """The runtime takes the same tensor object, not modified in place, for the same value without
    comparing it. Changed in place (a callback that writes new embeddings into ``prompt_embeds``; a
    sampler that corrects its latent in place and evaluates again at the same timestep), it is
    another value: a new prompt for its branch, a new step. Under ``torch.inference_mode`` tensors
    keep no version counter, so there the runtime compares against a copy of what it last saw."""
    model, kw = tiny_models.wan(layers=3)
    kw["return_dict"] = False
    context = torch.inference_mode if mode == "inference_mode" else torch.no_grad
    f = compiled(model, {"rule": "schedule", "step": [1, 2, 3, 4]})
    with context():
        cond = kw["encoder_hidden_states"].clone()
        uncond, other = -cond, torch.randn_like(cond)
        outs = []
        for i, t in enumerate(STEPS[:5]):
            if i == 3:
                cond.copy_(other)       # the same object from here on, holding another prompt
            outs += [f(**dict(kw, timestep=torch.full_like(kw["timestep"], t),
                              encoder_hidden_states=e))[0] for e in (cond, uncond)]
        ref = model(**dict(kw, timestep=torch.full_like(kw["timestep"], STEPS[3]),
                           encoder_hidden_states=other))[0]
    actions = [(r["step"], r["branch"], r["action"]) for r in dit_compile.stats(f)["trace"]]
    assert actions[6:] == [(3, 0, "compute"), (3, 1, "step"), (4, 0, "step"), (4, 1, "step")]
    torch.testing.assert_close(outs[6], ref, rtol=1e-5, atol=1e-5)

    torch._dynamo.reset()
    f = compiled(model, {"rule": "schedule", "cfg": [1, 2, 3]})
    with context():
        x = torch.randn_like(kw["hidden_states"])
        cond, uncond = kw["encoder_hidden_states"].clone(), -kw["encoder_hidden_states"]
        for t, correct in ((900.0, False), (750.0, False), (750.0, True)):
            if correct:
                x.mul_(0.5)             # corrected in place, evaluated again at 750
            for e in (cond, uncond):
                f(**dict(kw, hidden_states=x, timestep=torch.tensor([t]), encoder_hidden_states=e))
    seen = [(r["generation"], r["step"], r["branch"]) for r in dit_compile.stats(f)["trace"]]
    assert seen == [(0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1), (0, 2, 0), (0, 2, 1)]


def test_a_prompt_written_into_the_kept_tensor_then_passed_as_a_copy_is_a_new_prompt():
    """The runtime keeps the prompt tensor it last saw, not a copy. Written in place after that
    call, it no longer holds the old prompt: another tensor equal to it now is a new prompt, never
    the old one (compared by its new value, the old prompt's cache was served for the new one)."""
    model, kw = tiny_models.wan(layers=3)
    kw["return_dict"] = False
    f = compiled(model, {"rule": "schedule", "step": [1]})
    text = kw["encoder_hidden_states"].clone()
    with torch.no_grad():
        f(**dict(kw, encoder_hidden_states=text,
                 timestep=torch.full_like(kw["timestep"], STEPS[0])))
        text.copy_(-text)               # a new prompt written into the tensor the runtime kept
        call = dict(kw, encoder_hidden_states=text.clone(),
                    timestep=torch.full_like(kw["timestep"], STEPS[1]))
        y, ref = f(**call)[0], model(**call)[0]
    assert [r["action"] for r in dit_compile.stats(f)["trace"]] == ["compute", "compute"]
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rule,reused", [
    ({"rule": "schedule", "step": [1, 2, 3, 4, 5, 6, 7, 8, 9]}, "step"),
    ({"rule": "teacache", "threshold": 10.0, "signal": "input"}, "step"),
    ({"rule": "schedule", "cfg": [1, 2, 3, 4, 5, 6, 7, 8, 9]}, "cfg"),
    ({"rule": "schedule", "block": [1, 2, 3, 4, 5, 6, 7, 8, 9]}, "block"),
    ({"rule": "first_block", "threshold": 10.0}, "block")])
def test_max_reuse_bounds_each_rule(rule, reused):
    """``max_reuse`` (a key every rule takes) bounds a branch's consecutive reuses, of whole calls
    (step reuse; cfg reuse of branch 1) and of the block span alike: a rule that would reuse at
    every step after the first computes every third with ``max_reuse`` 2."""
    model, kw = tiny_models.wan(layers=3)
    kw["return_dict"] = False
    steps = tuple(float(t) for t in range(950, 0, -95))
    f = compiled(model, {**rule, "max_reuse": 2})
    generation(f, kw, steps=steps)
    branch = 1 if reused == "cfg" else 0
    actions = [r["action"] for r in dit_compile.stats(f)["trace"] if r["branch"] == branch]
    assert actions == ["compute"] + ["compute" if i % 3 == 0 else reused for i in range(1, 10)]


def test_branch_difference_is_taken_between_computed_outputs_only():
    """cfg reuse rebuilds a branch from the difference taken at the last step where both branches
    were computed. Branch 1's prompt changes at step 2, where branch 0 reuses its step: the new
    prompt's branch computes, but its difference to branch 0's prediction is not taken, so at step
    3 no difference for the new prompt exists yet and branch 1 computes instead of rebuilding."""
    model, kw = tiny_models.wan(layers=3)
    kw["return_dict"] = False
    f = compiled(model, {"rule": "schedule", "step": [2], "cfg": [3, 4]})
    cond, uncond, other = kw["encoder_hidden_states"], -kw["encoder_hidden_states"], \
        torch.randn_like(kw["encoder_hidden_states"])
    _calls(f, kw, [[cond, uncond]] * 2 + [[cond, other]] * 3)
    actions = [(r["step"], r["branch"], r["action"]) for r in dit_compile.stats(f)["trace"]]
    assert actions[4:] == [(2, 0, "step"), (2, 1, "compute"), (3, 0, "compute"),
                           (3, 1, "compute"), (4, 0, "compute"), (4, 1, "cfg")]


def test_a_new_prompt_on_branch_0_voids_the_other_branches_differences():
    """Branch 1's difference was taken against branch 0's output for the old prompt: once branch
    0's prompt changes, rebuilding branch 1 from the new prompt's branch 0 plus that difference
    mixes the two prompts. Branch 1 computes at that step, then reuses its new difference."""
    model, kw = tiny_models.wan(layers=3)
    kw["return_dict"] = False
    cond, uncond = kw["encoder_hidden_states"], -kw["encoder_hidden_states"]
    other = torch.randn_like(cond)
    f = compiled(model, {"rule": "schedule", "cfg": [1, 2, 3, 4]})
    texts = [[cond, uncond]] * 3 + [[other, uncond]] * 2
    outs = _calls(f, kw, texts)
    actions = [(r["step"], r["branch"], r["action"]) for r in dit_compile.stats(f)["trace"]]
    assert actions[6:] == [(3, 0, "compute"), (3, 1, "compute"), (4, 0, "compute"), (4, 1, "cfg")]
    ref = _calls(_rd(model), kw, texts)
    torch.testing.assert_close(outs[7], ref[7], rtol=1e-5, atol=1e-5)


def test_a_step_holds_at_most_max_branches_calls():
    """MAX_BRANCHES calls at one timestep on one latent are that step's branches; one more starts
    a new generation, so a step never keeps more than MAX_BRANCHES branch caches."""
    from dit_compile.runtime.cache import MAX_BRANCHES
    st, x = CacheState(), torch.zeros(1)
    calls = [st.begin(900.0, "sig", latent=x)] + [
        st.begin(800.0, "sig", latent=x) for _ in range(MAX_BRANCHES + 1)]
    assert [(c.generation, c.step, c.branch) for c in calls] == [(0, 0, 0)] + [
        (0, 1, b) for b in range(MAX_BRANCHES)] + [(1, 0, 0)]


def test_every_copy_kept_under_inference_mode_counts_in_cached_bytes():
    """Under inference mode the runtime keeps copies of what it compares later calls with: each
    branch's text and the step's latent (a pipeline's latent, updated under inference mode, is an
    inference tensor). Those copies, and nothing else, are what such a generation caches beyond
    the same one under no_grad."""
    model, kw = tiny_models.wan(layers=2)
    kw["return_dict"] = False
    cached = {}
    for mode in (torch.no_grad, torch.inference_mode):
        torch._dynamo.reset()
        f = compiled(model, {"rule": "schedule", "step": [1]})
        with mode():
            generation(f, dict(kw, hidden_states=kw["hidden_states"].clone()), steps=STEPS[:2])
        cached[mode] = dit_compile.stats(f)["cached_bytes"]
    copies = (2 * kw["encoder_hidden_states"].numel() + kw["hidden_states"].numel()) * 4
    assert cached[torch.inference_mode] - cached[torch.no_grad] == copies


def test_a_sample_reusing_the_span_beside_one_computing_keeps_its_probe():
    """First-Block-Cache compares the probe with its value when the cached residual was taken.
    Where one sample reuses the span while the other computes it, the reusing sample's probe
    stays the one it was cached with, as alone: its drift adds up until it computes (step 5
    here), instead of being measured from step to step and reusing on."""
    steps = (900.0, 800.0, 700.0, 600.0, 500.0, 400.0, 300.0, 200.0)
    model, kw = tiny_models.wan(layers=4, batch=2)
    kw["return_dict"] = False
    g = torch.Generator().manual_seed(0)
    x = kw["hidden_states"]
    latents = [torch.cat([x[:1], torch.randn(x[1:].shape, generator=g)]) for _ in steps]
    cache = {"rule": "first_block", "threshold": 0.058}

    def run(f, kw, latents):
        with torch.no_grad():
            return [f(**dict(kw, hidden_states=x, timestep=torch.full_like(kw["timestep"], t)))[0]
                    for x, t in zip(latents, steps)]

    both = run(compiled(model, cache), kw, latents)
    torch._dynamo.reset()
    one = {k: (v[:1] if torch.is_tensor(v) else v) for k, v in kw.items()}
    f = compiled(tiny_models.wan(layers=4)[0], cache)
    alone = run(f, one, [x[:1] for x in latents])
    actions = [r["action"] for r in dit_compile.stats(f)["trace"]]
    assert actions == ["compute"] + ["block"] * 4 + ["compute"] + ["block"] * 2, \
        "the premise: alone, sample 0 reuses, then its drift makes it compute"
    for k, (y, z) in enumerate(zip(both, alone)):
        torch.testing.assert_close(y[:1], z, rtol=1e-5, atol=1e-5, msg=f"step {k}")


def test_a_scheduled_step_reuse_of_a_branch_with_no_output_yet_computes():
    """A forced schedule's step reuse needs an output of the branch to reuse: a guidance branch
    first called at a scheduled step (guidance switched on late) computes there."""
    pol = make_policy({"rule": "schedule", "step": [2]}, 4)
    st_ = CacheState()
    st_.begin(1000.0, "sig")
    st_.t_first = 1000.0
    assert pol.step(Step(0, 2, 1, 500.0), st_, torch.zeros(1))[0] == "compute"


def test_a_scheduled_cfg_reuse_needs_this_steps_first_branch():
    """A guidance branch is rebuilt from its difference and this step's branch 0: where branch 0
    has no output at this step, the scheduled cfg reuse computes instead."""
    pol = make_policy({"rule": "schedule", "cfg": [2]}, 4)
    st_ = CacheState()
    st_.begin(1000.0, "sig")
    st_.t_first = 1000.0
    st_.cfg_diff[1] = [torch.zeros(1, 2)]
    s = Step(0, 2, 1, 500.0)
    assert pol.step(s, st_, torch.zeros(1))[0] == "compute"
    st_.current[0] = [torch.zeros(1, 2)]
    assert pol.step(s, st_, torch.zeros(1))[0] == "cfg"


def test_first_block_rule_reuses_nothing_before_its_start():
    """``start``: no threshold rule reuses before that step, First-Block-Cache's block reuse
    included: a threshold every probe passes reuses the span from ``start`` on only."""
    model, kw = tiny_models.wan(layers=3)
    kw["return_dict"] = False
    f = compiled(model, {"rule": "first_block", "threshold": 10.0, "start": 3})
    ours = generation(f, kw, branches=1)
    assert [r["action"] for r in dit_compile.stats(f)["trace"]] == ["compute"] * 3 + ["block"] * 3
    eager = generation(_rd(model), kw, branches=1)
    for x, y in zip(ours[:3], eager[:3]):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


def test_reset_drops_the_policys_own_signals_too():
    """MixCache keeps cross-branch signals on the state (each branch's last difference, for its
    rate): reset drops them with the rest, so nothing of the last generation stays cached."""
    from dit_compile.runtime.cache import find_state
    model, kw = tiny_models.wan(layers=3)
    kw["return_dict"] = False
    f = compiled(model, {"rule": "mixcache", "granularities": ["cfg"]})
    generation(f, kw, steps=STEPS[:3])
    assert find_state(f).signals, "the premise: the policy keeps signals on the state"
    dit_compile.reset(f)
    assert dit_compile.stats(f)["cached_bytes"] == 0 and not find_state(f).signals


def test_a_branch_over_the_memory_bound_keeps_no_difference():
    """Branch 1's call stores its output and its difference to branch 0, then finds the bound
    exceeded: the call raises and keeps none of it, its difference included; what branch 0
    cached stays."""
    model, kw = tiny_models.wan(layers=3)
    kw["return_dict"] = False
    one = kw["hidden_states"].numel() * 4       # one output's bytes (the output is latent-sized)
    f = compiled(model, {"rule": "schedule", "cfg": [1]}, cache_memory=int(2.5 * one))
    with pytest.raises(dit_compile.CacheMemoryError):
        generation(f, kw, steps=STEPS[:1])
    assert dit_compile.stats(f)["cached_bytes"] == one
