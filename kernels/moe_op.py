"""The operator ``dit_compile::moe_ffn``: a routed SwiGLU expert FFN as one opaque node.

Contract (shapes with T tokens, k slots per token, E experts, model dim D, expert hidden dim H)::

    x                [T, D]     float32 | float16 | bfloat16 (float64: plain torch on every device)
    expert_ids       [T, k]     any integer dtype
    routing_weights  [T, k]     any float dtype
    w1 (gate)        [E, H, D]  same dtype as x; any strides
    w3 (up)          [E, H, D]  same dtype as x; any strides
    w2 (down)        [E, D, H]  same dtype as x; any strides
    returns          [T, D]     dtype of x, contiguous

    out[t] = sum_j routing_weights[t, j] * w2[e] @ (silu(w1[e] @ x[t]) * (w3[e] @ x[t])),  e = expert_ids[t, j]

A slot whose expert id lies outside [0, E) contributes nothing (padding rows, experts owned by another
device). Products accumulate in float32 (float64 for float64 inputs); the hidden activation
``silu(gate) * up`` is rounded to x's dtype before the down projection, as the Triton kernel stores it.
The weights take the layout of ``nn.Linear.weight`` stacked over experts, which is how diffusers'
HiDream experts (``w1``, ``w3``, ``w2``) store them; transposed views of pre-stacked weights (NucleusMoE's
``gate_up_proj``/``down_proj``) are accepted without a copy.

Implementations: CPU (and any device without a kernel) runs :func:`moe_ffn_reference` in plain torch;
CUDA runs the Triton kernel in :mod:`dit_compile.kernels.moe` for float32, float16 and bfloat16 (other
dtypes, float64, the reference), imported on first use so that this
module, and the lowering pass that depends on it, import without Triton. The fake implementation lets
Dynamo, Inductor and ``torch.export`` keep the call as a single node. Inference only: no autograd
formula is registered, so a backward through the op raises instead of returning wrong gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["moe_ffn", "moe_ffn_reference"]


def moe_ffn_reference(
    x: Tensor, expert_ids: Tensor, routing_weights: Tensor, w1: Tensor, w3: Tensor, w2: Tensor
) -> Tensor:
    """The op's semantics in plain torch (see the module docstring); also its CPU implementation.

    Loops over experts and reads token counts on the host: simple and exact, not fast. Called with
    float64 tensors it is the oracle the Triton kernel is tested against.
    """
    acc_dtype = torch.promote_types(x.dtype, torch.float32)
    num_tokens, dim = x.shape
    out = torch.zeros(num_tokens, dim, dtype=acc_dtype, device=x.device)
    for expert in range(w1.shape[0]):
        tokens, slots = torch.nonzero(expert_ids == expert, as_tuple=True)
        if tokens.numel() == 0:
            continue
        xe = x[tokens].to(acc_dtype)
        hidden = F.silu(xe @ w1[expert].to(acc_dtype).T) * (xe @ w3[expert].to(acc_dtype).T)
        hidden = hidden.to(x.dtype).to(acc_dtype)  # the kernel keeps the hidden activation in x's dtype
        y = hidden @ w2[expert].to(acc_dtype).T
        out.index_add_(0, tokens, y * routing_weights[tokens, slots].to(acc_dtype)[:, None])
    return out.to(x.dtype)


def _check_args(x: Tensor, expert_ids: Tensor, routing_weights: Tensor, w1: Tensor, w3: Tensor, w2: Tensor) -> None:
    # torch._check works on symbolic sizes too, so the fake implementation can share it.
    torch._check(x.dim() == 2, lambda: f"moe_ffn: x must be [T, D], got {tuple(x.shape)}")
    torch._check(
        expert_ids.dim() == 2 and expert_ids.shape[0] == x.shape[0],
        lambda: f"moe_ffn: expert_ids must be [T, k] with T={x.shape[0]}, got {tuple(expert_ids.shape)}",
    )
    torch._check(not expert_ids.is_floating_point() and not expert_ids.is_complex(), lambda: "moe_ffn: expert_ids must be integer")
    torch._check(
        routing_weights.shape == expert_ids.shape and routing_weights.is_floating_point(),
        lambda: f"moe_ffn: routing_weights must be a float [T, k] like expert_ids, got {tuple(routing_weights.shape)}",
    )
    torch._check(w1.dim() == 3 and w3.shape == w1.shape, lambda: "moe_ffn: w1 and w3 must both be [E, H, D]")
    num_experts, hidden, dim = w1.shape
    torch._check(dim == x.shape[1], lambda: f"moe_ffn: w1 is [E, H, {dim}] but x has D={x.shape[1]}")
    torch._check(
        w2.dim() == 3 and tuple(w2.shape) == (num_experts, dim, hidden),
        lambda: f"moe_ffn: w2 must be [E, D, H] = {(num_experts, dim, hidden)}, got {tuple(w2.shape)}",
    )
    torch._check(
        x.dtype == w1.dtype == w3.dtype == w2.dtype,
        lambda: f"moe_ffn: x and the weights must share a dtype, got {x.dtype}, {w1.dtype}, {w3.dtype}, {w2.dtype}",
    )


@torch.library.custom_op("dit_compile::moe_ffn", mutates_args=())
def moe_ffn(x: Tensor, expert_ids: Tensor, routing_weights: Tensor, w1: Tensor, w3: Tensor, w2: Tensor) -> Tensor:
    """Routed SwiGLU expert FFN; see the module docstring for shapes and semantics."""
    _check_args(x, expert_ids, routing_weights, w1, w3, w2)
    return moe_ffn_reference(x, expert_ids, routing_weights, w1, w3, w2)


@moe_ffn.register_fake
def _moe_ffn_fake(x: Tensor, expert_ids: Tensor, routing_weights: Tensor, w1: Tensor, w3: Tensor, w2: Tensor) -> Tensor:
    _check_args(x, expert_ids, routing_weights, w1, w3, w2)
    return x.new_empty(x.shape)


# What the Triton kernel computes in: its dots accumulate in fp32 and it picks tiles and precision
# for these only (float64 gave zeros under the interpreter, its dots having no fp64 form there).
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@moe_ffn.register_kernel("cuda")
def _moe_ffn_cuda(x: Tensor, expert_ids: Tensor, routing_weights: Tensor, w1: Tensor, w3: Tensor, w2: Tensor) -> Tensor:
    _check_args(x, expert_ids, routing_weights, w1, w3, w2)
    if x.dtype not in KERNEL_DTYPES:
        # A float64 model (a reference run) gets the exact plain-torch result, slowly, not the kernel's.
        return moe_ffn_reference(x, expert_ids, routing_weights, w1, w3, w2)
    from .moe import moe_ffn_triton  # Triton is needed only where the kernel runs

    return moe_ffn_triton(x, expert_ids, routing_weights, w1, w3, w2)
