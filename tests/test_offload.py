"""Hooks that move a model's weights, around a mixcache-compiled transformer in diffusers' pipelines.

accelerate's offload hook is what ``pipe.enable_model_cpu_offload()`` puts on each model; that
method needs an accelerator, so the hook is added here as it adds it (``cpu_offload_with_hook``),
with the CPU as the execution device. diffusers' group offloading breaks the forward at every
group by design.
"""
import copy
import os
import sys
import warnings

import pytest
import torch

import dit_compile
import tiny_models
from reference_cache import Reference

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
import pipelines  # noqa: E402

accelerate = pytest.importorskip("accelerate")

SCHED = dict(step=[2, 5], cfg=[3], block=[4, 6])
CPU = torch.device("cpu")


def _offloaded(module):
    """``module`` behind accelerate's offload hook, as enable_model_cpu_offload wraps each model."""
    return accelerate.cpu_offload_with_hook(module, execution_device=CPU)[0]


def _wan_pipe(model):
    pipe = pipelines.wan_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _reference(model):
    """WanPipeline's output with the eager reference of SCHED as its transformer."""
    ref = Reference(model, **SCHED).start(float("inf"))
    shell = copy.deepcopy(model)
    shell.forward = lambda **kw: (ref(**kw),)
    return pipelines.run_wan(_wan_pipe(shell))


@pytest.mark.parametrize("hook_first", [True, False])
def test_an_offloaded_transformer_is_cached_in_either_order(hook_first):
    """With the hook added before torch.compile, Dynamo runs the hook's pre_forward outside the
    graph (accelerate disables it for Dynamo) and traces the rest of the hook's wrapper, the whole
    forward, as one graph of a resumed frame. That graph was taken for a fragment of a broken
    forward and ran uncached. In either order, WanPipeline's output (the two guidance branches
    called apart) equals the eager reference of the same forced schedule, with nothing to warn."""
    model = tiny_models.wan(layers=4)[0]
    ref = _reference(model)
    full = pipelines.run_wan(_wan_pipe(model))
    assert (ref - full).abs().max() > 1e-3, "the schedule must change the result for the test to bite"
    torch._dynamo.reset()
    options = {"regions": "eager", "cache": {"rule": "schedule", **SCHED}}
    if hook_first:
        compiled = torch.compile(_offloaded(model), backend="mixcache", options=options)
    else:
        compiled = _offloaded(torch.compile(model, backend="mixcache", options=options))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="mixcache")
        out = pipelines.run_wan(_wan_pipe(compiled))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    actions = {r["action"] for r in dit_compile.stats(compiled)["trace"]}
    assert actions == {"compute", "step", "cfg", "block"}


def test_explain_reads_an_offloaded_model_as_the_model():
    """Behind the hook (added before compiling), the blocks, the inputs and no other conditions:
    the model's buffers, reached through the hook's ``module`` argument, are the model's, not
    conditions of the call to watch for a switch."""
    model, kw = tiny_models.wan(layers=3)
    plain = str(dit_compile.explain(model, **kw))
    hooked = str(dit_compile.explain(_offloaded(model), **kw))
    for report in (plain, hooked):
        assert "3 blocks" in report and "latent=" in report and "timestep=" in report
        assert "other conditions" not in report, report


def test_an_offloaded_model_with_a_break_inside_its_forward_stays_uncached():
    """The hook's wrapper resumed, but the forward breaks inside (a block Dynamo cannot trace):
    the graphs are fragments, nothing is cached, and the pipeline's output is eager's."""
    model = tiny_models.wan(layers=4)[0]
    full = pipelines.run_wan(_wan_pipe(model))
    block = model.blocks[1]
    traced = block.forward

    def untraceable(*args, **kwargs):
        torch._dynamo.graph_break()
        return traced(*args, **kwargs)

    block.forward = untraceable
    torch._dynamo.reset()
    compiled = torch.compile(_offloaded(model), backend="mixcache",
                             options={"regions": "eager", "cache": {"rule": "schedule", **SCHED}})
    with pytest.warns(UserWarning, match="graph breaks split its forward"):
        out = pipelines.run_wan(_wan_pipe(compiled))
    torch.testing.assert_close(out, full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("hook_first", [True, False])
def test_batched_cfg_under_an_offload_hook(hook_first):
    """CogVideoXPipeline batches both guidance branches into one call. Hook added after
    torch.compile: cfg reuse computes half the batch, equal to the eager reference. Hook added
    before: the traced frame is the hook's, whose arguments the half-batch forward cannot read;
    the warning names the hook and the order that works, and the full batch is computed."""
    from reference_cache import BatchedCfgReference
    steps, cfg = 5, [1, 3, 4]
    model = pipelines.cogvideox_transformer()

    def run(transformer):
        pipe = pipelines.cogvideox_pipeline(transformer)
        pipe.set_progress_bar_config(disable=True)
        return pipelines.run_cogvideox(pipe, steps)

    ref = run(BatchedCfgReference(model, cfg=cfg).model)
    full = run(model)
    torch._dynamo.reset()
    options = {"regions": "eager", "cache": {"rule": "schedule", "cfg": cfg}}
    if hook_first:
        compiled = torch.compile(_offloaded(model), backend="mixcache", options=options)
        with pytest.warns(UserWarning, match="added before torch.compile"):
            out = run(compiled)
        torch.testing.assert_close(out, full, rtol=1e-5, atol=1e-5)
    else:
        compiled = _offloaded(torch.compile(model, backend="mixcache", options=options))
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message="mixcache")
            out = run(compiled)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        assert [r["flops"] for r in dit_compile.stats(compiled)["trace"]] == [
            0.5 if i in cfg else 1.0 for i in range(steps)]


def test_group_offloading_is_named_as_what_breaks_the_forward():
    """Group offloading moves weights in hooks diffusers keeps out of the graph, at every group:
    the forward breaks into fragments and runs uncached. The warning names group offloading and
    the offload that keeps the forward whole; the output is eager's."""
    model = tiny_models.wan(layers=3)[0]
    full = pipelines.run_wan(_wan_pipe(model), steps=4)
    model.enable_group_offload(CPU, offload_device=CPU, offload_type="block_level",
                               num_blocks_per_group=1)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="mixcache",
                             options={"regions": "eager", "cache": {"rule": "schedule", **SCHED}})
    with pytest.warns(UserWarning, match=r"group offloading is on .*enable_model_cpu_offload"):
        out = pipelines.run_wan(_wan_pipe(compiled), steps=4)
    torch.testing.assert_close(out, full, rtol=1e-5, atol=1e-5)
