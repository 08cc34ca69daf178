"""``background_compile``: the regions compile in a child process while the model runs uncompiled,
and switch to Inductor's code once ready; a failed child is a warning and a compile here."""
import os
import sys
import warnings

import pytest
import torch

import dit_compile
import tiny_models
from dit_compile.notes import notes
from dit_compile.runtime import background


def _pieces(model):
    return sorted(notes(model).background, key=lambda p: p.index)


def _blocks_in_background():
    """A 2-block Wan, uncached, whose blocks (one piece) compile in the background."""
    model, kw = tiny_models.wan(layers=2)
    return model, kw, torch.compile(model, backend="mixcache", options={
        "cache": None, "regions": "blocks", "background_compile": True})


def test_regions_run_uncompiled_until_the_child_is_done_then_compiled(monkeypatch):
    """And plain Inductor's compile where the region pass finds no blocks (with its warning): an
    MLP; and a graph holding this package's own op (HiDream's lowered MoE dispatch), which the
    child imports the package for: their children compiling beside the Wan's."""
    monkeypatch.setattr(background, "MAX_CHILDREN", 3)
    # dynamic=False: on torch 2.11 diffusers' forwards share a wrapper's code, and the second
    # model compiled would be traced with dynamic sizes, which compile in the process.
    hidream, hd_kw = tiny_models.hidream(patchified=True)
    dit_compile.lower_moe(hidream)
    compiled_hd = torch.compile(hidream, backend="mixcache", fullgraph=True, dynamic=False,
                                options={"cache": None, "regions": "blocks",
                                         "background_compile": True})
    with torch.no_grad():
        hd_first = compiled_hd(**hd_kw, return_dict=False)[0]
        hd_ref = hidream(**hd_kw, return_dict=False)[0]
    model, kw = tiny_models.wan(layers=3)
    compiled = torch.compile(model, backend="mixcache", dynamic=False,
                             options={"cache": None, "background_compile": True})
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU(), torch.nn.Linear(8, 8))
    x = torch.randn(2, 8)
    compiled_mlp = torch.compile(mlp, backend="mixcache", dynamic=False,
                                 options={"background_compile": True})
    with torch.no_grad():
        with pytest.warns(UserWarning, match="no nn.ModuleList"):
            mlp_first = compiled_mlp(x)
        ref = model(**kw, return_dict=False)[0]
        first = compiled(**kw, return_dict=False)[0]
        pieces = _pieces(model)
        # The child starts Python and torch before it compiles anything: the first call cannot
        # have waited for it. Prologue, block (three calls, one artifact) and epilogue.
        assert [p.eager_calls for p in pieces] == [3, 1, 1]
        assert all(p.fn is None for p in pieces)
        torch.testing.assert_close(first, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mlp_first, mlp(x))
        (mlp_piece,) = notes(mlp).background
        assert mlp_piece.eager_calls == 1 and mlp_piece.fn is None

        assert dit_compile.wait_for_compiles(compiled) == 3
        assert dit_compile.wait_for_compiles(compiled_mlp) == 1
        later = compiled(**kw, return_dict=False)[0]
        torch.testing.assert_close(compiled_mlp(x), mlp(x))
    assert all(p.fn is not None for p in pieces) and mlp_piece.fn is not None
    assert [p.eager_calls for p in pieces] == [3, 1, 1]          # none since the switch
    assert mlp_piece.eager_calls == 1
    torch.testing.assert_close(later, ref, rtol=1e-5, atol=1e-5)
    assert dit_compile.wait_for_compiles(compiled_hd) == 2        # its two kinds of block
    with torch.no_grad():
        hd_later = compiled_hd(**hd_kw, return_dict=False)[0]
    torch.testing.assert_close(hd_first, hd_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hd_later, hd_ref, rtol=1e-5, atol=1e-5)
    assert dit_compile.wait_for_compiles(torch.nn.Linear(2, 2)) == 0     # nothing to wait for
    # A model compiled in the background copies and saves (its pieces hold the child's pipe:
    # deepcopy raised 'cannot pickle _io.BufferedWriter'), the copy holding none of them.
    import copy
    import io
    twin = copy.deepcopy(model)
    saved = io.BytesIO()
    torch.save(model, saved)
    saved.seek(0)
    loaded = torch.load(saved, weights_only=False)
    assert len(notes(twin).background) == len(notes(loaded).background) == 0
    assert notes(twin).blocks == notes(loaded).blocks == notes(model).blocks == 3     # the rest go along
    with torch.no_grad():
        torch.testing.assert_close(twin(**kw, return_dict=False)[0], ref, rtol=1e-5, atol=1e-5)


def test_a_failed_child_is_a_warning_and_the_piece_compiles_here(monkeypatch):
    monkeypatch.setattr(background, "WORKER",
                        [sys.executable, "-c", "import sys; sys.exit('no compiler here')"])
    model, kw, compiled = _blocks_in_background()
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ref = model(**kw, return_dict=False)[0]
        compiled(**kw, return_dict=False)           # the child may fail before or after this
        dit_compile.wait_for_compiles(compiled)
        out = compiled(**kw, return_dict=False)[0]
    failed = [str(w.message) for w in caught if "background compile failed" in str(w.message)]
    assert len(failed) == 1 and "no compiler here" in failed[0]
    (piece,) = _pieces(model)
    assert piece.fn is not None         # compiled here: the child saved nothing
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_a_graph_that_cannot_go_to_a_child_or_finds_no_room_compiles_now(monkeypatch):
    def refuse(*args, **kwargs):
        raise TypeError("cannot pickle 'Thing' object")
    monkeypatch.setattr(background, "Job", refuse)
    model, kw, compiled = _blocks_in_background()
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = compiled(**kw, return_dict=False)[0]
        ref = model(**kw, return_dict=False)[0]
    assert any("cannot compile in the background (TypeError: cannot pickle 'Thing' object); "
               "compiling now" in str(w.message) for w in caught)
    assert notes(model).background is None          # nothing left to wait for
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)

    # Nor past the children that may compile at once: silently, as without the option.
    monkeypatch.undo()
    monkeypatch.setattr(background, "MAX_CHILDREN", 0)
    torch._dynamo.reset()
    model, kw, compiled = _blocks_in_background()
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = compiled(**kw, return_dict=False)[0]
    assert not [w for w in caught if "mixcache" in str(w.message)]
    assert notes(model).background is None
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_a_child_compiles_as_this_process_would_for_every_model_and_ends_with_it(monkeypatch):
    """Inductor's settings made here (``torch._inductor.config``) reach the child, which compiled
    with its defaults. A second model of the class runs the graph the first one's call compiled:
    ``wait_for_compiles`` of it waits for that graph's child too (it returned 0, and the model ran
    uncompiled). A child stops, its folder removed, once this process's end of its stdin closes,
    as it does when this process dies (one killed mid-compile left it compiling, and its folder
    behind)."""
    from torch._inductor import config
    model, kw, compiled = _blocks_in_background()
    twin, _ = tiny_models.wan(layers=2)
    compiled_twin = torch.compile(twin, backend="mixcache", options={
        "cache": None, "regions": "blocks", "background_compile": True})
    with torch.no_grad():
        compiled(**kw, return_dict=False)
        compiled_twin(**kw, return_dict=False)      # the graph the first call compiled
        assert dit_compile.wait_for_compiles(compiled_twin) == 1
        out, ref = compiled_twin(**kw, return_dict=False)[0], twin(**kw, return_dict=False)[0]
    assert all(p.fn is not None for p in _pieces(model))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)

    graph = torch.fx.symbolic_trace(lambda x: x + 1)
    monkeypatch.setattr(background, "WORKER", [
        sys.executable, "-c", "import runpy, sys; runpy.run_path(sys.argv[1])['child'](sys.argv[2]);"
        " import torch._inductor.config as c; print('comment_origin', c.comment_origin)",
        background.__file__])
    with config.patch({"comment_origin": not config.comment_origin}):
        job = background.Job([(graph, [torch.ones(2)])], {}, "test")
    assert job.proc.wait(timeout=120) == 0
    with open(job.log.name) as f:
        assert f"comment_origin {not config.comment_origin}" in f.read()

    monkeypatch.setattr(background, "WORKER", [
        sys.executable, "-c", "import os, runpy, sys, time; runpy.run_path(sys.argv[1])"
        "['_exit_with_parent'](os.path.dirname(sys.argv[2])); time.sleep(120)", background.__file__])
    job = background.Job([(graph, [torch.ones(2)])], {}, "test")
    job.proc.stdin.close()
    assert job.proc.wait(timeout=60) == 1
    assert not os.path.exists(job.folder.name)


def test_a_call_autograd_records_compiles_here_and_its_gradients_are_eagers():
    """The child compiles inference graphs: where autograd records the call (training), a piece
    it compiled would switch in with no backward (the loss then has no grad_fn). Such pieces
    compile in this process, nothing is left to wait for, and the gradients are eager's."""
    import copy
    model, kw, compiled = _blocks_in_background()
    model.train()
    ref = copy.deepcopy(model)
    compiled(**kw, return_dict=False)[0].square().mean().backward()
    assert dit_compile.wait_for_compiles(compiled) == 0
    assert notes(model).background is None
    model.zero_grad(set_to_none=True)
    out = compiled(**kw, return_dict=False)[0]
    out.square().mean().backward()
    want = ref(**kw, return_dict=False)[0]
    want.square().mean().backward()
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.gpu
def test_a_cuda_model_compiles_in_the_background_as_in_the_process():
    """The child compiles for the device the pieces' inputs are on (Triton there), bf16."""
    model, kw = tiny_models.wan(layers=3)
    model = model.to("cuda", torch.bfloat16)
    kw = {k: v.to("cuda", torch.bfloat16) for k, v in kw.items()}
    with torch.no_grad():
        want = torch.compile(model, backend="mixcache", options={"cache": None})(
            **kw, return_dict=False)[0]
    torch._dynamo.reset()                       # the same forward, compiled afresh
    dit_compile.frames.install_trace_hook()     # which the reset dropped
    there = torch.compile(model, backend="mixcache",
                          options={"cache": None, "background_compile": True})
    with torch.no_grad():
        there(**kw, return_dict=False)
        assert dit_compile.wait_for_compiles(there) == 3
        got = there(**kw, return_dict=False)[0]
    assert all(p.fn is not None for p in _pieces(model))
    # The same graph compiled elsewhere; Triton's autotuning may pick other configs there.
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)

