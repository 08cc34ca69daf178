"""A hypothesis strategy for DiT-like modules: the shapes of model the region pass must handle.

Not an imitation of any one model: random depth, width, one or two stacks, blocks with or without
cross-attention, adaLN modulation, gated residuals, a second stream, extra conditioning inputs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import strategies as st


@dataclass(frozen=True)
class Spec:
    dim: int
    depths: tuple[int, ...]        # blocks per stack
    cross_attn: bool
    adaln: bool
    gated: bool
    two_streams: bool              # the first stack carries (image, text) like a dual-stream block
    extra_input: bool              # a pooled vector added to the time embedding
    batch: int
    tokens: int
    sequential: bool = False       # the stacks held in nn.Sequential (LongCat-Audio-DiT's text stack)
    # A graph break between the embeddings and the blocks (OmniGen's rotary table, built on the
    # host): Dynamo hands over two graphs, the blocks' cached through runtime.relay; the pooled
    # vector is read after it. Never drawn by specs(): the region pass's own tests trace one graph.
    broken: bool = False


def specs() -> st.SearchStrategy[Spec]:
    return st.builds(
        Spec, dim=st.sampled_from([8, 16]),
        depths=st.lists(st.integers(2, 4), min_size=1, max_size=2).map(tuple),
        cross_attn=st.booleans(), adaln=st.booleans(), gated=st.booleans(),
        two_streams=st.booleans(), extra_input=st.booleans(),
        batch=st.integers(1, 2), tokens=st.integers(3, 9), sequential=st.booleans())


class Block(nn.Module):
    def __init__(self, s: Spec, two: bool):
        super().__init__()
        d = s.dim
        self.s, self.two = s, two
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.cross = nn.Linear(d, 2 * d) if s.cross_attn else None
        self.mod = nn.Linear(d, 3 * d) if s.adaln else None
        self.ffn = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.txt = nn.Linear(d, d) if two else None

    def forward(self, x, txt, temb):
        shift = scale = gate = None
        if self.mod is not None:
            shift, scale, gate = self.mod(F.silu(temb))[:, None].chunk(3, dim=-1)
        h = F.layer_norm(x, x.shape[-1:])
        if shift is not None:
            h = h * (1 + scale) + shift
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        a = self.out(F.scaled_dot_product_attention(q, k, v))
        x = x + (gate * a if (self.s.gated and gate is not None) else a)
        if self.cross is not None:
            ck, cv = self.cross(txt).chunk(2, dim=-1)
            x = x + F.scaled_dot_product_attention(x, ck, cv)
        x = x + self.ffn(F.layer_norm(x, x.shape[-1:]))
        if self.two:
            txt = txt + self.txt(F.layer_norm(txt, txt.shape[-1:]))
            return x, txt
        return x


class RandomDiT(nn.Module):
    def __init__(self, s: Spec):
        super().__init__()
        d = s.dim
        self.s = s
        self.patch = nn.Linear(4, d)
        self.time = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, d))
        self.text = nn.Linear(6, d)
        self.pool = nn.Linear(5, d) if s.extra_input else None
        names = ["blocks", "single_blocks"]
        for i, depth in enumerate(s.depths):
            two = s.two_streams and i == 0
            blocks = [Block(s, two) for _ in range(depth)]
            setattr(self, names[i], nn.Sequential(*blocks) if s.sequential else nn.ModuleList(blocks))
        self.norm_out = nn.LayerNorm(d)
        self.proj_out = nn.Linear(d, 4)

    def forward(self, hidden_states, timestep, encoder_hidden_states, pooled=None, return_dict=True):
        # return_dict as diffusers' models take it (the eager references pass it); a tuple either way
        d = self.s.dim
        freqs = torch.exp(-math.log(10000) * torch.arange(d // 2, dtype=torch.float32) / (d // 2))
        args = timestep[:, None].float() * freqs[None]
        temb = self.time(torch.cat([torch.sin(args), torch.cos(args)], dim=-1))
        x = self.patch(hidden_states)
        txt = self.text(encoder_hidden_states)
        if self.s.broken:
            torch._dynamo.graph_break()
        if self.pool is not None:   # after the break where there is one: the first graph lacks it
            temb = temb + self.pool(pooled)
        for i in range(len(self.s.depths)):
            for block in getattr(self, ["blocks", "single_blocks"][i]):
                out = block(x, txt, temb)
                if isinstance(out, tuple):
                    x, txt = out
                else:
                    x = out
            if i == 0 and len(self.s.depths) > 1:
                x = x + 0.5 * txt.mean(dim=1, keepdim=True)   # glue between the stacks
        return (self.proj_out(self.norm_out(x)),)


def build(s: Spec) -> tuple[RandomDiT, dict]:
    torch.manual_seed(0)
    m = RandomDiT(s).eval()
    kw = dict(hidden_states=torch.randn(s.batch, s.tokens, 4),
              timestep=torch.rand(s.batch) * 1000,
              encoder_hidden_states=torch.randn(s.batch, 3, 6))
    if s.extra_input:
        kw["pooled"] = torch.randn(s.batch, 5)
    return m, kw
