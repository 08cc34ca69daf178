"""Ahead-of-time export: the rewritten model saved as torch.export programs + plan + tensors, and
loaded without the model's source."""
import copy
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import warnings

import pytest
import torch

import dit_compile
import test_mutation
import test_zoo
import tiny_models
import zoo_image
import zoo_video

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
import pipelines  # noqa: E402

SCHEDULE = {"rule": "schedule", "step": [2], "cfg": [3], "block": [4]}


def calls(kw: dict, steps: int = 6, rising: bool = False):
    """A generation as WanPipeline makes it: two guidance branches (another text) per timestep;
    ``rising``: the timestep as 1 - sigma, as ZImagePipeline passes it."""
    other = torch.randn_like(kw["encoder_hidden_states"])
    for i, t in enumerate(torch.linspace(900, 100, steps)):
        x = kw["hidden_states"] * (1 - i / 10)
        t = 1 - t / 1000 if rising else t
        for text in (kw["encoder_hidden_states"], other):
            yield dict(hidden_states=x, timestep=t.reshape(1), encoder_hidden_states=text)


@pytest.mark.parametrize("nested", [False, True, "stamped"])
def test_exported_model_matches_eager(tmp_path, nested):
    """``nested``: the blocks nested (``nest_blocks``), so that they reach the backend as
    invoke_subgraph calls; they export as one shared program all the same. Stamped blocks
    (mixcache's compile stamps them) are traced by the export as nested ones."""
    model, kw = tiny_models.wan(layers=3)
    if nested:
        dit_compile.nest_blocks(model, stamp=nested == "stamped")
    dit_compile.export(model, str(tmp_path), {**kw, "return_dict": False}, {"cache": None})
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    # prologue, one block for the three, epilogue
    assert len(set(manifest["programs"])) == 3 and len(manifest["programs"]) == 5
    loaded = dit_compile.load(str(tmp_path))
    with torch.no_grad():
        for call in calls(kw, steps=2):
            torch.testing.assert_close(loaded(**call, return_dict=False)[0],
                                       model(**call, return_dict=False)[0],
                                       rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rising", [False, True], ids=["falling", "rising"])
def test_exported_model_caches_as_the_backend_does(tmp_path, rising):
    """``rising``: the option timestep='rising' is saved with the model and read back, given as
    an ``Options`` (which broke writing the manifest). Falling: calls autograd records run
    uncached, those under no_grad cached whatever their inputs require."""
    model, kw = tiny_models.wan(layers=4)
    options = {"cache": SCHEDULE, "regions": "eager", **({"timestep": "rising"} if rising else {})}
    dit_compile.export(model, str(tmp_path), {**kw, "return_dict": False},
                       dit_compile.Options(**options) if rising else options)
    loaded = dit_compile.load(str(tmp_path))
    compiled = torch.compile(model, backend="mixcache", options=options)
    with torch.no_grad():
        for call in calls(kw, rising=rising):
            torch.testing.assert_close(loaded(**call, return_dict=False)[0],
                                       compiled(**call, return_dict=False)[0],
                                       rtol=1e-5, atol=1e-5)
    got = [(r["step"], r["branch"], r["action"]) for r in dit_compile.stats(loaded)["trace"]]
    assert got == [(r["step"], r["branch"], r["action"]) for r in dit_compile.stats(model)["trace"]]
    assert {"step", "cfg", "block"} <= {a for _, _, a in got}
    dit_compile.reset(loaded)
    with pytest.raises(ValueError, match="no mixcache state"):
        dit_compile.stats(torch.nn.Linear(2, 2))
    assert dit_compile.stats(loaded)["calls"] == 0
    if rising:
        return
    # Where autograd records the call, nothing is reused (a reused output would be another
    # call's, with its graph), as the backend does, said once: each call equals eager.
    with pytest.warns(UserWarning, match="autograd records") as told:
        for call in calls(kw, steps=3):
            x = call["hidden_states"].clone().requires_grad_()
            torch.testing.assert_close(loaded(**dict(call, hidden_states=x), return_dict=False)[0],
                                       model(**dict(call, hidden_states=x), return_dict=False)[0],
                                       rtol=1e-5, atol=1e-5)
    assert len([w for w in told if "autograd" in str(w.message)]) == 1
    # Only a call autograd records runs uncached: under torch.no_grad() an input that requires
    # grad records nothing, so the cache runs (and nothing is said).
    dit_compile.reset(loaded)
    with warnings.catch_warnings(record=True) as told, torch.no_grad():
        warnings.simplefilter("always")
        for call in calls(kw):
            loaded(**dict(call, hidden_states=call["hidden_states"].clone().requires_grad_()),
                   return_dict=False)
    assert not [w for w in told if "autograd records" in str(w.message)]
    assert {"step", "cfg", "block"} <= {r["action"] for r in dit_compile.stats(loaded)["trace"]}


def test_exported_model_takes_the_pipelines_transformer_slot(tmp_path):
    """In diffusers' own WanPipeline, the loaded model with the default cache gives what the
    backend gives with it (the pipeline reads its config, dtype, device, cache_context)."""
    model, _ = tiny_models.wan(layers=3)
    call = dict(hidden_states=torch.randn(1, 4, 2, 8, 8), timestep=torch.tensor([999.0]),
                encoder_hidden_states=torch.randn(1, 8, 16), return_dict=False)  # run_wan's shapes
    dit_compile.export(model, str(tmp_path), call, {"regions": "eager"})
    pipe = pipelines.wan_pipeline(dit_compile.load(str(tmp_path)))
    pipe.set_progress_bar_config(disable=True)
    out = pipelines.run_wan(pipe, steps=8)
    reference = pipelines.wan_pipeline(
        torch.compile(model, backend="mixcache", options={"regions": "eager"}))
    reference.set_progress_bar_config(disable=True)
    torch.testing.assert_close(out, pipelines.run_wan(reference, steps=8), rtol=1e-5, atol=1e-5)
    assert dit_compile.stats(pipe.transformer)["reused"], "the default cache reused nothing"


def test_exported_pair_takes_the_online_sketch_render_split(tmp_path):
    """Deployed, both models of the sketch/render split are loaded from their exports: the online
    split (``Settle``) runs them in the pipeline as it runs the models themselves."""
    large, _ = tiny_models.wan(layers=3)
    torch.manual_seed(1)
    small = type(large).from_config({**large.config, "num_layers": 2}).eval()
    call = dict(hidden_states=torch.randn(1, 4, 2, 8, 8), timestep=torch.tensor([999.0]),
                encoder_hidden_states=torch.randn(1, 8, 16), return_dict=False)  # run_wan's shapes
    for name, model in (("large", large), ("small", small)):
        dit_compile.export(model, str(tmp_path / name), call, {"cache": None, "regions": "eager"})
    rule = dit_compile.Settle(float("inf"), 0.3)
    loaded = [dit_compile.load(str(tmp_path / name)) for name in ("large", "small")]
    splits = []
    for big, little in ((large, small), loaded):
        pipe = pipelines.wan_pipeline(big)
        pipe.set_progress_bar_config(disable=True)
        splits.append(dit_compile.sketch_render(pipe, little, rule))
    with torch.no_grad():
        ref = pipelines.run_wan(splits[0], steps=8)
    out = pipelines.run_wan(splits[1], steps=8)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert splits[1].transformer.switches == splits[0].transformer.switches != [None]


def test_calibration_measures_a_loaded_model_uncached(tmp_path):
    """calibrate_split looks through a compiled model's cache; a loaded one (default cache) it
    measured through its cache, distances of reused steps, and left it a generation's state."""
    large, _ = tiny_models.wan(layers=3)
    torch.manual_seed(1)
    small = type(large).from_config({**large.config, "num_layers": 2}).eval()
    call = dict(hidden_states=torch.randn(1, 4, 2, 8, 8), timestep=torch.tensor([999.0]),
                encoder_hidden_states=torch.randn(1, 8, 16), return_dict=False)  # run_wan's shapes
    dit_compile.export(small, str(tmp_path), call, {"cache": SCHEDULE})
    loaded = dit_compile.load(str(tmp_path))
    pipe = pipelines.wan_pipeline(large)
    pipe.set_progress_bar_config(disable=True)
    run = dict(prompt_embeds=call["encoder_hidden_states"], height=64, width=64, num_frames=5,
               negative_prompt_embeds=torch.randn(1, 8, 16), num_inference_steps=6,
               guidance_scale=5.0, output_type="latent", latents=torch.randn(1, 4, 2, 8, 8))
    with torch.no_grad():
        loaded(**call)      # its cache state, which calibration must leave as it is
    cal = [dit_compile.calibrate_split(pipe, m, [run], 0.05) for m in (small, loaded)]
    assert cal[1].distances == pytest.approx(cal[0].distances, rel=1e-4, abs=1e-6)
    assert dit_compile.stats(loaded)["calls"] == 1, "calibration ran through the cache"


def test_an_exported_model_takes_zimage_pipelines_slot(tmp_path):
    """ZImagePipeline reads its transformer's ``in_channels`` (an attribute, not in its config)
    and passes the latents, timestep and captions by position: the loaded model has the one and
    takes the other, and under the default timestep='auto' learns the rise from the pipeline's
    sampler as the backend does: the same steps reused, the same outputs."""
    model, _ = tiny_models.zimage()
    pipe = pipelines.zimage_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    call = {}

    def first_call(_, args, kwargs):
        if not call:
            call.update(zip(("x", "t", "cap_feats"), args), **kwargs)
    hook = model.register_forward_pre_hook(first_call, with_kwargs=True)
    pipelines.run_zimage(pipe, 2)       # the pipeline's call, to export; builds the rotary table
    hook.remove()
    schedule = {"rule": "schedule", "step": [2, 4], "block": [3]}
    dit_compile.export(model, str(tmp_path), call, {"cache": schedule})
    pipe.transformer = dit_compile.load(str(tmp_path))
    out = pipelines.run_zimage(pipe, 6)
    got = [(r["step"], r["action"]) for r in dit_compile.stats(pipe.transformer)["trace"]]
    pipe.transformer = torch.compile(model, backend="mixcache",
                                     options={"regions": "eager", "cache": schedule})
    torch.testing.assert_close(out, pipelines.run_zimage(pipe, 6), rtol=1e-5, atol=1e-5)
    assert got == [(r["step"], r["action"]) for r in dit_compile.stats(model)["trace"]] == [
        (i, a) for i, a in enumerate(["compute", "compute", "step", "block", "step", "compute"])]


def test_loading_needs_no_model_source(tmp_path):
    """Nor an unsafe unpickling, even where the model ran under the backend before its export
    (its cache state, hung on a parameter, went into the programs' example inputs)."""
    model, kw = tiny_models.wan(layers=3)
    with torch.no_grad():
        torch.compile(model, backend="mixcache", options={"regions": "eager"})(**kw)
    dit_compile.export(model, str(tmp_path / "m"), {**kw, "return_dict": False}, {"cache": None})
    torch.save({k: v for k, v in kw.items()}, tmp_path / "inputs.pt")
    with torch.no_grad():
        torch.save(model(**kw, return_dict=False)[0], tmp_path / "ref.pt")
    script = (
        "import sys, torch, dit_compile\n"
        f"m = dit_compile.load({str(tmp_path / 'm')!r})\n"
        f"out = m(**torch.load({str(tmp_path / 'inputs.pt')!r}), return_dict=False)[0]\n"
        f"torch.testing.assert_close(out, torch.load({str(tmp_path / 'ref.pt')!r}))\n"
        "assert 'diffusers' not in sys.modules, 'the model source was imported'\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=os.path.dirname(__file__),
                          env={**os.environ, "PYTHONWARNINGS": "ignore",
                               "TORCH_FORCE_WEIGHTS_ONLY_LOAD": "1"})
    assert done.returncode == 0, done.stderr[-2000:]


def test_inputs_inside_tuples_are_found(tmp_path):
    """Kandinsky 5 takes its rotary positions as tuples of tensors: each leaf is an input."""
    model, kw = tiny_models.kandinsky5()
    dit_compile.export(model, str(tmp_path), {**kw, "return_dict": False}, {"cache": None})
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert any(len(s.get("argument", [])) > 1 for s in manifest["inputs"])
    with torch.no_grad():
        torch.testing.assert_close(dit_compile.load(str(tmp_path))(**kw, return_dict=False)[0],
                                   model(**kw, return_dict=False)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["motif_video", "mochi"])
def test_graphs_torch_cannot_save_as_they_are_are_exported(tmp_path, name):
    """``motif_video``: Motif-Video's plan has glue pieces between its stacks with no inputs and no
    outputs, which torch.export.save cannot save: none is saved, and none runs. ``mochi``:
    Dynamo's graph of Mochi holds torch.sym_sum, which torch.export.save cannot serialize: it is
    saved as the additions it sums. (Both exports failed inside torch's serializer.)"""
    model, kw = zoo_video.motif_video() if name == "motif_video" else test_zoo.mochi()
    call = {**kw, "return_dict": False}
    dit_compile.export(model, str(tmp_path), call, {"cache": None})
    if name == "motif_video":
        assert None in json.loads((tmp_path / "manifest.json").read_text())["programs"]
    with torch.no_grad():
        torch.testing.assert_close(dit_compile.load(str(tmp_path))(**call)[0], model(**call)[0],
                                   rtol=1e-5, atol=1e-5)


def test_a_last_block_read_in_part_runs_its_mates_program(tmp_path):
    """Only the image tokens of Flux's last single-stream block are read: the export saves no
    program for it, the loaded model runs its mate's and keeps that output."""
    model, kw = tiny_models.flux()
    kw["return_dict"] = False
    dit_compile.export(model, str(tmp_path), kw, {"cache": None})
    uses = json.loads((tmp_path / "manifest.json").read_text())["programs"]
    # prologue, a double-stream block for both, a single-stream block for both, epilogue
    assert len(uses) == 6 and len(list(tmp_path.glob("program_*.pt2"))) == 4, uses
    assert uses[4] == [uses[3], [1], True], uses
    with torch.no_grad():
        torch.testing.assert_close(dit_compile.load(str(tmp_path))(**kw)[0], model(**kw)[0],
                                   rtol=1e-5, atol=1e-5)


def test_a_plain_value_beside_tensors_in_a_keyword_is_checked(tmp_path):
    """A LoRA ``scale`` beside a tensor in ``joint_attention_kwargs`` was checked by its type
    alone: a call at scale 1.0 ran the programs traced at 0.5 (0.03 off eager with an adapter),
    silently, where without the tensor the same call is refused."""
    model, kw = tiny_models.flux()
    tokens = kw["hidden_states"].shape[1] + kw["encoder_hidden_states"].shape[1]
    mask = torch.ones(1, 1, 1, tokens, dtype=torch.bool)
    kw = {**kw, "return_dict": False,
          "joint_attention_kwargs": {"scale": 0.5, "attention_mask": mask}}
    dit_compile.export(model, str(tmp_path), kw, {"cache": None})
    loaded = dit_compile.load(str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(loaded(**kw)[0], model(**kw)[0], rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match=r"is \{'scale': 1.0, 'attention_mask': tensor\}; it "
                                             r"was exported as \{'scale': 0.5, 'attention_mask'"):
            loaded(**{**kw, "joint_attention_kwargs": {"scale": 1.0, "attention_mask": mask}})
    # An export saved before the values were kept (type names in their place) is read by type.
    manifest = tmp_path / "manifest.json"
    m = json.loads(manifest.read_text())
    (name, kind), = [(k, v) for k, v in m["keywords"].items() if k == "joint_attention_kwargs"]
    kind["structure"] = {"dict": {"scale": "float", "attention_mask": "tensor"}}
    manifest.write_text(json.dumps(m))
    with torch.no_grad():
        dit_compile.load(str(tmp_path))(
            **{**kw, "joint_attention_kwargs": {"scale": 1.0, "attention_mask": mask}})


def test_moe_model_exports_with_its_dispatch_lowered(tmp_path):
    """HiDream's MoE dispatch would break the trace: export lowers it for the export (the programs
    hold the fused op) and leaves the model as it was; the loaded model computes what it does."""
    from dit_compile.passes.moe import find_moe
    model, kw = tiny_models.hidream(patchified=True)    # as pipelines pass it
    kw["return_dict"] = False
    dit_compile.export(model, str(tmp_path), kw, {"cache": None})
    assert not any(find_moe(model).values()), "the model is left as it was"
    assert sum("moe_ffn" in op for op in _program_ops(tmp_path)) == 2, "one per distinct block"
    with torch.no_grad():
        torch.testing.assert_close(dit_compile.load(str(tmp_path))(**kw)[0],
                                   model(**kw)[0], rtol=1e-5, atol=1e-5)


def _program_ops(path) -> list[str]:
    """The call_function targets of every saved program."""
    ops = []
    for p in sorted(path.glob("program_*.pt2")):
        if p.name.endswith(".aoti.pt2"):
            continue
        ep = torch.export.load(str(p))
        ops += [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    return ops


def test_the_exported_dtype_casts_nothing(tmp_path):
    """pipe.to(torch.bfloat16) casts every component. A bf16 model with modules diffusers keeps
    in float32 (Wan's norms and time embedder) was exported with them so; the loaded model once
    cast them too, then refused to run ("export again in that dtype", which it was)."""
    model, kw = tiny_models.wan()
    model.to(torch.bfloat16)
    for name, module in model.named_modules():
        if name.split(".")[-1] in model._keep_in_fp32_modules:
            module.float()
    kw = {k: v.bfloat16() if k != "timestep" else v for k, v in kw.items()}
    dit_compile.export(model, str(tmp_path), {**kw, "return_dict": False}, {"cache": None})
    loaded = dit_compile.load(str(tmp_path))
    dtypes = sorted({str(w.dtype) for w in loaded.weights.values()})
    assert dtypes == ["torch.bfloat16", "torch.float32"]
    loaded.to("cpu", torch.bfloat16)
    assert sorted({str(w.dtype) for w in loaded.weights.values()}) == dtypes
    with torch.no_grad():
        torch.testing.assert_close(loaded(**kw, return_dict=False)[0],
                                   model(**kw, return_dict=False)[0], rtol=0, atol=0)
    # Cast away (pipe.to(torch.float16)), it cannot run, and says which weight and how back;
    # cast back, each weight is in its exported dtype again (float32 ones were left bf16, and
    # the model could never run again), its values rounded by the casts as the model's own are.
    loaded.to(torch.float16)
    with pytest.raises(ValueError, match=r"weights were cast to torch.float16 .* exported in "
                                         r"\(torch.(bfloat16|float32), there\): "
                                         r"model.to\(torch.bfloat16\) casts each back"):
        loaded(**kw, return_dict=False)
    loaded.to(torch.bfloat16)
    assert sorted({str(w.dtype) for w in loaded.weights.values()}) == dtypes
    with torch.no_grad():
        for w in (*model.parameters(), *model.buffers()):
            if w.is_floating_point():
                w.copy_(w.to(torch.float16))
        torch.testing.assert_close(loaded(**kw, return_dict=False)[0],
                                   model(**kw, return_dict=False)[0], rtol=0, atol=0)


def test_bad_exports_and_calls_are_clear_errors(tmp_path):
    hidream, kw = tiny_models.hidream()
    with pytest.raises(ValueError, match="lower_moe"):
        dit_compile.export(hidream, str(tmp_path / "hd"), {**kw, "return_dict": False},
                           {"lower_moe": False})
    mlp = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="block structure"):
        dit_compile.export(mlp, str(tmp_path / "mlp"), {"input": torch.randn(2, 4)})
    # Export forgets the model's own forward, not what Dynamo compiled of other code.
    traces = []
    other = torch.compile(torch.nn.Linear(2, 2), backend=lambda gm, _: traces.append(gm) or gm)
    other(torch.ones(1, 2))
    model, kw = tiny_models.wan(layers=3)
    model.signature = "the model's own"
    dit_compile.export(model, str(tmp_path / "wan"), {**kw, "return_dict": False}, {"cache": None})
    other(torch.ones(1, 2))
    assert len(traces) == 1, "export made other compiled code trace again"
    loaded = dit_compile.load(str(tmp_path / "wan"))
    # A model attribute saved beside the config never takes the place of the loaded model's own
    # (``signature``, its input signature); the config answers ``hasattr`` as an object does.
    assert loaded.signature != "the model's own"
    with torch.no_grad():
        torch.testing.assert_close(loaded(**kw, return_dict=False)[0],
                                   model(**kw, return_dict=False)[0], rtol=1e-5, atol=1e-5)
    assert hasattr(loaded.config, "patch_size") and not hasattr(loaded.config, "no_such_key")
    saved = json.loads((tmp_path / "wan" / "manifest.json").read_text())["attributes"]
    assert saved and not [k for k in saved if k.startswith("_") or k == "training"]
    # Cast (pipe.to(torch.bfloat16)) and cast back to the exported dtype: the weights are in the
    # dtypes the programs take again.
    loaded.to(torch.bfloat16).to(torch.float32)
    assert {w.dtype for w in loaded.weights.values()} == {torch.float32}
    # A value JSON cannot hold, for a keyword exported as plain data, is refused as such.
    with pytest.raises(ValueError, match="return_dict is a object; it was exported with "
                                         "return_dict=False"):
        loaded(**kw, return_dict=object())
    # The device is the signature's too: a latent elsewhere (here on meta) is refused as such.
    with pytest.raises(ValueError, match=r"hidden_states is \(1, 4, 2, 8, 8\) torch.float32 on "
                                         "meta; it was exported for .* on cpu"):
        loaded(**{**kw, "hidden_states": kw["hidden_states"].to("meta")}, return_dict=False)
    with pytest.raises(TypeError, match="encoder_hidden_states"):
        loaded(hidden_states=kw["hidden_states"], timestep=kw["timestep"])
    # Another signature than the one exported (UniPC's timesteps are int64): an error, not a
    # program reading the wrong dtype.
    with pytest.raises(ValueError, match="timestep is .*int64.*exported for"):
        loaded(**{**kw, "timestep": kw["timestep"].long()}, return_dict=False)
    with pytest.raises(ValueError, match=r"hidden_states is \(1, 4, 2, 8, 16\)"):
        loaded(**{**kw, "hidden_states": torch.randn(1, 4, 2, 8, 16)}, return_dict=False)
    # A keyword the programs were not traced with would change nothing they compute: a tensor
    # absent at export (an image condition), a misspelt name, another plain value. None passes,
    # as pipelines pass their unused optional arguments.
    with pytest.raises(TypeError, match="exported without 'encoder_hidden_states_image'"):
        loaded(**kw, encoder_hidden_states_image=torch.randn(1, 4, 16))
    with pytest.raises(TypeError, match="exported without 'timesteps'"):
        loaded(**{k: v for k, v in kw.items() if k != "timestep"}, timestep=kw["timestep"],
               timesteps=kw["timestep"])
    with pytest.raises(ValueError, match="return_dict is True; it was exported with return_dict="):
        loaded(**kw, return_dict=True)
    loaded(**kw, attention_kwargs=None, return_dict=False)
    # An empty dict is as None: Flux's, Chroma's and QwenImage's pipelines pass their attention
    # kwargs so, and a model exported as the README says refused to run in them. Either way.
    loaded(**kw, attention_kwargs={}, return_dict=False)
    with pytest.raises(TypeError, match="exported without 'attention_kwargs'"):
        loaded(**kw, attention_kwargs={"scale": 0.5}, return_dict=False)
    dit_compile.export(model, str(tmp_path / "empty"),
                       {**kw, "attention_kwargs": {}, "return_dict": False}, {"cache": None})
    empty = dit_compile.load(str(tmp_path / "empty"))
    shutil.rmtree(tmp_path / "empty")     # loaded: its directory is no longer read
    with torch.no_grad():
        for unset in ({}, {"attention_kwargs": None}, {"attention_kwargs": {}}):
            torch.testing.assert_close(empty(**kw, **unset, return_dict=False)[0],
                                       model(**kw, return_dict=False)[0], rtol=1e-5, atol=1e-5)
    # Left out, return_dict is the forward's default (True: an output object), not the export's:
    # the loaded model returned a tuple where DiTPipeline reads .sample.
    with pytest.raises(TypeError, match="return_dict is not given, so the forward's default "
                                        "return_dict=True applies; it was exported with "
                                        "return_dict=False"):
        loaded(**kw)
    # Exported with it True, the saved output type was diffusers' own: load then needed diffusers.
    with pytest.raises(ValueError, match="Transformer2DModelOutput.*export a call with "
                                         "return_dict=False"):
        dit_compile.export(model, str(tmp_path / "dict"), kw, {"cache": None})
    # Arguments by position are named as the model's forward names them (ZImagePipeline passes
    # its latents so); one too many, or one given by keyword too, is an error.
    args = (kw["hidden_states"], kw["timestep"], kw["encoder_hidden_states"])
    torch.testing.assert_close(loaded(*args, return_dict=False)[0],
                               loaded(**kw, return_dict=False)[0], rtol=0, atol=0)
    with pytest.raises(TypeError, match="takes at most 6 positional arguments"):
        loaded(*args, None, False, None, None)
    with pytest.raises(TypeError, match=r"\['timestep'\] by keyword too"):
        loaded(*args[:2], timestep=kw["timestep"], encoder_hidden_states=args[2])
    # Under another autocast state than the export's, the programs would run casts they were
    # not traced for: it was a dtype mismatch from inside a program (and, caching, a reuse of an
    # output computed without autocast).
    with torch.autocast("cpu", torch.bfloat16), pytest.raises(
            ValueError, match="called under autocast\\('cpu', bfloat16\\), but it was exported "
                              "without autocast"):
        loaded(**kw, return_dict=False)
    # A submodule a pipeline reads (LTX-2's transformer.rope) is not exported: said so.
    with pytest.raises(AttributeError, match="'rope'.* needs the model itself"):
        loaded.rope
    # explain would trace the loaded model through its cached runtime: two calls counted.
    with pytest.raises(TypeError, match="loaded export is rewritten already"):
        dit_compile.explain(loaded, **kw)
    # pipe.to(dtype) casts the transformer's weights: the programs take the exported dtype only
    # (it was an error from inside a program, naming a bias).
    with pytest.raises(ValueError, match="weights were cast to torch.bfloat16"):
        loaded.to(torch.bfloat16)(**kw, return_dict=False)
    # An export that fails (a span the block count refutes, known after the trace) leaves the
    # export in its directory as it was: it wrote its programs beside the old manifest.
    with torch.no_grad():
        before = dit_compile.load(str(tmp_path / "wan"))(**kw, return_dict=False)[0]
    cfg = {k: v for k, v in model.config.items() if not k.startswith("_")}
    other = type(model)(**{**cfg, "eps": 0.5}).eval()
    with pytest.raises(ValueError, match="span"):
        dit_compile.export(other, str(tmp_path / "wan"), {**kw, "return_dict": False},
                           {"cache": {"rule": "schedule", "step": [2], "span": [1, 9]}})
    with torch.no_grad():
        torch.testing.assert_close(
            dit_compile.load(str(tmp_path / "wan"))(**kw, return_dict=False)[0], before,
            rtol=0, atol=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wan"], "staging left"
    # A keyword that is a Python object (GLM-Image's KV cache): the programs may depend on its
    # state (the cache's mode), which a call's object was never checked against.
    glm, glm_kw = zoo_image.glm_image()
    with pytest.raises(ValueError, match="kv_caches is a GlmImageKVCache, neither tensors nor "):
        dit_compile.export(glm, str(tmp_path / "glm"), {**glm_kw, "return_dict": False})
    # AnyFlow-FAR's attention mask, a BlockMask: its tensors are attributes of an object, which
    # export cannot take as inputs (it said they were not inside a keyword argument, and to pass
    # them as keyword arguments: they were).
    far, (_, first, _) = test_mutation.anyflow_far()
    mask = far.build_attention_mask(chunk_partition=[1], height=8, width=8, mode="cache",
                                    device=first.device)
    with pytest.raises(ValueError, match="attention_mask is a BlockMask, an object holding "
                                         "tensors in its attributes"):
        dit_compile.export(far, str(tmp_path / "far"), dict(
            hidden_states=first, attention_mask=mask, return_dict=False))
    # A call that stores what it computes into a Python object (SANA-WM's refiner fills the
    # pipeline's KV cache so) besides returning: the loaded model stored nothing, silently.
    kept = []
    hook = model.blocks[0].register_forward_hook(lambda _, __, out: kept.append(out))
    with pytest.raises(ValueError, match="stores 1 tensor"):
        dit_compile.export(model, str(tmp_path / "kept"), {**kw, "return_dict": False})
    hook.remove()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds files and no export"):
        dit_compile.export(model, str(tmp_path / "notes"), {**kw, "return_dict": False})
    manifest = tmp_path / "wan" / "manifest.json"
    # Format 1 (no piece running another's program) is read as it was written.
    manifest.write_text(manifest.read_text().replace('"format": 2', '"format": 1'))
    dit_compile.load(str(tmp_path / "wan"))
    manifest.write_text(manifest.read_text().replace('"format": 1', '"format": 99'))
    with pytest.raises(ValueError, match="format 99"):
        dit_compile.load(str(tmp_path / "wan"))
    with pytest.raises(FileNotFoundError, match=r"no export at .*notes. \(no manifest.json"):
        dit_compile.load(str(tmp_path / "notes"))
    # An export copied part way: each file cut short is named (it raised a bare EOFError, OSError
    # or BadZipFile from deep in torch), and one missing is named too.
    manifest.write_text(manifest.read_text().replace('"format": 99', '"format": 2'))
    for name, keep in (("tensors.pt", 0.0), ("tensors.pt", 0.5), ("program_1.pt2", 0.5),
                       ("manifest.json", 0.5)):
        cut = tmp_path / "cut"
        shutil.rmtree(cut, ignore_errors=True)
        shutil.copytree(tmp_path / "wan", cut)
        data = (cut / name).read_bytes()
        (cut / name).write_bytes(data[:int(len(data) * keep)])
        with pytest.raises(ValueError, match=f"{name} could not be read .*cut short"):
            dit_compile.load(str(cut))
    shutil.rmtree(cut)
    shutil.copytree(tmp_path / "wan", cut)
    (cut / "program_1.pt2").unlink()
    with pytest.raises(FileNotFoundError, match="lacks program_1.pt2"):
        dit_compile.load(str(cut))


def test_an_export_replaces_the_one_before_it_and_never_a_file(tmp_path, monkeypatch):
    """Export replaces the export at its path whole (nothing of it or of the staging left
    beside), makes its directory as os.makedirs would (not mkdtemp's owner-only mode), and
    refuses a path that is a file. The new export is renamed into place after the old one is
    moved aside: where that rename fails, the old export is moved back, whole, and nothing else
    is left."""
    model, kw = tiny_models.wan(layers=3)
    call = {**kw, "return_dict": False}
    target = tmp_path / "wan"
    dit_compile.export(model, str(target), call, {"cache": None})
    with torch.no_grad():
        before = dit_compile.load(str(target))(**call)[0]
    rename = os.rename

    def failing(src, dst):
        if str(src).endswith(".partial"):
            raise OSError("the disk said no")
        rename(src, dst)
    monkeypatch.setattr(os, "rename", failing)
    with pytest.raises(OSError, match="the disk said no"):
        dit_compile.export(model, str(target), call, {"cache": SCHEDULE})
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wan"]
    assert not json.loads((target / "manifest.json").read_text())["guarded"]
    with torch.no_grad():
        torch.testing.assert_close(dit_compile.load(str(target))(**call)[0], before, rtol=0, atol=0)

    dit_compile.export(model, str(target), call, {"cache": SCHEDULE})
    assert json.loads((target / "manifest.json").read_text())["guarded"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wan"], "the old export or staging left"
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o777 & ~umask
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="notes.txt is a file"):
        dit_compile.export(model, str(tmp_path / "notes.txt"), call)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_a_loaded_model_deep_copies_with_a_cache_of_its_own_and_does_not_pickle(tmp_path):
    """Pickling a loaded export (torch.save too) is a clear error pointing to its directory;
    copy.deepcopy gives a model with its own cache state: calls of the two interleaved run each
    its own generation, and both cache as the original alone did."""
    model, kw = tiny_models.wan(layers=3)
    dit_compile.export(model, str(tmp_path), {**kw, "return_dict": False}, {"cache": SCHEDULE})
    loaded = dit_compile.load(str(tmp_path))
    for dump in (pickle.dumps, lambda m: torch.save(m, io.BytesIO())):
        with pytest.raises(TypeError, match="a loaded export does not pickle .* dit_compile.load "
                                            "it again"):
            dump(loaded)
    generation = list(calls(kw))
    with torch.no_grad():
        alone = [loaded(**c, return_dict=False)[0] for c in generation]
        expected = [(r["step"], r["branch"], r["action"]) for r in dit_compile.stats(loaded)["trace"]]
        dit_compile.reset(loaded)
        twin = copy.deepcopy(loaded)
        for c, out in zip(generation, alone, strict=True):
            for m in (loaded, twin):
                torch.testing.assert_close(m(**c, return_dict=False)[0], out, rtol=0, atol=0)
    assert {"step", "cfg", "block"} <= {action for _, _, action in expected}
    for m in (loaded, twin):
        assert [(r["step"], r["branch"], r["action"]) for r in dit_compile.stats(m)["trace"]] == expected


def test_a_break_only_the_first_call_makes_does_not_stop_export(tmp_path):
    """Z-Image builds its rotary table at its first call, a graph break then only: export, as
    the backend, traces again after one eager call (it raised, sending the user to explain,
    which saw nothing wrong). Exported through its torch.compile wrapper (pipe.transformer once
    compiled), the model is saved as the model itself, with its name, forward arguments and
    attributes (the wrapper's were saved: no in_channels, no positional names). (export's first
    step takes the model out of the wrapper, so the plain model's export is this one.)"""
    model, kw = tiny_models.zimage()
    call = {**kw, "return_dict": False}
    exported = torch.compile(model, backend="mixcache")
    dit_compile.export(exported, str(tmp_path), call, {"timestep": "rising", "cache": None})
    loaded = dit_compile.load(str(tmp_path))
    assert loaded.model_name == type(model).__name__ and loaded.in_channels == model.in_channels
    with torch.no_grad():
        torch.testing.assert_close(loaded(kw["x"], kw["t"], kw["cap_feats"], return_dict=False)[0],
                                   model(**call)[0], rtol=1e-5, atol=1e-5)
    # Exported with one sample, the programs read one: a second was dropped, silently.
    with pytest.raises(ValueError, match=r"x is \[tensor, tensor\]; it was exported as \[tensor\]"):
        loaded(kw["x"] * 2, kw["t"], kw["cap_feats"] * 2, return_dict=False)


class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x):
        return x + self.lin(x)


class _FillsItsKV(torch.nn.Module):
    """Two stacks, the glue between them filling a KV buffer the caller passes and returning
    nothing of its own."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.ModuleList([_Block(), _Block()])
        self.b = torch.nn.ModuleList([_Block(), _Block()])

    def forward(self, hidden_states, timestep, kv):
        h = hidden_states * timestep
        for block in self.a:
            h = block(h)
        kv.copy_(h)
        for block in self.b:
            h = block(h)
        return (h,)


def test_glue_that_only_writes_into_an_input_is_exported(tmp_path):
    """A piece with no outputs that writes into its input: torch.export.save failed on its
    program ("not enough values to unpack", nothing saying why). It is saved returning an
    empty tensor the loaded model drops, and the loaded model writes what the model writes."""
    torch.manual_seed(0)
    model = _FillsItsKV().eval()
    x, t = torch.randn(1, 4, 8), torch.ones(1, 1, 1)
    dit_compile.export(model, str(tmp_path), dict(hidden_states=x, timestep=t,
                                                  kv=torch.zeros(1, 4, 8)), {"cache": None})
    loaded = dit_compile.load(str(tmp_path))
    kv, kv_loaded = torch.zeros(1, 4, 8), torch.zeros(1, 4, 8)
    with torch.no_grad():
        out = model(hidden_states=x, timestep=t, kv=kv)[0]
        torch.testing.assert_close(loaded(hidden_states=x, timestep=t, kv=kv_loaded)[0], out)
    assert kv.abs().sum() > 0
    torch.testing.assert_close(kv_loaded, kv)


def test_explain_and_export_let_the_model_go(tmp_path):
    """torch keeps every backend it is given until torch._dynamo.reset(), and explain's and
    export's recorders held the traced model's graphs and weights: a deleted model stayed
    alive, weights and all (the deployment flow exports, deletes the model, then loads)."""
    import gc
    import weakref
    for what in ("explain", "export"):
        model, kw = tiny_models.wan(layers=2)
        if what == "explain":
            dit_compile.explain(model, **kw)
        else:
            dit_compile.export(model, str(tmp_path / what), {**kw, "return_dict": False})
        weights = [weakref.ref(p) for p in model.parameters()]
        del model
        gc.collect()
        assert not [w for w in weights if w() is not None], what


def test_aoti_packages_run_as_the_programs_do(tmp_path):
    """AOTInductor compiles each distinct program once at export; load runs the packages under the
    exported cache schedule, as the backend runs it.

    AOTInductor also reads a program's inputs with the strides it was compiled for and checks
    none. HunyuanVideo hands its blocks transposed views (its tokens after the patch embedding), so
    each program is compiled for the layout it will get; and an argument given in another layout
    than at export (pipelines pass the timestep expanded over the batch, stride 0) is copied into
    the exported one. (One model for both, its one single-stream block in the epilogue: each
    AOTInductor compile is a C++ build, and three programs hold all the layouts.)"""
    model, kw = tiny_models.hunyuan(batch=2, single_layers=1)
    # Each wrapper's C++ build at -O0, not -O1: it takes a third of this test, which runs a few
    # calls of a tiny model.
    with torch._inductor.config.patch({"aot_inductor.compile_wrapper_opt_level": "O0"}):
        dit_compile.export(model, str(tmp_path), {**kw, "return_dict": False}, {"cache": SCHEDULE},
                           aoti=True)
    programs = set(json.loads((tmp_path / "manifest.json").read_text())["programs"])
    assert sorted(p.name for p in tmp_path.glob("*.aoti.pt2")) == [
        f"program_{k}.aoti.pt2" for k in sorted(programs)]
    loaded = dit_compile.load(str(tmp_path))
    reference = torch.compile(model, backend="mixcache",
                              options={"cache": SCHEDULE, "regions": "eager"})
    with torch.no_grad():
        for call in calls(kw):
            call = {**kw, **call, "timestep": call["timestep"].expand(2)}
            torch.testing.assert_close(loaded(**call, return_dict=False)[0],
                                       reference(**call, return_dict=False)[0],
                                       rtol=1e-4, atol=1e-4)
        # Each call below starts a generation (its timestep rises), so it is computed in full.
        expanded = {k: torch.tensor([v]).expand(2) for k, v in (("timestep", 300.0), ("guidance", 2e3))}
        for call in ({**kw, **expanded}, kw):
            torch.testing.assert_close(loaded(**call, return_dict=False)[0],
                                       model(**call, return_dict=False)[0],
                                       rtol=1e-4, atol=1e-4)
    # A package's outputs are detached: a latent that requires grad (gradient guidance) got an
    # output without a graph, its gradient silently lost.
    latent = kw["hidden_states"].clone().requires_grad_()
    with pytest.raises(RuntimeError, match="AOTInductor's packages compute no gradients"):
        loaded(**{**kw, "hidden_states": latent}, return_dict=False)


# Torch's own AOTInductor path alone, with no dit_compile in the process: on the H200 (torch
# 2.11) the exported model's packages crashed the process twice, and these say whether any CUDA
# package does (one), or only a second one loaded beside the first (two).
AOTI_ALONE = """
import sys, torch
device, packages, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
loaded = []
for i in range(packages):
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 8 + i))
    model = model.to(device).eval()
    x = torch.randn(4, 16, device=device)
    program = torch.export.export(model, (x,))
    path = torch._inductor.aoti_compile_and_package(program, package_path=f"{out}/m{i}.pt2")
    print("loading", path, file=sys.stderr, flush=True)
    loaded.append((torch._inductor.aoti_load_package(path), model, x))
for runner, model, x in loaded:
    with torch.no_grad():
        torch.testing.assert_close(runner(x), model(x), rtol=1e-4, atol=1e-4)
print("ok", file=sys.stderr)
"""


@pytest.mark.gpu
@pytest.mark.parametrize("packages", [1, 2])
def test_torch_aoti_packages_load_on_gpu(tmp_path, packages):
    """Torch's export, AOTInductor compile and load of a small MLP on CUDA, in a child process
    (a crash there fails this test, not the run); ``packages`` of them in one process."""
    done = subprocess.run([sys.executable, "-X", "faulthandler", "-c", AOTI_ALONE, "cuda",
                           str(packages), str(tmp_path)], capture_output=True, text=True,
                          cwd=os.path.dirname(__file__))
    stderr = "\n".join(line for line in done.stderr.splitlines()
                       if not line.startswith("Extension modules:"))
    assert done.returncode == 0, f"exit {done.returncode}: {stderr[-3000:]}"


@pytest.mark.gpu
def test_aoti_export_on_gpu(tmp_path):
    """In a child process: on an H200 with torch 2.11 loading the packages crashed the process
    (a segfault in aoti_load_package), which must fail this test, not end the whole run."""
    script = f"""
import glob, sys, torch, dit_compile
sys.path.insert(0, {os.path.dirname(__file__)!r})
import tiny_models
model, kw = tiny_models.wan(layers=3)
model = model.cuda()
kw = {{k: v.cuda() for k, v in kw.items()}}
dit_compile.export(model, {str(tmp_path)!r}, {{**kw, "return_dict": False}}, {{"cache": None}},
                   aoti=True)
# Each package alone first, named as it goes: if one crashes the process, the log says which.
for package in sorted(glob.glob({str(tmp_path)!r} + "/*.aoti.pt2")):
    print("loading", package, file=sys.stderr, flush=True)
    torch._inductor.aoti_load_package(package)
loaded = dit_compile.load({str(tmp_path)!r})
with torch.no_grad():
    torch.testing.assert_close(loaded(**kw)[0], model(**kw, return_dict=False)[0],
                               rtol=1e-4, atol=1e-4)
"""
    # faulthandler: a segfault prints the Python stack it happened under.
    done = subprocess.run([sys.executable, "-X", "faulthandler", "-c", script], capture_output=True,
                          text=True, cwd=os.path.dirname(__file__))
    # faulthandler ends a crash report with one long line listing every extension module loaded
    # (on the GPU image, 3000 characters of it hid the stack): leave that line out.
    stderr = "\n".join(line for line in done.stderr.splitlines()
                       if not line.startswith("Extension modules:"))
    assert done.returncode == 0, f"exit {done.returncode}: {stderr[-3000:]}"
