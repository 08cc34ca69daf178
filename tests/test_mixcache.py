"""Invariants of the MixCache policy, on random DiTs and at the level of single decisions."""
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import dit_compile
import random_dits
import tiny_models
from dit_compile.runtime.cache import CacheState, Step
from dit_compile.runtime.mixcache import _fold_pending, _rate, make_mixcache
from dit_compile.runtime.policy import PolicyError, make_policy
from test_cache import compiled, generation

STEPS = tuple(float(t) for t in range(1000, 0, -100))


def _runs(trace, branch):
    """Lengths of the runs of consecutive reuse for one branch, per sample: a call where only
    some samples reused (``reused``, one flag per sample) continues the runs of those, and ends
    the others'."""
    batch = max((len(r["reused"]) for r in trace if r["reused"]), default=1)
    runs, n = [], [0] * batch
    for r in trace:
        if r["branch"] != branch:
            continue
        flags = r["reused"] or [r["action"] != "compute"] * batch
        n = [k + 1 if reused else 0 for k, reused in zip(n, flags)]
        runs.append(max(n))
    return runs


@settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck))
@given(spec=random_dits.specs().filter(lambda s: not s.two_streams),
       budget=st.sampled_from([0.0, 0.05, 0.3, 2.0]), warmup=st.sampled_from([0.0, 0.2, 0.5]),
       max_reuse=st.integers(1, 3), order=st.sampled_from([0, 1, 2]))
# Found by hypothesis: the two samples of the batch take turns computing, so every call reuses
# for one of them, and the bound holds per sample, not per call.
@example(spec=random_dits.Spec(dim=16, depths=(2, 4), cross_attn=False, adaln=True, gated=False,
                               two_streams=False, extra_input=False, batch=2, tokens=4),
         budget=0.05, warmup=0.0, max_reuse=3, order=0)
def test_trigger_bound_and_zero_budget(spec, budget, warmup, max_reuse, order):
    torch._dynamo.reset()
    model, kw = random_dits.build(spec)
    cache = {"rule": "mixcache", "budget": budget, "warmup": warmup, "max_reuse": max_reuse,
             "settle": 10.0, "extrapolate": order}
    f = compiled(model, cache)
    generation(f, kw, steps=STEPS)
    trace = dit_compile.stats(f)["trace"]
    reused = [r for r in trace if r["action"] != "compute"]
    if budget == 0:
        assert not reused, "an error budget of zero reuses nothing"
    for r in reused:
        assert r["t"] <= (1 - warmup) * STEPS[0], "no reuse before the trigger"
    for b in (0, 1):
        assert max(_runs(trace, b)) <= max_reuse, "consecutive reuse is bounded"


@pytest.mark.parametrize("granularities,budget,order", [
    (["block"], 0.01, None), (["step"], 0.05, 1), (["step"], 0.05, 2), (["step", "block"], 0.05, 1)],
    ids=["block", "step", "step-second-order", "step-and-block"])
def test_decisions_independent_across_samples(granularities, budget, order):
    """A batch of two samples takes, per sample, the decisions each takes alone, and each comes
    out as it does alone; where one reuses the step, the other still decides on the block span
    (the batch had computed it in full, and that sample's block reuse was lost)."""
    model, kw = tiny_models.wan(layers=4, batch=2)
    kw["return_dict"] = False
    kw["encoder_hidden_states"][1] *= 10.0     # another prompt: the samples part ways
    cache = {"rule": "mixcache", "budget": budget, "warmup": 0.1, "settle": 10.0,
             "granularities": granularities,
             **({"extrapolate": order} if "step" in granularities else {})}
    f = compiled(model, cache)
    both = generation(f, kw, steps=STEPS, branches=1)
    trace = dit_compile.stats(f)["trace"]
    assert any(r["reused"] is not None for r in trace), \
        "the test must reach a call where the samples decide apart"
    # A call where only some samples reused, and the batch computed in full, is no reuse.
    stats = dit_compile.stats(f)
    assert sum(stats["partial"].values()) == sum(r["reused"] is not None and r["flops"] >= 1.0
                                                 for r in trace)
    assert stats["calls"] == stats["computed"] + sum(stats["reused"].values()) + sum(
        stats["partial"].values())
    torch._dynamo.reset()       # the batch of one traced as it would be alone, not dynamic
    g, alone = compiled(tiny_models.wan(layers=4)[0], cache), []
    for i in range(2):
        dit_compile.reset(g)
        one = {k: (v[i:i + 1] if torch.is_tensor(v) else v) for k, v in kw.items()}
        alone.append(generation(g, one, steps=STEPS, branches=1))
        assert _reused(trace, i) == _reused(dit_compile.stats(g)["trace"], 0)
    for k, y in enumerate(both):
        torch.testing.assert_close(y, torch.cat([alone[0][k], alone[1][k]]), rtol=1e-5, atol=1e-5)


def test_a_partial_step_reuse_leaves_the_branch_difference_as_it_was(monkeypatch):
    """Decisions forced (the policy's step decision replaced): at step 3 sample 0 reuses the
    step in both branches while sample 1 computes (a partial step reuse), and at step 4 branch 1
    is rebuilt from branch 0. The branch difference is of whole calls: the one it is rebuilt
    from is step 2's, the last step both branches computed whole, not step 3's, half of whose
    outputs are predictions."""
    from dit_compile.runtime.mixcache import MixCache

    def forced(self, s, st_, latent):
        bc = st_.branch(s.branch)
        bc.signals.pop("step_mask", None)
        if s.step == 3:
            bc.signals["step_mask"] = np.array([True, False])
            return "step", 0.0
        if s.step == 4 and s.branch == 1:
            return "cfg", 0.0
        return "compute", None
    monkeypatch.setattr(MixCache, "step", forced)
    model, kw = tiny_models.wan(layers=2, batch=2)
    kw["return_dict"] = False
    f = compiled(model, {"rule": "mixcache", "granularities": ["step", "cfg"]})
    outs = generation(f, kw, steps=STEPS[:5], branches=2)
    trace = dit_compile.stats(f)["trace"]
    assert [(r["action"], r["reused"]) for r in trace[6:]] == [
        ("step", (True, False)), ("step", (True, False)), ("compute", None), ("cfg", None)]
    torch.testing.assert_close(outs[9], outs[8] + (outs[5] - outs[4]), rtol=1e-5, atol=1e-5)


def test_a_partial_step_reuse_of_residuals_keeps_each_samples_own_latent(monkeypatch):
    """``step_mode="residual"``, decisions forced: at step 3 sample 0 reuses the step while sample
    1 computes, at step 4 both reuse. Each sample's residual is over the latent of its own last
    compute: sample 0's is step 2's, not step 3's (taken with the batch's, its residual mixed step
    2's output with step 3's latent)."""
    from dit_compile.runtime.mixcache import MixCache

    def forced(self, s, st_, latent):
        st_.branch(s.branch).signals.pop("step_mask", None)
        if s.step == 3:
            st_.branch(s.branch).signals["step_mask"] = np.array([True, False])
        return ("step", 0.0) if s.step in (3, 4) else ("compute", None)
    monkeypatch.setattr(MixCache, "step", forced)
    model, kw = tiny_models.wan(layers=2, batch=2)
    kw["return_dict"] = False
    f = compiled(model, {"rule": "mixcache", "granularities": ["step"], "step_mode": "residual"})
    x, xs, outs = kw["hidden_states"].clone(), [], []
    with torch.no_grad():
        for t in STEPS[:5]:
            xs.append(x.clone())
            call = dict(kw, hidden_states=x, timestep=torch.full_like(kw["timestep"], t))
            outs.append(f(**call)[0])
            x = x - 0.1 * outs[-1]
    assert [r["reused"] for r in dit_compile.stats(f)["trace"][3:]] == [(True, False), None]
    for i, last in ((0, 2), (1, 3)):      # each sample's last compute
        torch.testing.assert_close(outs[4][i], xs[4][i] + (outs[last][i] - xs[last][i]),
                                   rtol=1e-5, atol=1e-5, msg=lambda m: f"sample {i}: {m}")


def test_a_sample_reusing_the_step_keeps_its_span_residual_where_the_others_reuse_the_span(
        monkeypatch):
    """Decisions forced: at step 3 sample 0 reuses the step and sample 1 the block span, so nobody
    computes the span and the call costs less than a full one; sample 0's span residual stays
    step 2's, so its block reuse at step 4 comes out as it does alone (the samples that reused the
    step ignored, the span computed, and sample 0 took step 3's residual of a predicted output)."""
    from dit_compile.runtime.mixcache import MixCache
    alone = False

    def step(self, s, st_, latent):
        st_.branch(s.branch).signals.pop("step_mask", None)
        if s.step == 3:
            if not alone:
                st_.branch(s.branch).signals["step_mask"] = np.array([True, False])
            return "step", 0.0
        return "compute", None

    def block(self, s, st_, bc, probe):
        if s.step == 3 and not alone:
            return torch.tensor([False, True]), 0.0
        return s.step == 4, (0.0 if s.step == 4 else None)
    monkeypatch.setattr(MixCache, "step", step)
    monkeypatch.setattr(MixCache, "block", block)
    model, kw = tiny_models.wan(layers=4, batch=2)
    kw["return_dict"] = False
    kw["encoder_hidden_states"][1] *= 10.0     # another prompt: the samples part ways
    cache = {"rule": "mixcache", "granularities": ["step", "block"]}
    f = compiled(model, cache)
    both = generation(f, kw, steps=STEPS[:5], branches=1)
    stats = dit_compile.stats(f)
    alone = True
    torch._dynamo.reset()       # the batch of one traced as it would be alone, not dynamic
    one = {k: (v[:1] if torch.is_tensor(v) else v) for k, v in kw.items()}
    ones = generation(compiled(model, cache), one, steps=STEPS[:5], branches=1)
    for k, (y, z) in enumerate(zip(both, ones)):
        torch.testing.assert_close(y[:1], z, rtol=1e-5, atol=1e-5, msg=lambda m: f"step {k}: {m}")
    assert stats["trace"][3]["flops"] < 1.0 and not stats["partial"], "nobody computes the span"


def test_samples_of_a_latent_list_decide_as_each_alone():
    """Z-Image takes one latent of [C, F, H, W] per sample, the batch being the list. Decided
    along dim 0 of one element, "per sample" was per channel: a sample took some channels from
    the extrapolation and the rest computed. Stacked, each sample decides and comes out as alone."""
    model, kw = tiny_models.zimage(batch=2)
    kw["cap_feats"][1] = kw["cap_feats"][1] * 10.0     # another prompt: the samples part ways
    with torch.no_grad():
        model(**kw)     # builds its rotary table (a graph break): the compiled call is one graph
    cache = {"rule": "mixcache", "budget": 0.02, "warmup": 0.1, "settle": 10.0,
             "granularities": ["step"], "extrapolate": 1}

    f = compiled(model, cache, timestep="rising")     # traced for two samples, then for one

    def run(kw):
        dit_compile.reset(model)
        with torch.no_grad():
            outs = [torch.stack(f(x=[x.clone() for x in kw["x"]], cap_feats=kw["cap_feats"],
                                  t=torch.full((len(kw["x"]),), i / 12), return_dict=False)[0])
                    for i in range(12)]
        return outs, dit_compile.stats(f)["trace"]

    both, trace = run(kw)
    assert any(r["reused"] is not None and len(set(r["reused"])) == 2 for r in trace), \
        "the test must reach a call where only one sample reuses"
    assert all(r["reused"] is None or len(r["reused"]) == 2 for r in trace), "one flag per sample"
    for i in range(2):
        alone, alone_trace = run({k: v[i:i + 1] for k, v in kw.items()})
        assert _reused(trace, i) == _reused(alone_trace, 0)
        for y, z in zip(both, alone):
            torch.testing.assert_close(y[i], z[0], rtol=1e-5, atol=1e-5)


def _reused(trace, sample):
    """Whether ``sample`` reused, call by call."""
    return [r["action"] != "compute" and (r["reused"] is None or r["reused"][sample])
            for r in trace]


def _state_with_signals(out_rate, cfg_rate, probe_prev, probe_now, t, t_last):
    st_ = CacheState()
    s0 = st_.begin(1000.0, "sig")
    st_.t_first = 1000.0
    bc = st_.branch(1)
    bc.signals.update(settled=True, settled_mask=torch.tensor(True), out_rate=out_rate)
    bc.outputs = [(t_last, [torch.zeros(1, 2)])]
    bc.span = [torch.zeros(1, 2)]
    bc.probe = probe_prev
    st_.cfg_diff[1] = [torch.zeros(1, 2)]
    st_.current[0] = [torch.zeros(1, 2)]
    st_.signals["cfg"] = {1: {"rate": cfg_rate, "t": t_last}}
    return st_, bc, Step(s0.generation, 5, 1, t), probe_now


@settings(max_examples=60, deadline=None)
@given(out_rate=st.floats(0, 1e-2), cfg_rate=st.floats(0, 1e-2), t=st.floats(1, 700),
       dt=st.floats(1, 200), noise=st.floats(0, 1),
       budgets=st.tuples(st.floats(0, 1), st.floats(0, 1)).map(sorted))
def test_larger_budget_never_reuses_less(out_rate, cfg_rate, t, dt, noise, budgets):
    """Decision by decision: the same signals under a larger budget reuse at least as much."""
    torch.manual_seed(0)
    prev = torch.randn(3, 4, 5)
    now = prev + noise * torch.randn(3, 4, 5)
    reuse = []
    for budget in budgets:
        pol = make_mixcache({"budget": budget, "warmup": 0.0, "settle": 10.0})
        st_, bc, s, probe = _state_with_signals(out_rate, cfg_rate, prev, now, t, t + dt)
        action, _ = pol.step(s, st_, torch.zeros(1))
        blocks, _ = pol.block(s, st_, bc, probe)
        n_blocks = int(blocks.sum()) if torch.is_tensor(blocks) else 3 * bool(blocks)
        reuse.append((action != "compute", n_blocks))
    assert reuse[1][0] >= reuse[0][0]
    if not reuse[1][0] and not reuse[0][0]:
        assert reuse[1][1] >= reuse[0][1]


def test_trigger_stays_on_once_the_output_has_settled():
    """The output's relative change per unit of noise level decides when caching may start, per
    sample; once every sample's has settled, a later jump (the last, longest steps of a
    generation) leaves the decision to the error budget."""
    pol = make_mixcache({"budget": 1.0, "warmup": 0.0, "settle": 3.0, "granularities": ["step"]})
    st_ = CacheState()
    st_.begin(1000.0, "sig")
    bc = st_.branch(0)
    y = torch.ones(2, 3, 4)
    calls = [(0, 1000.0)]

    def settled(*changes):
        """Each sample's output moves by these relative amounts over 0.1 of the noise range (a
        change of 0.3 there is the settle bound of 3.0); is the trigger on?"""
        step, t = calls[-1][0] + 1, calls[-1][1] - 100.0
        calls.append((step, t))
        bc.outputs = [(t + 100.0, [y]), (t, [y * (1 + torch.tensor(changes).view(-1, 1, 1))])]
        pol.observe(Step(0, step, 0, t), st_, bc, bc.outputs[-1][1], "compute")
        _fold_pending(bc.signals, st_)   # what the next decision does first
        return bc.signals["settled"]

    assert not settled(0.9, 0.9)
    assert pol.step(Step(0, 2, 0, 800.0), st_, torch.zeros(2))[0] == "compute"
    assert not settled(0.1, 0.9), "the second sample has not settled"
    # The first sample alone may reuse the step: the batch computes, that sample takes its
    # prediction.
    assert pol.step(Step(0, 3, 0, 600.0), st_, torch.zeros(2))[0] == "step"
    assert bc.signals["step_mask"].tolist() == [True, False]
    assert settled(0.9, 0.1), "the first sample stays settled"
    assert settled(0.9, 0.9)
    bc.signals["out_rate"] = 1e-6
    assert pol.step(Step(0, 6, 0, 400.0), st_, torch.zeros(2))[0] == "step"
    assert "step_mask" not in bc.signals, "every sample reuses: the call is skipped"


def _two_branches(rates, t_last=600.0, t=500.0):
    """A state one step after both guidance branches computed at ``t_last``."""
    st_ = CacheState()
    st_.begin(1000.0, "sig")
    st_.t_first = 1000.0
    for b, rate in enumerate(rates):
        bc = st_.branch(b)
        bc.signals.update(settled=True, out_rate=rate, prev_t=t_last)
        bc.outputs = [(t_last, [torch.zeros(1, 2)])]
    return st_, [Step(0, 5, b, t) for b in range(len(rates))]


@pytest.mark.parametrize("rates,reused", [((1e-4, 1e-4), True), ((1e-4, 1.0), False),
                                          ((1.0, 1e-4), False)])
def test_guidance_branches_share_the_step_decision(rates, reused):
    """Step reuse is decided once per step: a branch whose estimate does not fit keeps the other
    from reusing too, whichever of the two is called first."""
    pol = make_mixcache({"budget": 0.01, "warmup": 0.0, "settle": 10.0})
    st_, steps = _two_branches(rates)
    actions = [pol.step(s, st_, torch.zeros(1))[0] for s in steps]
    assert actions == (["step", "step"] if reused else ["compute", "compute"])


def test_a_branch_reuses_the_step_its_step_was_decided_for_even_where_cfg_costs_less():
    """With step and cfg reuse both allowed, a step decided for both branches is taken by both.
    Branch 1 rebuilt from branch 0's prediction and a stale difference (its cheaper estimate)
    would carry that prediction's error as well, uncharged, and untie the branches' errors."""
    pol = make_mixcache({"budget": 0.01, "warmup": 0.0, "settle": 10.0,
                         "granularities": ["step", "cfg"]})
    st_, steps = _two_branches((1e-4, 1e-4))
    st_.cfg_diff[1], st_.current[0] = [torch.zeros(1, 2)], [torch.zeros(1, 2)]
    st_.signals["cfg"] = {1: {"rate": 1e-9, "t": 600.0}}
    assert [pol.step(s, st_, torch.zeros(1))[0] for s in steps] == ["step", "step"]
    # Where the step does not fit, the cheaper branch is still rebuilt.
    st_, steps = _two_branches((1.0, 1.0))
    st_.cfg_diff[1], st_.current[0] = [torch.zeros(1, 2)], [torch.zeros(1, 2)]
    st_.signals["cfg"] = {1: {"rate": 1e-9, "t": 600.0}}
    assert [pol.step(s, st_, torch.zeros(1))[0] for s in steps] == ["compute", "cfg"]


@pytest.mark.parametrize("rate,reused", [(1.0, False), (1e-6, True)])
def test_a_call_at_timestep_zero_is_not_free(rate, reused):
    """DDPM's last call is at t = 0 and its output still makes x0: capping the step length at t
    made every reuse there free, whatever the output's rate of change."""
    pol = make_mixcache({"budget": 0.01, "warmup": 0.0, "settle": 10.0, "extrapolate": 0})
    st_, steps = _two_branches((rate,), t_last=100.0, t=0.0)
    assert pol.step(steps[0], st_, torch.zeros(1))[0] == ("step" if reused else "compute")


@pytest.mark.parametrize("rate,reused", [(4e-4, True), (6e-4, False)])
def test_the_last_step_is_no_longer_than_its_timestep(rate, reused):
    """A sampler's step from t goes no further than 0: at t = 100 after t = 300 the step about to
    be taken is 100, not the last spacing of 200. The estimate 4e-4 * 200 * 0.1 = 0.008 fits the
    budget of 0.01; at twice that step length it would not, as 6e-4 does not at this one."""
    pol = make_mixcache({"budget": 0.01, "warmup": 0.0, "settle": 10.0, "extrapolate": 0})
    st_, steps = _two_branches((rate,), t_last=300.0, t=100.0)
    assert pol.step(steps[0], st_, torch.zeros(1))[0] == ("step" if reused else "compute")


def test_a_sample_without_a_curvature_yet_extrapolates_on_its_rate():
    """Per sample, the first-order estimate stands in until a sample's slope has changed once
    (its curvature is NaN): a batch whose samples are at different points of that both fit."""
    pol = make_mixcache({"budget": 0.01, "warmup": 0.0, "settle": 10.0, "extrapolate": 1})
    st_, steps = _two_branches((1e-4,))
    st_.branch(0).signals["curvature"] = torch.tensor([float("nan"), 1e-4], dtype=torch.float64)
    assert pol.step(steps[0], st_, torch.zeros(2))[0] == "step"
    assert "step_mask" not in st_.branch(0).signals, "both samples reuse: the call is skipped"


def test_without_extrapolation_the_estimate_is_the_rate_whatever_curvature_was_measured():
    """``extrapolate=0`` hands back the last output as it is: it is off by the output's rate
    times the distance (1e-3 * 100 * 0.1 = 0.01, over the budget), not by the curvature the
    branch measured all the same (1e-6), which only a linear predictor's error is."""
    pol = make_mixcache({"budget": 0.005, "warmup": 0.0, "settle": 10.0, "extrapolate": 0})
    st_, steps = _two_branches((1e-3,))
    st_.branch(0).signals["curvature"] = torch.tensor([1e-6], dtype=torch.float64)
    assert pol.step(steps[0], st_, torch.zeros(1)) == ("compute", pytest.approx(0.01))


def test_a_second_call_at_the_timestep_last_computed_at_computes():
    """Heun's corrector calls again at the timestep the branch computed at, on another latent:
    the estimate measures how far the timestep moved (here not at all, an estimate of 0), so
    nothing says what a reuse would cost, and the call computes."""
    pol = make_mixcache({"budget": 0.01, "warmup": 0.0, "settle": 10.0, "extrapolate": 0})
    st_, steps = _two_branches((1e-4,), t_last=500.0, t=500.0)
    st_.branch(0).signals["spacing"] = 100.0
    assert pol.step(steps[0], st_, torch.zeros(1)) == ("compute", None)


def test_two_computed_calls_at_one_timestep_leave_the_rate_as_it_was():
    """Heun's predictor and corrector at one timestep: their outputs' change is over no change
    of timestep and says nothing of the rate (read as one, it is infinite, and the branch never
    reuses again): the rate measured before stands, and the next step may reuse on it."""
    pol = make_mixcache({"budget": 0.01, "warmup": 0.0, "settle": 10.0})
    st_, steps = _two_branches((1e-4,), t_last=500.0, t=500.0)
    bc = st_.branch(0)
    bc.outputs = [(500.0, [torch.ones(1, 2)]), (500.0, [torch.full((1, 2), 1.1)])]
    pol.observe(steps[0], st_, bc, [torch.full((1, 2), 1.1)], "compute")
    _fold_pending(bc.signals, st_)
    assert np.all(bc.signals["out_rate"] == 1e-4)
    assert pol.step(Step(0, 6, 0, 400.0), st_, torch.zeros(1))[0] == "step"


def test_after_a_partial_step_reuse_only_the_computed_samples_rates_move_on():
    """Sample 0 took its prediction, sample 1 computed: sample 1's rate is its change over the
    100 of timestep (0.02 / 100), and sample 0 keeps the rate it had (its output is no new
    measurement)."""
    pol = make_mixcache({"budget": 0.01, "warmup": 0.0, "settle": 10.0})
    st_, steps = _two_branches((1e-4,))
    bc = st_.branch(0)
    bc.signals.update(out_rate=np.array([1e-4, 1e-4]), step_mask=np.array([True, False]))
    out = torch.tensor([[1.01, 1.01], [1.02, 1.02]])
    bc.outputs = [(600.0, [torch.ones(2, 2)]), (500.0, [out])]
    pol.observe(steps[0], st_, bc, [out], "step")
    _fold_pending(bc.signals, st_)
    assert bc.signals["out_rate"].tolist() == pytest.approx([1e-4, 2e-4], rel=1e-4)


def test_a_branch_not_called_at_the_last_step_is_not_tied():
    """Branches are tied where both were called at the last step. Guidance off at that step (a
    guidance interval) left branch 1 behind: its estimate, from an older step, does not hold
    branch 0 back."""
    pol = make_mixcache({"budget": 0.01, "warmup": 0.0, "settle": 10.0})
    st_, steps = _two_branches((1e-4, 1.0))
    assert pol.step(steps[0], st_, torch.zeros(1))[0] == "compute", "tied, branch 1 does not fit"
    st_, steps = _two_branches((1e-4, 1.0))
    st_.branch(1).signals["prev_t"] = 800.0
    assert pol.step(steps[0], st_, torch.zeros(1))[0] == "step"


@pytest.mark.parametrize("per_sample", [True, False])
def test_one_step_decision_for_the_batch_where_asked(per_sample):
    """``per_sample=False``: one sample that may not reuse the step keeps the batch from reusing
    it; per sample, the other takes its prediction."""
    pol = make_mixcache({"budget": 0.01, "warmup": 0.0, "settle": 10.0, "per_sample": per_sample})
    st_, steps = _two_branches((1e-4,))
    st_.branch(0).signals["out_rate"] = torch.tensor([1e-4, 1.0], dtype=torch.float64)
    action, _ = pol.step(steps[0], st_, torch.zeros(2))
    if per_sample:
        assert action == "step" and st_.branch(0).signals["step_mask"].tolist() == [True, False]
    else:
        assert action == "compute" and "step_mask" not in st_.branch(0).signals


@pytest.mark.parametrize("now,action,reused", [
    ([[1.0, 1.0]], "step", [True, True]),          # as at the last compute
    ([[0.9, 1.15]], "step", [True, True]),         # drifted by less than a fifth
    ([[1.0, 1.22]], "step", [True, True]),         # up by 0.18 of the larger value (0.22 of the smaller)
    ([[0.0, 1.0]], "step", [False, True]),         # switched off for the first sample only
    ([[0.0, 1.0], [2.0, 9.0]], "compute", [False, False])])   # off for one, on for the other
def test_a_sample_whose_conditions_switched_computes(now, action, reused):
    """Each call's other conditions (ControlNet residuals, pooled text, image embeddings) come as
    magnitudes, [conditions, samples]; a sample where one moved by more than a fifth of the
    larger value since its branch computed (a ControlNet switched on or off) computes, the others may
    reuse. The samples that computed judge their next reuse against what they computed under."""
    pol = make_mixcache({"budget": 0.01, "warmup": 0.0, "settle": 10.0})
    st_, steps = _two_branches((1e-4,))
    bc, s = st_.branch(0), steps[0]
    then = np.array([[1.0, 1.0], [2.0, 4.0]][:len(now)])
    bc.signals["conditions"] = then
    s.conditions = np.array(now)
    assert pol.step(s, st_, torch.zeros(2))[0] == action
    mask = bc.signals.get("step_mask")
    assert (mask.tolist() if mask is not None else [action == "step"] * 2) == reused
    bc.outputs.append((500.0, [torch.ones(2, 2)]))      # what _finish pushes before observing
    pol.observe(s, st_, bc, [torch.zeros(2, 2)], action)
    expected = np.where(reused, then, s.conditions)
    assert bc.signals["conditions"].tolist() == expected.tolist()
    # Rates and predictions start again from a call where a switch was computed: the outputs
    # before it say nothing of those after.
    switched = not all(reused)
    assert len(bc.outputs) == (1 if switched else 2)
    _fold_pending(bc.signals, st_)
    assert ("out_rate" in bc.signals) != switched


def test_a_block_reuse_judges_the_next_call_against_the_conditions_it_computed_under():
    """A call that reused the span computed the rest under its own conditions: a condition
    drifting 1.0 -> 1.1 (that call) -> 1.3 moved by 0.2 since, less than a fifth of 1.3, and is
    no switch (against 1.0, before the block reuse, it would be)."""
    pol = make_mixcache({"budget": 0.01, "warmup": 0.0, "settle": 10.0})
    st_, steps = _two_branches((1e-4,))
    bc, s = st_.branch(0), steps[0]
    bc.signals["conditions"] = np.array([[1.0]])
    s.conditions = np.array([[1.1]])
    bc.outputs.append((500.0, [torch.zeros(1, 2)]))      # what _finish pushes before observing
    pol.observe(s, st_, bc, [torch.zeros(1, 2)], "block")
    s2 = Step(0, 6, 0, 400.0)
    s2.conditions = np.array([[1.3]])
    assert pol.step(s2, st_, torch.zeros(1))[0] == "step"
    assert bc.signals["moved"].tolist() == [False]


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_a_condition_written_in_place_is_seen_switched(mode):
    """The runtime keeps the magnitudes of a call's other conditions where the next call passes
    the very same tensors (a pipeline's pooled text at every step), by their version counters:
    one written to in place is measured again, and under inference mode (no counter) every call
    is. Flux's pooled text zeroed in place from step 4: that call computes, and so does the next,
    whose rate is the first measured after the switch."""
    model, kw = tiny_models.flux()
    f = compiled(model, {"rule": "mixcache", "budget": 1.0, "max_reuse": 8, "warmup": 0.0,
                         "settle": 100.0, "granularities": ["step"]})
    with mode():
        pooled = kw["pooled_projections"].clone()
        for i, t in enumerate(STEPS):
            if i == 4:
                pooled.zero_()
            f(**dict(kw, pooled_projections=pooled, timestep=torch.full((1,), t)))
    trace = dit_compile.stats(f)["trace"]
    # After the switch, the rate is measured afresh: from steps 4 and 5.
    assert [r["action"] for r in trace][:7] == ["compute", "compute", "step", "step", "compute",
                                                "compute", "step"]
    assert trace[4]["switched"] == (True,) and not any(r["switched"] for r in trace[5:])


@pytest.mark.parametrize("t_diff,cfg_rate,action", [
    (600.0, 1e-5, "cfg"), (600.0, 1.0, "compute"), (500.0, 1e-5, "compute")])
def test_cfg_reuse_where_its_estimate_fits_and_the_timestep_moved(t_diff, cfg_rate, action):
    """A branch is rebuilt where the difference's rate times the distance fits the budget. A
    second call at the timestep where the difference was taken (Heun's corrector) moved only the
    latent: the estimate, which measures how far the timestep moved, says nothing there."""
    pol = make_mixcache({"budget": 0.01, "warmup": 0.0, "settle": 10.0, "granularities": ["cfg"]})
    probe = torch.zeros(1, 4, 5)
    st_, _, s, _ = _state_with_signals(0.0, cfg_rate, probe, probe, t=500.0, t_last=t_diff)
    assert pol.step(s, st_, torch.zeros(1))[0] == action


def test_the_cfg_rate_of_a_batch_is_its_fastest_samples():
    """A cfg reuse rebuilds the branch of the whole batch at once, so its rate is the largest
    sample's: the difference moved by 1 (relative to the output) over 100 in sample 1 and not at
    all in sample 0, a rate of 0.01, not their mean."""
    pol = make_mixcache({"budget": 0.01, "warmup": 0.0, "settle": 10.0, "granularities": ["cfg"]})
    st_, steps = _two_branches((1e-4, 1e-4))
    s, bc = steps[1], st_.branch(1)
    st_.cfg_step[1] = s.step
    st_.signals["cfg"] = {1: {"prev": torch.zeros(2, 4), "t": 600.0}}
    st_.cfg_diff[1] = [torch.tensor([[0.0] * 4, [1.0] * 4])]
    bc.outputs = [(500.0, [torch.ones(2, 4)])]
    pol.observe(s, st_, bc, [torch.ones(2, 4)], "compute")
    assert _rate(st_.signals["cfg"][1]) == pytest.approx(0.01)


@pytest.mark.parametrize("spent,action", [((0.0, 0.0), "cfg"), ((0.0, 0.01), "compute")])
def test_a_cfg_reuse_fits_the_budget_of_every_sample(spent, action):
    """The batch's guidance branch is rebuilt or computed as one: where one sample has spent its
    whole budget, the estimate that fits the other's does not let it reuse."""
    pol = make_mixcache({"budget": 0.01, "warmup": 0.0, "settle": 10.0, "granularities": ["cfg"]})
    probe = torch.zeros(2, 4, 5)
    st_, bc, s, _ = _state_with_signals(0.0, 1e-5, probe, probe, t=500.0, t_last=600.0)
    bc.signals["spent"] = np.array(spent)
    assert pol.step(s, st_, torch.zeros(2))[0] == action


@pytest.mark.parametrize("warmup,per_sample,reused", [
    (0.0, True, [True, True, False]), (0.0, False, False), (0.6, True, False)])
def test_block_reuse_per_sample_and_after_the_warmup(warmup, per_sample, reused):
    """Samples whose probe did not move reuse the span, the one that moved computes it; with
    ``per_sample=False`` that one keeps the batch from reusing. Before the warm-up (t = 500 above
    0.4 of t_first = 1000) no sample does."""
    pol = make_mixcache({"budget": 0.01, "warmup": warmup, "settle": 10.0, "per_sample": per_sample,
                         "granularities": ["block"]})
    prev = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(0))
    now = prev.clone()
    now[2] += 1.0
    st_, bc, s, probe = _state_with_signals(0.0, 0.0, prev, now, t=500.0, t_last=600.0)
    decision, _ = pol.block(s, st_, bc, probe)
    assert (decision.tolist() if torch.is_tensor(decision) else decision) == reused


def test_block_reuse_stops_per_sample_at_the_bound_on_consecutive_reuse():
    """``max_reuse`` bounds a sample's consecutive reuses of the span too: the sample that reused
    it twice in a row computes it, the others, whose probes did not move either, reuse it."""
    pol = make_mixcache({"budget": 0.01, "warmup": 0.0, "settle": 10.0, "max_reuse": 2,
                         "granularities": ["block"]})
    prev = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(0))
    st_, bc, s, probe = _state_with_signals(0.0, 0.0, prev, prev.clone(), t=500.0, t_last=600.0)
    bc.reused_in_a_row = torch.tensor([2, 1, 0])
    decision, _ = pol.block(s, st_, bc, probe)
    assert torch.is_tensor(decision) and decision.tolist() == [False, True, True]


def test_a_sample_that_reused_the_span_in_a_partial_step_reuse_keeps_its_spend():
    """A call where sample 0 reused the step and sample 1 computed it but reused the span: only
    a full compute clears what a sample spent, so sample 1's span reuse stays charged."""
    pol = make_mixcache({"budget": 0.01, "warmup": 0.0, "settle": 10.0,
                         "granularities": ["step", "block"]})
    st_, steps = _two_branches((1e-4,))
    bc = st_.branch(0)
    bc.signals.update(step_mask=np.array([True, False]), mask=torch.tensor([False, True]),
                      spent=np.array([0.004, 0.006]))
    bc.outputs.append((500.0, [torch.zeros(2, 2)]))      # what _finish pushes before observing
    pol.observe(steps[0], st_, bc, [torch.zeros(2, 2)], "step")
    assert bc.signals["spent"].tolist() == [0.004, 0.006]


def test_branches_reuse_at_the_same_steps_in_a_generation():
    model, kw = tiny_models.wan(layers=4)
    kw["return_dict"] = False
    f = compiled(model, {"rule": "mixcache", "budget": 0.05, "warmup": 0.0, "settle": 10.0,
                         "max_reuse": 3})
    generation(f, kw, steps=tuple(float(t) for t in range(1000, 0, -50)))
    trace = dit_compile.stats(f)["trace"]
    by_branch = [[r["action"] for r in trace if r["branch"] == b] for b in (0, 1)]
    assert "step" in by_branch[0], "the test must reuse"
    assert by_branch[0] == by_branch[1]


def test_presets_reuse_steps_from_quality_to_fast():
    """Each preset reuses whole steps on a generation, each more than the one before it."""
    flops = {}
    for preset in ("quality", "balanced", "fast"):
        torch._dynamo.reset()
        model, kw = tiny_models.wan(layers=3)     # three: on two, quality reuses no step
        kw["return_dict"] = False
        f = compiled(model, preset)
        generation(f, kw, steps=tuple(float(t) for t in range(1000, 0, -50)))
        s = dit_compile.stats(f)
        assert s["calls"] == 40 and set(s["reused"]) == {"step"}
        assert all(set(r) >= {"action", "signal", "spent", "t"} for r in s["trace"])
        flops[preset] = s["flops_fraction"]
    assert 1.0 > flops["quality"] > flops["balanced"] > flops["fast"], flops


def test_default_is_balanced_and_none_turns_caching_off():
    # Two blocks: balanced reuses 16 of the 40 calls there, where quality reuses none and fast 22.
    model, kw = tiny_models.wan(layers=2)
    kw["return_dict"] = False
    steps = tuple(float(t) for t in range(1000, 0, -50))
    default = torch.compile(model, backend="mixcache", fullgraph=True, options={"regions": "eager"})
    generation(default, kw, steps=steps)
    balanced = [r["action"] for r in dit_compile.stats(default)["trace"]]
    torch._dynamo.reset()
    preset = compiled(tiny_models.wan(layers=2)[0], "balanced")
    generation(preset, kw, steps=steps)
    assert balanced == [r["action"] for r in dit_compile.stats(preset)["trace"]]
    assert "step" in balanced, "the default reuses steps"

    torch._dynamo.reset()
    off = compiled(tiny_models.wan(layers=2)[0], None)
    outs = generation(off, kw, steps=steps)
    with pytest.raises(ValueError, match="compiled with cache=None: mixcache caches nothing"):
        dit_compile.stats(off)      # nothing cached: said so
    ref = generation(lambda **k: model(**k), kw, steps=steps)
    for y, r in zip(outs, ref):
        torch.testing.assert_close(y, r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cache,match", [
    ("turbo", r"preset is one of"),
    ({"rule": "mixcache", "preset": "turbo"}, r"preset 'turbo'"),
    ({"rule": "mixcache", "budget": -1}, r"budget=-1"),
    ({"rule": "mixcache", "budget": float("inf")}, r"budget=inf: must be a finite number"),
    ({"rule": "mixcache", "max_reuse": None}, r"max_reuse=None: must be an integer >= 1"),
    ({"rule": "mixcache", "warmup": 1.0}, r"warmup=1.0: must be a number in \[0, 1\)"),
    ({"rule": "mixcache", "granularities": ["layer"]}, r"granularities"),
    ([{"rule": "mixcache"}, {"rule": "first_block", "threshold": 0.1}], r"give it alone"),
    ({"rule": "mixcache", "preset": ["fast"]}, r"preset \['fast'\]: must be one of"),
    ([], r"non-empty list"),
])
def test_bad_mixcache_options(cache, match):
    """Said before the model is seen, as the backend's options are parsed (through torch.compile
    in test_backend)."""
    with pytest.raises(PolicyError, match=match):
        make_policy(cache, None)


def test_residual_step_reuse_takes_no_extrapolation_from_the_preset():
    """``step_mode: "residual"`` adds the last computed change over the latent as it is: no
    extrapolation applies. Asked of a preset, whose step reuse extrapolates its outputs, it was
    refused for an ``extrapolate=2`` never given (and so with step reuse off, while a warning said
    the key did nothing). The preset's order is not taken; one given with it is still refused."""
    policy = make_policy({"rule": "mixcache", "step_mode": "residual"}, None)
    assert policy.step_mode == "residual" and policy.extrapolate == 0
    with pytest.raises(PolicyError, match=r"extrapolate=2 with step_mode='residual'"):
        make_policy({"rule": "mixcache", "step_mode": "residual", "extrapolate": 2}, None)


def test_a_list_of_one_mixcache_rule_is_that_rule():
    """Once refused with "give it alone", which it was."""
    from dit_compile.runtime.mixcache import MixCache
    policy = make_policy([{"rule": "mixcache", "budget": 0.01}], None)
    assert isinstance(policy, MixCache) and policy.budget == 0.01


def test_on_batch_halves_a_step_reuse_that_fits_wins_over_a_cfg_reuse_of_half_the_saving():
    """A call that batches both guidance branches: cfg reuse computes one half of it, step reuse
    none. The smaller estimate won, so a cfg reuse saving half the call was taken over a step
    reuse saving all of it that fitted as well (SD3 at 20 steps under "fast" computed 0.65 of
    the FLOPs with cfg allowed beside step reuse, 0.35 without). The reuse that saves the most
    and fits is taken, as the README says: cfg only where the step does not fit."""
    def state(cfg_rate):
        st_ = CacheState()
        st_.begin(1000.0, "sig")
        st_.t_first = 1000.0
        bc = st_.branch(0)
        bc.signals.update(settled=True, out_rate=1e-4, prev_t=600.0)
        bc.outputs = [(600.0, [torch.zeros(2, 2)])]
        st_.cfg_diff[0] = [torch.zeros(1, 2)]
        st_.signals["cfg"] = {0: {"rate": cfg_rate, "t": 600.0}}
        return st_

    def decide(granularities, cfg_rate):
        pol = make_mixcache({"budget": 0.01, "warmup": 0.0, "settle": 10.0,
                             "granularities": granularities})
        return pol.step(Step(0, 5, 0, 500.0, halves=True, groups=2), state(cfg_rate),
                        torch.zeros(2))
    action, step_err = decide(["step"], 1.0)
    assert action == "step"
    action, per_rate = decide(["cfg"], 1e-6)
    assert action == "cfg"
    for share in (0.7, 0.1):    # the cfg estimate, as a share of the step's
        assert decide(["step", "cfg"], 1e-6 * share * step_err / per_rate)[0] == "step"


def test_a_block_reuse_shows_the_error_it_spent():
    """The trace's signal of a MixCache block reuse was the probe's change (0.17 on a reuse
    within a budget of 0.05), not its estimated error, the change times the step's length, which
    is what the budget is charged and what a step reuse shows: now each block reuse's signal is
    what it added to ``spent``, within the budget."""
    import os
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
    import pipelines
    model = tiny_models.wan(layers=3)[0]
    compiled = torch.compile(model, backend="mixcache", options={"regions": "eager", "cache": {
        "rule": "mixcache", "granularities": ["block"], "budget": 0.05, "settle": 50.0,
        "max_reuse": 2}})
    pipe = pipelines.wan_pipeline(compiled)
    pipe.set_progress_bar_config(disable=True)
    pipelines.run_wan(pipe, steps=8, size=16, frames=1)
    trace = dit_compile.stats(compiled)["trace"]
    spent, reuses = {}, 0
    for r in trace:
        if r["action"] == "block":
            reuses += 1
            assert r["signal"] == pytest.approx(r["spent"] - spent.get(r["branch"], 0.0), rel=1e-5)
            assert r["spent"] <= 0.05
        spent[r["branch"]] = r["spent"]
    assert reuses >= 4, trace


def test_a_computed_call_shows_the_smallest_estimate_that_did_not_fit(monkeypatch):
    """The README: on a computed call the trace's signal is the smallest of MixCache's estimates
    (step, block) that did not fit, whichever granularity gave it: how far the call was from
    reusing (the largest overstated it)."""
    from dit_compile.runtime.mixcache import MixCache
    estimates = {2: (0.3, 0.1), 3: (0.1, 0.3)}      # step -> (step's estimate, block's)

    def step(self, s, st_, latent):
        return "compute", estimates.get(s.step, (None, None))[0]

    def block(self, s, st_, bc, probe):
        return False, estimates.get(s.step, (None, None))[1]
    monkeypatch.setattr(MixCache, "step", step)
    monkeypatch.setattr(MixCache, "block", block)
    model, kw = tiny_models.wan(layers=3)
    kw["return_dict"] = False
    f = compiled(model, {"rule": "mixcache", "granularities": ["step", "block"]})
    generation(f, kw, steps=STEPS[:4], branches=1)
    trace = dit_compile.stats(f)["trace"]
    assert [r["action"] for r in trace] == ["compute"] * 4
    assert [r["signal"] for r in trace[2:]] == [pytest.approx(0.1), pytest.approx(0.1)]


def test_reuse_is_allowed_from_exactly_the_end_of_the_warm_up():
    """The README: reuse from the first step at or below (1 - warmup) of the generation's
    first timestep; not above it."""
    from dit_compile.runtime.cache import BranchCache
    policy = make_mixcache({"budget": 1.0, "warmup": 0.5, "settle": 10.0})
    st, bc = CacheState(), BranchCache()
    st.t_first = 1000.0
    bc.signals["settled"] = True
    assert policy._allowed(Step(0, 5, 0, 500.0), st, bc, 1).tolist() == [True]
    assert policy._allowed(Step(0, 4, 0, 500.5), st, bc, 1).tolist() == [False]
