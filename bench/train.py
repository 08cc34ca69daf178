"""The reference DiTs: diffusers' ``WanTransformer3DModel`` trained here, with flow matching in
pixel space, on the procedural videos of ``bench/data.py``; their saving, loading, and the check
that they follow their condition.

    python bench/train.py train --preset small            # then --preset large
    python bench/train.py check --name small               # re-run the condition check
    python bench/train.py distill --teacher large --student small --name render   # a renderer
    python bench/train.py train --preset small-gpu --device cuda --bf16-autocast --workers 12   # on a GPU

A model lives in ``bench/models/<name>/``:

* ``transformer/``: ``save_pretrained`` output (``config.json`` + safetensors), so diffusers
  loads it with no code from here (``from_pretrained`` where accelerate is installed);
* ``condition.safetensors``: the condition embedding (one table per attribute of ``data.ATTRIBUTES``
  and the learned null sequence that classifier-free guidance uses as the negative prompt);
* ``model.json``: the exact command, the full config, the data and sampler settings, the training
  time and loss log, and the condition check's result;
* ``loss.png``, ``samples.png`` (one row per sample, frames left to right), ``samples.gif``.

Conditioning: ``encoder_hidden_states`` is one token per attribute (shape, colour, motion,
background), each looked up in its own learned table; with probability ``drop`` per sample the
whole sequence is replaced by the learned null sequence, so the same model predicts the
unconditional velocity and CFG works inside WanPipeline (conditional call, then unconditional).

Flow matching (the convention of diffusers' ``FlowMatchEulerDiscreteScheduler``): ``x_s = (1 - s)
x_0 + s * noise``, the transformer sees ``timestep = 1000 s`` and predicts ``noise - x_0``.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import data  # noqa: E402
import pipelines  # noqa: E402

MODELS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "models")

#: ``--dtype`` values: the dtype the reference models are run in.
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16}


# -- devices ----------------------------------------------------------------------------------

def resolve_device(name: str | torch.device) -> torch.device:
    """``cpu``, ``cuda`` / ``cuda:N``, or ``auto`` (CUDA where torch sees a GPU, else CPU).

    Checked here so that asking for a GPU that is not there is one error naming the device, not
    a failure deep inside torch at the first kernel."""
    if str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"device {str(name)!r}: expected cpu, cuda, cuda:N or auto")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(name)!r} requested, but torch {torch.__version__} sees no "
                         "CUDA GPU (torch.cuda.is_available() is False)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"device {str(name)!r} requested, but torch sees "
                         f"{torch.cuda.device_count()} CUDA GPU(s)")
    return device


def device_arg(name: str) -> torch.device:
    """``resolve_device`` as an argparse ``type``: a bad or missing device is a usage error."""
    try:
        return resolve_device(name)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def positive(text: str) -> int:
    """An argparse ``type`` for counts: 0 steps ran a default, 0 cases failed on an empty list."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return int(text)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously; a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def runtime_info(device: torch.device) -> dict[str, Any]:
    """Where a run ran, for its metadata: the device and its name, torch and diffusers versions."""
    import diffusers
    info = {"device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "diffusers": diffusers.__version__}
    if device.type == "cuda":
        info["cuda"] = torch.version.cuda
    return info


@dataclass
class TrainConfig:
    """Everything that defines a reference model and how it was trained."""
    name: str
    layers: int
    heads: int
    head_dim: int
    ffn: int
    frames: int = 8
    size: int = 32
    # Temporal x spatial patch. (2, 4, 4) keeps the token count low enough for CPU training
    # (8 frames at 32x32 -> 4 x 8 x 8 = 256 tokens).
    patch: tuple[int, int, int] = (2, 4, 4)
    text_dim: int = 32
    freq_dim: int = 64
    steps: int = 1000
    batch: int = 16
    lr: float = 1e-3
    warmup: int = 50
    weight_decay: float = 0.01
    drop: float = 0.1               # condition dropout (CFG)
    identity_init: bool = True      # see init_identity_path
    seed: int = 0
    # The dtype the weights are saved in (and rounded to when training ends, so that the check,
    # the samples and every later run see the saved values): "bfloat16" halves a file that would
    # pass the repo's 25 MB in float32. Wan's float32 modules stay float32 (see _cast).
    weights_dtype: str = "float32"
    # Sampler the model is meant for (WanPipeline + FlowMatchEulerDiscreteScheduler, see
    # pipelines.wan_pipeline): recorded so every consumer samples it the same way.
    sample_steps: int = 20
    guidance: float = 4.0
    shift: float = 3.0

    @property
    def dim(self) -> int:
        return self.heads * self.head_dim


#: Reduced sizes for CPU training, and sizes near the issue's for a GPU run. Model dim must be at
#: least the patch volume (3 x patch); see init_identity_path. The GPU presets are untried (no
#: lease has had the time beside the benchmarks). Every preset's weights fit the repo's 25 MB a
#: file (tests/test_quality.py): the issue's large model, 12 layers at dim 512, would be 53M
#: parameters, 100 MB even in bfloat16, so large-gpu keeps the 12 layers at dim 256 (11M
#: parameters, saved in bfloat16: 22 MB); small-gpu is 4 layers at dim 256 (4.8M, float32: 18 MB).
PRESETS: dict[str, dict[str, Any]] = {
    "small": dict(layers=3, heads=4, head_dim=32, ffn=256, steps=1500),
    "large": dict(layers=6, heads=5, head_dim=32, ffn=640, steps=700),
    "small-gpu": dict(layers=4, heads=4, head_dim=64, ffn=1024, frames=16, size=64,
                      patch=(1, 4, 4), steps=20000, batch=64, lr=5e-4),
    "large-gpu": dict(layers=12, heads=4, head_dim=64, ffn=768, frames=16, size=64,
                      patch=(1, 4, 4), steps=20000, batch=64, lr=3e-4, weights_dtype="bfloat16"),
}


class ConditionEmbedding(nn.Module):
    """Attribute indices ``[B, A]`` -> ``encoder_hidden_states`` ``[B, A, text_dim]``.

    One learned table per attribute (token ``a`` of the sequence is attribute ``a``), and a
    learned null sequence ``[A, text_dim]`` for the unconditional prediction."""

    def __init__(self, text_dim: int, sizes: tuple[int, ...] = tuple(len(v) for v in
                                                                       data.ATTRIBUTES.values())):
        super().__init__()
        self.tables = nn.ModuleList(nn.Embedding(n, text_dim) for n in sizes)
        self.null = nn.Parameter(torch.randn(len(sizes), text_dim))

    def forward(self, idx: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        """``drop`` (bool ``[B]``, optional): samples whose condition becomes the null sequence."""
        out = torch.stack([t(idx[:, a]) for a, t in enumerate(self.tables)], dim=1)
        if drop is not None:
            out = torch.where(drop[:, None, None], self.null.expand_as(out), out)
        return out

    def embed(self, cond: data.Condition) -> torch.Tensor:
        """The conditional ``prompt_embeds`` ``[1, A, text_dim]`` of one condition."""
        return self(torch.tensor([cond.indices()], device=self.null.device)).detach()

    def negative(self) -> torch.Tensor:
        """The unconditional ``negative_prompt_embeds`` ``[1, A, text_dim]``."""
        return self.null.detach()[None]


def build_transformer(cfg: TrainConfig) -> nn.Module:
    """A fresh pixel-space ``WanTransformer3DModel`` (3 channels in and out) of ``cfg``'s size."""
    from diffusers import WanTransformer3DModel
    return WanTransformer3DModel(
        patch_size=tuple(cfg.patch), num_attention_heads=cfg.heads, attention_head_dim=cfg.head_dim,
        in_channels=3, out_channels=3, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn, num_layers=cfg.layers)


def init_identity_path(transformer: nn.Module, seed: int = 0) -> None:
    """Start the patch embedding and the output projection as an orthonormal pair, so that the
    untrained model already passes its input patch through to its output.

    Why: in pixel space the velocity target ``noise - x_0`` carries the full per-patch noise
    (3 x 2 x 4 x 4 = 96 values a token), which the model must copy from its input; from a random
    init a small model takes most of a CPU training budget to learn that copy, and until it has,
    samples keep their initial noise (JiT, "Back to Basics", on patch-level pixel diffusion). With
    this init the copy exists at step 0 (up to the per-token LayerNorm scale, which is matched at
    unit-variance input) and training spends its steps on the denoising itself."""
    w_in = transformer.patch_embedding.weight                 # [dim, C, pt, ph, pw]
    dim, c, pt, ph, pw = w_in.shape
    n = c * pt * ph * pw
    if dim < n:
        raise ValueError(f"model dim {dim} < patch volume {n}: the model cannot carry the "
                         "per-patch noise the velocity target needs; use a larger dim or patch")
    q, _ = torch.linalg.qr(torch.randn(dim, n, generator=torch.Generator().manual_seed(seed)))
    with torch.no_grad():
        w_in.copy_(q.reshape(dim, c, pt, ph, pw))
        transformer.patch_embedding.bias.zero_()
        # proj_out's outputs are ordered (pt, ph, pw, c) (see the transformer's unpatchify),
        # the patch embedding's inputs (c, pt, ph, pw): permute the rows to match.
        q_out = q.reshape(dim, c, pt, ph, pw).permute(2, 3, 4, 1, 0).reshape(n, dim)
        # LayerNorm maps a unit-variance patch's embedding (norm sqrt(n)) to norm sqrt(dim).
        transformer.proj_out.weight.copy_(q_out * math.sqrt(n / dim))
        transformer.proj_out.bias.zero_()


@dataclass
class Trained:
    """A loaded reference model: transformer, condition embedding, and its recorded config."""
    transformer: nn.Module
    condition: ConditionEmbedding
    config: TrainConfig
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return self.transformer.device

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (diffusers' reading: modules kept in float32 aside)."""
        return self.transformer.dtype

    def pipeline(self):
        """diffusers' WanPipeline around the transformer, with the scheduler it was meant for."""
        from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline
        pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=self.transformer,
                           scheduler=FlowMatchEulerDiscreteScheduler(shift=self.config.shift))
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @torch.no_grad()
    def sample(self, pipe, cond: data.Condition, seed: int, steps: int | None = None,
               guidance: float | None = None) -> torch.Tensor:
        """One video ``[1, 3, F, H, W]`` (in ``[-1, 1]`` where the model is good), float32 on the
        CPU whatever the model's device, through ``pipe`` (``self.pipeline()``, or one whose
        transformer was swapped for a compiled/cached one)."""
        return pipe(**self.sample_kwargs(pipe, cond, seed, steps, guidance)).frames.float().cpu()

    def sample_kwargs(self, pipe, cond: data.Condition, seed: int, steps: int | None = None,
                      guidance: float | None = None) -> dict[str, Any]:
        """``pipe``'s arguments for the video ``sample`` makes."""
        c = self.config
        return pipelines.pixel_wan_kwargs(
            pipe, self.condition.embed(cond), self.condition.negative(), seed=seed,
            frames=c.frames, size=c.size, steps=steps or c.sample_steps,
            guidance=c.guidance if guidance is None else guidance)


def reading_condition_of(model: Trained, other: Trained) -> nn.Module:
    """A copy of ``model``'s transformer that takes ``other``'s ``prompt_embeds``, for a pipeline
    that hands one text condition to two models (the sketch/render split).

    The two were trained apart, each with its own condition tables, so the same condition is one
    vector in each. Every vector either model can be given (the 16 table rows and the 4 null
    tokens, 20 vectors of ``text_dim`` = 32) maps to its counterpart through one linear map
    ``M`` (least squares on 20 equations in 32 unknowns per column: exact, since ``other``'s 20
    vectors are independent). The transformer's text projection starts with a linear layer, so
    ``M`` folds into its weight: for every condition the copy computes what ``model`` computes
    from its own embedding, up to float rounding."""
    import copy

    def vectors(c: ConditionEmbedding) -> torch.Tensor:
        return torch.cat([*(t.weight for t in c.tables), c.null]).double()
    src, dst = vectors(other.condition), vectors(model.condition)
    m = torch.linalg.lstsq(src, dst).solution            # src @ m = dst, [text_dim, text_dim]
    if float((src @ m - dst).abs().max()) > 1e-6 * float(dst.abs().max()):
        raise ValueError("the condition vectors do not map linearly onto each other")
    out = copy.deepcopy(model.transformer)
    first = out.condition_embedder.text_embedder.linear_1
    with torch.no_grad():
        first.weight.copy_((first.weight.double() @ m.T).to(first.weight.dtype))
    return out


def model_dir(name: str) -> str:
    return os.path.join(MODELS_DIR, name)


def _castable(transformer: nn.Module) -> list[torch.Tensor]:
    """The floating weights ``from_pretrained(torch_dtype=...)`` would cast: not those of the
    modules the model keeps in float32 (Wan: rope, time embedder, norms, scale-shift tables)."""
    keep = transformer._keep_in_fp32_modules or []
    return [t for name, t in [*transformer.named_parameters(), *transformer.named_buffers()]
            if t.is_floating_point() and not any(m in name.split(".") for m in keep)]


def _cast(transformer: nn.Module, dtype: torch.dtype) -> None:
    """Cast ``transformer``'s floating weights to ``dtype`` as ``from_pretrained(torch_dtype=...)``
    does (``_castable``). A plain ``.to(dtype)`` would cast the float32 modules too (diffusers
    warns that it can give inconsistent results), and bf16 runs here should be the ones diffusers
    users get."""
    for t in _castable(transformer):
        t.data = t.data.to(dtype)


def _round(transformer: nn.Module, dtype: torch.dtype) -> None:
    """Round the weights that ``_cast`` would cast to ``dtype``'s values, keeping their dtype."""
    for t in _castable(transformer):
        t.data = t.data.to(dtype).to(t.dtype)


#: Largest weights file save() writes (diffusers' shards beyond it): under the repo's 25 MB a file
#: and the 16 MiB a file that comes back from a device call, where the GPU presets are trained.
SHARD_SIZE = "15MB"


def _load_shards(tdir: str) -> dict[str, torch.Tensor]:
    """The state dict ``save_pretrained`` wrote to ``tdir``: one safetensors file, or the shards
    its index names."""
    from safetensors.torch import load_file
    index = os.path.join(tdir, "diffusion_pytorch_model.safetensors.index.json")
    if not os.path.exists(index):
        return load_file(os.path.join(tdir, "diffusion_pytorch_model.safetensors"))
    with open(index) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
    return {k: v for shard in shards for k, v in load_file(os.path.join(tdir, shard)).items()}


def load(name: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
         ) -> Trained:
    """Load ``bench/models/<name>`` (eval mode) on ``device`` (see ``resolve_device``) in
    ``dtype``."""
    device = resolve_device(device)
    from diffusers import WanTransformer3DModel
    from safetensors.torch import load_file
    path = model_dir(name)
    with open(os.path.join(path, "model.json")) as f:
        meta = json.load(f)
    cfg = TrainConfig(**{**meta["config"], "patch": tuple(meta["config"]["patch"])})
    # from_config + load_file rather than from_pretrained: the latter needs accelerate for Wan
    # (its keep_in_fp32_modules), which is not a dependency of this project.
    tdir = os.path.join(path, "transformer")
    transformer = WanTransformer3DModel.from_config(WanTransformer3DModel.load_config(tdir))
    transformer.load_state_dict(_load_shards(tdir))
    transformer.eval()
    if dtype != torch.float32:
        _cast(transformer, dtype)
    transformer.to(device)
    cond = ConditionEmbedding(cfg.text_dim)
    cond.load_state_dict(load_file(os.path.join(path, "condition.safetensors")))
    cond.to(device=device, dtype=dtype)
    # Inference only: no parameter needs a gradient, and a parameter view that requires one
    # (the null sequence passed as negative_prompt_embeds) trips torch's FlopCounterMode.
    transformer.requires_grad_(False)
    cond.requires_grad_(False)
    return Trained(transformer, cond.eval(), cfg, meta)


# -- training ---------------------------------------------------------------------------------

def _sigmas(n: int, g: torch.Generator) -> torch.Tensor:
    """Noise levels for training: logit-normal(0, 1) (SD3's choice: most weight mid-range, where
    the velocity is hardest to predict, but every level is seen)."""
    return torch.sigmoid(torch.randn(n, generator=g))


def _lr(cfg: TrainConfig, step: int) -> float:
    """Linear warmup, then cosine decay to zero: a short run ends at a low learning rate, which
    does for sample quality what a weight EMA would do in a long one."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    p = (step - cfg.warmup) / max(cfg.steps - cfg.warmup, 1)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * p))


def _autocast(device: torch.device, bf16: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


class _Videos(torch.utils.data.IterableDataset):
    """The training videos of each step, in step order: step ``i`` renders the seeds
    ``seed_base + i * batch ...``, so a batch is the same whichever process renders it. Worker
    ``w`` of ``n`` renders steps ``w, w + n, ...``, and the DataLoader takes them round-robin."""

    def __init__(self, cfg: TrainConfig, seed_base: int):
        self.cfg, self.seed_base = cfg, seed_base

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        first, every = (info.id, info.num_workers) if info else (0, 1)
        cfg = self.cfg
        for step in range(first, cfg.steps, every):
            seeds = range(self.seed_base + step * cfg.batch, self.seed_base + (step + 1) * cfg.batch)
            yield data.batch(list(seeds), frames=cfg.frames, size=cfg.size)


def _one_thread(_: int) -> None:
    torch.set_num_threads(1)    # the workers share the machine's cores between them


def train(cfg: TrainConfig, command: str, progress: bool = True,
          device: torch.device = torch.device("cpu"), bf16_autocast: bool = False,
          workers: int = 0, budget: float | None = None) -> Trained:
    """Train one model from scratch on ``device``; deterministic in ``cfg.seed`` on a given
    machine. ``bf16_autocast``: the forward pass under ``torch.autocast`` in bfloat16 (weights,
    optimizer and loss stay float32). ``workers``: processes rendering the videos ahead of the
    training step (0: rendered in this process, between steps); the batches, and so the model,
    are the same with any number. On a GPU they are the bottleneck otherwise: one process renders
    a batch of 64 videos of 16 x 64 x 64 in about 0.4 s.

    ``budget``: seconds of training at most. The run is cut to the steps that fit, timed over its
    first steps, all inside the warm-up, whose learning rate does not depend on the total: the
    model is the one ``cfg.steps`` = those steps trains (recorded in ``model.json``), so a rerun
    with ``--steps N`` gives it again without a clock."""
    # Steps 1 .. probe - 1 are timed (step 0 pays for first-call setup); all are warm-up steps.
    probe = min(10, cfg.warmup)
    if budget is not None and probe < 2:
        raise ValueError(f"a time budget needs a warm-up of at least 2 steps, got {cfg.warmup}")
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    transformer = build_transformer(cfg).train()
    if cfg.identity_init:
        init_identity_path(transformer, cfg.seed)
    cond = ConditionEmbedding(cfg.text_dim)
    # Initialised on the CPU and then moved, and every random draw below stays on the CPU
    # generator: the same initial weights, noise and batches on every device.
    transformer.to(device)
    cond.to(device)
    params = list(transformer.parameters()) + list(cond.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    losses: list[float] = []
    # Losses are read back (a device sync) only every 50 steps, so that on a GPU the CPU renders
    # the next batch while the device still works on this one.
    pending: list[torch.Tensor] = []
    # Data seeds are disjoint from the evaluation seeds (which are small integers): every
    # training video is new, so there is no fixed set to overfit.
    seed_base = 10_000_000 * (cfg.seed + 1)
    t0 = time.perf_counter()
    bar = _bar(cfg.steps, f"train {cfg.name}", progress)
    videos = torch.utils.data.DataLoader(_Videos(cfg, seed_base), batch_size=None, num_workers=workers,
                                         worker_init_fn=_one_thread if workers else None,
                                         pin_memory=device.type == "cuda")
    for step, (x0, idx) in enumerate(videos):
        if budget is not None and step in (1, probe):
            synchronize(device)
            if step == 1:
                t1 = time.perf_counter()
            else:
                per_step = (time.perf_counter() - t1) / (probe - 1)
                cfg = dataclasses.replace(cfg, steps=min(cfg.steps, max(probe, int(budget / per_step))))
                bar.total = cfg.steps
        if step == cfg.steps:
            break
        noise = torch.randn(x0.shape, generator=g)
        s = _sigmas(cfg.batch, g)
        xs = (1 - s)[:, None, None, None, None] * x0 + s[:, None, None, None, None] * noise
        drop = torch.rand(cfg.batch, generator=g) < cfg.drop
        xs, s, idx, drop, target = (t.to(device) for t in (xs, s, idx, drop, noise - x0))
        with _autocast(device, bf16_autocast):
            pred = transformer(hidden_states=xs, timestep=s * 1000,
                               encoder_hidden_states=cond(idx, drop), return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(pred.float(), target)
        for group in opt.param_groups:
            group["lr"] = _lr(cfg, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        pending.append(loss.detach())
        bar.update(1)
        if step % 50 == 0:
            losses += [float(x) for x in pending]
            pending.clear()
            bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
    losses += [float(x) for x in pending]
    synchronize(device)
    bar.close()
    seconds = time.perf_counter() - t0
    meta = {"command": command, "config": dataclasses.asdict(cfg), "train_seconds": round(seconds, 1),
            "threads": torch.get_num_threads(), **runtime_info(device),
            "autocast": "bf16" if bf16_autocast else None, "workers": workers, "budget_seconds": budget,
            "params": sum(p.numel() for p in transformer.parameters()),
            "loss": losses}
    if cfg.weights_dtype != "float32":
        _round(transformer, getattr(torch, cfg.weights_dtype))
    return Trained(transformer.eval(), cond.eval(), cfg, meta)


def distill(teacher: Trained, student: Trained, cfg: TrainConfig, command: str,
            progress: bool = True) -> Trained:
    """``student`` trained further to predict what ``teacher`` predicts, from the same noisy
    video at the same noise level and condition: a renderer for the sketch/render split
    (SRDiffusion's premise is a small model that finishes the large one's sketch the way the
    large one would; two models trained apart, as ``small`` and ``large`` were, draw details
    differently). It starts from ``reading_condition_of(student, teacher)`` and is saved with the
    teacher's condition embedding, so both read one ``prompt_embeds``. The noise levels are
    uniform in (0, 1) rather than ``_sigmas``' logit-normal, which draws few of the low levels a
    renderer takes. ``cfg``: the student's config with this run's name and schedule. On the
    teacher's device; every random draw stays on the CPU generator, as in ``train``."""
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    net = reading_condition_of(student, teacher).train().requires_grad_(True)
    cond, big = teacher.condition, teacher.transformer
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    losses: list[float] = []
    pending: list[torch.Tensor] = []
    seed_base = 10_000_000 * (cfg.seed + 1) + 5_000_000     # videos neither model trained on
    t0 = time.perf_counter()
    bar = _bar(cfg.steps, f"distill {cfg.name}", progress)
    for step, (x0, idx) in enumerate(_Videos(cfg, seed_base)):
        noise = torch.randn(x0.shape, generator=g)
        s = torch.rand(cfg.batch, generator=g)
        xs = (1 - s)[:, None, None, None, None] * x0 + s[:, None, None, None, None] * noise
        drop = torch.rand(cfg.batch, generator=g) < cfg.drop
        xs, s, idx, drop = (t.to(teacher.device) for t in (xs, s, idx, drop))
        text = cond(idx, drop)
        with torch.no_grad():
            target = big(hidden_states=xs, timestep=s * 1000, encoder_hidden_states=text,
                         return_dict=False)[0]
        pred = net(hidden_states=xs, timestep=s * 1000, encoder_hidden_states=text,
                   return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(pred, target)
        for group in opt.param_groups:
            group["lr"] = _lr(cfg, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        pending.append(loss.detach())
        bar.update(1)
        if step % 50 == 0:      # read back every 50 steps, as in train (a device sync)
            losses += [float(x) for x in pending]
            pending.clear()
            bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.5f}")
    losses += [float(x) for x in pending]
    synchronize(teacher.device)
    bar.close()
    meta = {"command": command, "config": dataclasses.asdict(cfg),
            "distilled": {"teacher": teacher.config.name, "student": student.config.name},
            "train_seconds": round(time.perf_counter() - t0, 1),
            "threads": torch.get_num_threads(), **runtime_info(teacher.device),
            "params": sum(p.numel() for p in net.parameters()), "loss": losses}
    return Trained(net.eval().requires_grad_(False), cond, cfg, meta)


def _bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, disable=not enabled, mininterval=5.0)


def save(model: Trained) -> str:
    """Write ``bench/models/<name>/`` (weights, condition embedding, model.json, loss curve)."""
    from safetensors.torch import save_file
    path = model_dir(model.config.name)
    os.makedirs(path, exist_ok=True)
    transformer = model.transformer
    if model.config.weights_dtype != "float32":
        transformer = copy.deepcopy(transformer)
        _cast(transformer, getattr(torch, model.config.weights_dtype))
    transformer.save_pretrained(os.path.join(path, "transformer"), safe_serialization=True,
                                max_shard_size=SHARD_SIZE)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.condition.state_dict().items()},
              os.path.join(path, "condition.safetensors"))
    losses = model.meta["loss"]
    meta = dict(model.meta)
    # The log is kept as means over windows of 10 steps: the curve, without a 1,000-line file.
    meta["loss"] = [round(sum(losses[i:i + 10]) / len(losses[i:i + 10]), 5)
                    for i in range(0, len(losses), 10)]
    meta["loss_window"] = 10
    _write_meta(path, meta)
    plot_loss(losses, os.path.join(path, "loss.png"), model.config.name)
    return path


def _write_meta(path: str, meta: dict[str, Any]) -> None:
    with open(os.path.join(path, "model.json"), "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")


def plot_loss(losses: list[float], out: str, title: str) -> None:
    """Loss per step and its running mean, as a PNG (skipped with a message without matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib not installed: no loss curve at {out} (pip install matplotlib)")
        return
    k = 25
    smooth = [sum(losses[max(0, i - k + 1):i + 1]) / len(losses[max(0, i - k + 1):i + 1])
              for i in range(len(losses))]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(losses, lw=0.5, alpha=0.4, label="per step")
    ax.plot(smooth, lw=1.5, label=f"mean of last {k}")
    ax.set(xlabel="step", ylabel="flow-matching MSE", yscale="log", title=f"{title}: training loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


# -- the condition check ----------------------------------------------------------------------

def check(model: Trained, cases: int = 48, progress: bool = True) -> dict[str, Any]:
    """Do samples follow the condition? Samples ``cases`` (condition, seed) pairs, colours
    balanced, and reads each sample's colour back with ``data.foreground_hue``.

    Returns accuracy (a sample with no saturated foreground counts as wrong), chance
    (``1 / len(COLOURS)``), the same for the unguided sampler (guidance 1: the conditional
    prediction alone), and the per-case results."""
    pipe = model.pipeline()
    rng = random.Random(1234)
    rows = []
    for i in _bar_iter(range(cases), f"check {model.config.name}", progress):
        cond = data.random_condition(rng)
        cond = dataclasses.replace(cond, colour=i % len(data.COLOURS))
        seed = 100 + i
        guided = model.sample(pipe, cond, seed)[0]
        unguided = model.sample(pipe, cond, seed, guidance=1.0)[0]
        rows.append({"condition": cond.describe(), "seed": seed,
                     "colour": data.nearest_colour(data.foreground_hue(guided)) == cond.colour,
                     "colour_unguided":
                         data.nearest_colour(data.foreground_hue(unguided)) == cond.colour,
                     "sample": guided})
    result = {"cases": cases, "chance": round(1 / len(data.COLOURS), 3),
              "colour_accuracy": round(sum(r["colour"] for r in rows) / cases, 3),
              "colour_accuracy_unguided": round(sum(r["colour_unguided"] for r in rows) / cases, 3),
              "sampler": {"steps": model.config.sample_steps, "guidance": model.config.guidance,
                          "shift": model.config.shift}}
    result["rows"] = rows
    return result


def _bar_iter(it, desc: str, enabled: bool):
    from tqdm.auto import tqdm
    return tqdm(it, desc=desc, disable=not enabled)


def save_samples(videos: list[torch.Tensor], labels: list[str], path: str, stem: str = "samples",
                 scale: int = 3) -> None:
    """``videos`` (each ``[3, F, H, W]`` in ``[-1, 1]``) as ``<stem>.png`` (one row per video,
    frames left to right) and ``<stem>.gif`` (all videos tiled, animated over frames)."""
    from PIL import Image
    imgs = [((v.float() + 1) * 127.5).clamp(0, 255).round().to(torch.uint8).permute(1, 2, 3, 0)
            for v in videos]                                           # [F, H, W, 3] each
    rows = torch.cat([torch.cat(list(v), dim=1) for v in imgs], dim=0)
    Image.fromarray(rows.numpy()).resize((rows.shape[1] * scale, rows.shape[0] * scale),
                                         Image.NEAREST).save(os.path.join(path, f"{stem}.png"))
    cols = 8
    n = math.ceil(len(imgs) / cols) * cols
    pad = imgs + [torch.zeros_like(imgs[0])] * (n - len(imgs))
    frames = []
    for f in range(imgs[0].shape[0]):
        tile = torch.cat([torch.cat([pad[r * cols + c][f] for c in range(cols)], dim=1)
                          for r in range(n // cols)], dim=0)
        frames.append(Image.fromarray(tile.numpy()).resize((tile.shape[1] * scale,
                                                            tile.shape[0] * scale), Image.NEAREST))
    frames[0].save(os.path.join(path, f"{stem}.gif"), save_all=True, append_images=frames[1:],
                   duration=150, loop=0)
    with open(os.path.join(path, f"{stem}.txt"), "w") as f:
        f.write("\n".join(labels) + "\n")


def run_check(model: Trained, cases: int, progress: bool) -> dict[str, Any]:
    """``check`` plus its artefacts: samples.png/gif/txt and the result in model.json."""
    result = check(model, cases, progress)
    rows = result.pop("rows")
    path = model_dir(model.config.name)
    save_samples([r["sample"] for r in rows[:24]],
                 [f"{r['condition']} (seed {r['seed']}): colour "
                  f"{'recovered' if r['colour'] else 'NOT recovered'}" for r in rows[:24]], path)
    with open(os.path.join(path, "model.json")) as f:
        meta = json.load(f)
    meta["check"] = result
    _write_meta(path, meta)
    print(json.dumps(result))
    return result


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    tr = sub.add_parser("train", help="train one model and save it to bench/models/<name>")
    tr.add_argument("--preset", choices=sorted(PRESETS), required=True)
    tr.add_argument("--name", help="directory name under bench/models (default: the preset)")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.name in ("name", "patch"):
            continue
        if isinstance(f.default, bool):
            tr.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        else:
            tr.add_argument(flag, type=type(f.default) if f.default is not dataclasses.MISSING else int)
    tr.add_argument("--patch", type=int, nargs=3)
    tr.add_argument("--bf16-autocast", action="store_true",
                    help="forward pass under torch.autocast(bfloat16) (recorded in model.json)")
    tr.add_argument("--budget", type=float, metavar="SECONDS",
                    help="train at most this long: the steps that fit, timed over the first ten "
                         "(model.json records them; --steps N trains the same model again)")
    tr.add_argument("--workers", type=int, default=0,
                    help="processes rendering the videos ahead of the training step (default 0: "
                         "in this one); the same batches with any number")
    di = sub.add_parser("distill", help="train a saved model further to predict what another "
                        "predicts (a renderer for the sketch/render split)")
    di.add_argument("--teacher", required=True, help="saved model whose predictions are the target")
    di.add_argument("--student", required=True, help="saved model to start from")
    di.add_argument("--name", required=True, help="directory name under bench/models")
    di.add_argument("--steps", type=int, default=600)
    di.add_argument("--lr", type=float, default=3e-4)
    ck = sub.add_parser("check", help="re-run the condition check of a saved model (rewrites its "
                        "samples.png/gif/txt and the check in model.json)")
    ck.add_argument("--name", required=True)
    for p in (tr, di, ck):
        p.add_argument("--threads", type=int, default=1,
                       help="torch CPU threads (default 1: the machine is shared)")
        p.add_argument("--device", type=device_arg, default="cpu",
                       help="cpu (default), cuda, cuda:N, or auto (cuda where available)")
        p.add_argument("--cases", type=int, default=48, help="cases of the condition check")
        p.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    progress = not args.no_progress
    if args.cmd == "train":
        given = {k: v for k, v in vars(args).items()
                 if k in {f.name for f in dataclasses.fields(TrainConfig)} and v is not None}
        cfg = TrainConfig(**{**PRESETS[args.preset], **given, "name": args.name or args.preset})
        cfg.patch = tuple(cfg.patch)
        command = "python bench/train.py " + " ".join(sys.argv[1:] if argv is None else argv)
        model = train(cfg, command, progress, args.device, args.bf16_autocast, args.workers, args.budget)
        print(f"trained {cfg.name} in {model.meta['train_seconds']} s; saved to {save(model)}")
        run_check(model, args.cases, progress)
    elif args.cmd == "distill":
        teacher, student = (load(n, device=args.device) for n in (args.teacher, args.student))
        cfg = dataclasses.replace(student.config, name=args.name, steps=args.steps, lr=args.lr,
                                  warmup=min(student.config.warmup, args.steps // 10))
        command = "python bench/train.py " + " ".join(sys.argv[1:] if argv is None else argv)
        model = distill(teacher, student, cfg, command, progress)
        print(f"distilled {cfg.name} in {model.meta['train_seconds']} s; saved to {save(model)}")
        run_check(model, args.cases, progress)
    else:
        run_check(load(args.name, device=args.device), args.cases, progress)


if __name__ == "__main__":
    main()
