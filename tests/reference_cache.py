"""Plain eager references of the reuse rules, written independently of the runtime.

``Reference(model, step=..., cfg=..., block=..., span=(a, b))`` is called like the model over one
generation (timesteps going down, one call per guidance branch) and reuses exactly what the forced
schedule says, by wrapping the model's own blocks. One stack; its blocks carry one stream, or two
where a block says so (``block.two``, the test DiTs' dual-stream blocks: ``(x, txt) -> (x, txt)``),
each stream's residual reused on its own. Step reuse with ``order`` k fits the polynomial of degree
k in t through the last k + 1 computed outputs (as many as there are) and evaluates it.
"""
from __future__ import annotations

import copy
import inspect

import torch


class _Span(torch.nn.Module):
    def __init__(self, block, first: bool, last: bool, ref: "Reference"):
        super().__init__()
        self.block, self.first, self.last, self.ref = block, first, last, ref

    def forward(self, hidden_states, *args, **kwargs):
        r = self.ref
        two = getattr(self.block, "two", False)
        streams = (hidden_states, args[0]) if two else (hidden_states,)
        if r.reuse_span:
            if self.first:
                streams = tuple(s + d for s, d in zip(streams, r.span_res[r.branch]))
            return streams if two else streams[0]
        if self.first:   # copies: a block may write into its input in place
            r.span_in = tuple(s.clone() for s in streams)
        out = self.block(hidden_states, *args, **kwargs)
        if self.last:
            r.fresh_res = tuple(o - i for o, i in zip(out if two else (out,), r.span_in))
        return out


class Reference:
    def __init__(self, model, blocks_attr: str = "blocks", step=(), cfg=(), block=(), span=(1, None),
                 order=0, rising=False):
        self.model = copy.deepcopy(model)
        self.order = order
        self.sign = -1.0 if rising else 1.0     # a timestep that rises through the generation
        blocks = getattr(self.model, blocks_attr)
        a, b = span[0], span[1] if span[1] is not None else len(blocks)
        for i in range(a, b):
            blocks[i] = _Span(blocks[i], i == a, i == b - 1, self)
        self.step_s, self.cfg_s, self.block_s = set(step), set(cfg), set(block)
        self.last_t, self.step, self.branch = None, -1, 0
        self.out = {}          # branch -> computed (t, output), oldest first
        self.span_res = {}     # branch -> last computed span residual
        self.current = {}      # branch -> this step's output
        self.computed = set()
        self.diff = {}         # branch >= 1 -> its output minus branch 0's, where both computed
        self.reuse_span = False

    def __call__(self, **kw):
        # The noise level: per-frame timesteps (diffusion forcing) at the noisiest frame's.
        ts = kw["timestep"]
        t = float(ts.min() if self.sign < 0 else ts.max())
        if self.last_t is None or self.sign * t > self.sign * self.last_t:
            raise AssertionError("the reference covers one generation")
        if t == self.last_t:
            self.branch += 1
        else:
            self.step, self.branch = self.step + 1, 0
            self.current, self.computed = {}, set()
        self.last_t = t
        b = self.branch
        if self.step in self.step_s and b in self.out:
            y = _fit(self.out[b][-(self.order + 1):], t)
            self.current[b] = y
            return y
        if b >= 1 and self.step in self.cfg_s and b in self.diff and 0 in self.current:
            y = self.current[0] + self.diff[b]
            self.current[b] = y
            return y
        self.reuse_span = self.step in self.block_s and b in self.span_res
        with torch.no_grad():
            y = self.model(**kw)[0]
        if not self.reuse_span:
            self.span_res[b] = self.fresh_res
        self.reuse_span = False
        self.out.setdefault(b, []).append((t, y))
        self.current[b] = y
        self.computed.add(b)
        if b >= 1 and 0 in self.computed:
            self.diff[b] = y - self.current[0]
        return y

    def start(self, t0: float) -> "Reference":
        self.last_t = self.sign * float("inf")
        return self


def _fit(points, t):
    """The least-squares (here: exact) polynomial through ``points`` = [(t_i, y_i)], at ``t``."""
    ts = torch.tensor([p[0] for p in points], dtype=torch.float64) / 1000.0
    ys = torch.stack([p[1].double().flatten() for p in points])
    vander = ts[:, None] ** torch.arange(len(points), dtype=torch.float64)
    coef = torch.linalg.lstsq(vander, ys).solution
    at = (t / 1000.0) ** torch.arange(len(points), dtype=torch.float64)
    return (at @ coef).reshape(points[-1][1].shape).to(points[-1][1].dtype)


class BatchedCfgReference:
    """Eager reference of cfg reuse on batch halves (a pipeline that batches [uncond, cond] into one
    call, as CogVideoXPipeline does), written independently of the runtime.

    Installs itself as the forward of a copy of ``model`` (``.model``, to hand to the pipeline): on
    the steps in ``cfg`` with a difference cached, it runs the model on the cond half only and
    rebuilds the uncond half as ``cond + (uncond - cond)`` from the last step that computed both.
    A timestep that goes up starts a new generation, with nothing cached (``rising``: one that goes
    down, ZImagePipeline's 1 - sigma). ``cond``, ``latent``, ``time``: the names of the condition,
    latent and timestep arguments (DiTPipeline batches ``class_labels`` with the null class;
    Z-Image's are ``cap_feats``, ``x`` and ``t``, its latents and captions lists of per-sample
    tensors, and so its output). ``cond_first``: the cond half is the first (Z-Image's
    ``[positive, negative]``), the uncond half rebuilt as ``cond - (cond - uncond)``. Other tensor
    arguments batched with the latent (a text mask) are halved alike. "cond" is the half computed:
    LuminaPipeline batches ``[positive, negative]`` as tensors, and there the second half computed
    is the negative one, as the runtime computes it. ``dims``: arguments batched in another dim
    than 0, by name (HiDream's Llama states in dim 1), halved there.
    """

    def __init__(self, model, cfg=(), cond="encoder_hidden_states", latent="hidden_states",
                 time="timestep", rising=False, cond_first=False, dims=None):
        self.model = copy.deepcopy(model)
        self._forward = self.model.forward
        self.cfg_s = set(cfg)
        self.cond, self.latent, self.time, self.rising = cond, latent, time, rising
        self.cond_first = cond_first
        self.dims = dims or {}
        self.last_t, self.step, self.diff = None, -1, None
        self.model.forward = self

    def __call__(self, *args, return_dict=True, **kw):
        params = inspect.signature(self._forward).parameters
        kw = dict(inspect.signature(self._forward).bind_partial(*args, **kw).arguments)
        for name in [n for n in kw if params[n].kind is inspect.Parameter.VAR_KEYWORD]:
            kw.update(kw.pop(name))
        x, c, timestep = kw.pop(self.latent), kw.pop(self.cond), kw.pop(self.time)
        # The noise level: per-frame timesteps (context frames at zero, AnyFlow's) at the
        # noisiest frame's.
        ts = timestep.reshape(-1).float()
        t = -float(ts.min()) if self.rising else float(ts.max())
        if self.last_t is None or t > self.last_t:
            self.step, self.diff = 0, None
        elif t < self.last_t:
            self.step += 1
        else:
            raise AssertionError("the batched reference expects one call per step")
        self.last_t = t
        k = len(x) // 2
        with torch.no_grad():
            if self.step in self.cfg_s and self.diff is not None:
                half = slice(0, k) if self.cond_first else slice(k, None)
                rest = {n: v[half] if isinstance(v, torch.Tensor) and v.dim() and len(v) == 2 * k
                        else v for n, v in kw.items()}     # batched with the latent: a text mask
                rest.update({n: kw[n][(slice(None),) * d + (half,)] for n, d in self.dims.items()})
                cond = self._forward(**{self.latent: x[half], self.cond: c[half],
                                        self.time: timestep[half]}, return_dict=False, **rest)[0]
                if self.cond_first:
                    y = _cat(cond, [a - d for a, d in zip(cond, self.diff)])
                else:
                    y = _cat([a + d for a, d in zip(cond, self.diff)], cond)
            else:
                y = self._forward(**{self.latent: x, self.cond: c, self.time: timestep},
                                  return_dict=False, **kw)[0]
                self.diff = [a - b for a, b in zip(y[:k], y[k:])]
        if return_dict:
            from diffusers.models.modeling_outputs import Transformer2DModelOutput
            return Transformer2DModelOutput(sample=y)
        return (y,)


def _cat(first, second):
    """The two halves as one output: a batch, or a list of per-sample outputs (one half
    computed, as is; the other rebuilt, a list of per-sample tensors)."""
    if isinstance(first, list) and isinstance(second, list):
        return [*first, *second]
    return torch.cat([torch.stack(h) if isinstance(h, list) else h for h in (first, second)])
