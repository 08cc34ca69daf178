"""Where Dynamo's trace of a block stack goes: the blocks' bodies, their parameters, the hooks.

    python bench/trace_cost.py [--layers 30] [--runs 3]

A study for issue 2's first generation: Dynamo's trace alone
(``backend="eager"``, ``fullgraph=True``, first call) of bench/wan_speed.py's tiny Wan, each way in
a fresh process, runs alternated:

- ``inlined``: the model as it is; Dynamo traces every block.
- ``nested``: ``dit_compile.nest_blocks`` (Dynamo stamps out a traced region from torch 2.12 on).
- ``stamped``: ``dit_compile.nest_blocks(model, stamp=True)``: the first block traced, each later
  one an opaque call the mixcache backend replaces by the first block's nodes
  (``passes/stamping.py``). Here traced as mixcache's compile traces it (another backend's traces
  them as nested regions: the study says otherwise by hand), the calls run eagerly.
- ``opaque``: each block call is one custom op, ``trace_cost::block(key, inputs, parameters)``,
  whose fake implementation runs the block on the fake tensors (so Dynamo still learns the output's
  shape from the block itself, outside its bytecode tracer); the wrapper hands it the block's
  parameters as ``list(self.parameters())``, which Dynamo traces.
- ``opaque, parameters listed``: the same, the parameters listed on the block before compiling.
- ``opaque, listed, no block run``: the same, the fake returning an empty tensor of the input's
  shape: what the call and its parameters cost Dynamo.
- ``layerwise casting``: ``enable_layerwise_casting`` (bf16 storage, fp32 compute) and the traced
  form ``backend="mixcache"`` gives it (``dit_compile.functional_casting``).
- ``layerwise casting, as before``: the same as that form was until 2026-12-06: every hooked layer
  had its weights swapped in (``_reparametrize_module``) inside diffusers' hook wrapper (since,
  plain linear and conv layers call their functional form, and the wrapper is skipped where the
  casting is a layer's only hook).

The op here is the study's own, for Wan's block signature only, and nothing in the package uses it;
the casting rows run the package's own pass.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

def one(way: str, layers: int) -> float:
    """Runs in the child process: build the model, set it up as ``way`` says, time the first
    call under ``backend="eager"``."""
    import time

    import diffusers.pipelines  # noqa: F401  what a pipeline process has imported
    import torch
    from diffusers import WanTransformer3DModel
    from wan_speed import CONFIGS, model_kwargs

    kw = {**CONFIGS["tiny"], "num_layers": layers}
    torch.manual_seed(0)
    model = WanTransformer3DModel(**model_kwargs(kw)).eval()
    x = torch.randn(1, 16, 2, 8, 8)
    text = torch.randn(1, 16, kw["text_dim"])
    WAYS[way](model)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    start = time.perf_counter()
    with torch.no_grad():
        out = compiled(x, torch.tensor([900.0]), text, return_dict=False)[0]
    first = time.perf_counter() - start
    with torch.no_grad():   # the op runs the blocks for real: the output must be the model's
        torch.testing.assert_close(out, model(x, torch.tensor([900.0]), text, return_dict=False)[0])
    return first


def _nested(model) -> None:
    import dit_compile
    dit_compile.nest_blocks(model)


def _stamped(model) -> None:
    import dit_compile
    import dit_compile.passes.nesting as nesting
    dit_compile.nest_blocks(model, stamp=True)
    # Stamped blocks are traced as such only when mixcache compiles: said here by hand.
    nesting.stamping = lambda: True


def _cast(model, as_before: bool = False) -> None:
    import torch
    from dit_compile.passes import casting
    if as_before:
        casting._plain_layer = casting._wraps = lambda *args: None
    model.enable_layerwise_casting(storage_dtype=torch.bfloat16, compute_dtype=torch.float32)
    casting.functional_casting(model)


def _make_opaque(model, listed: bool, run_block: bool) -> None:
    import torch

    blocks = list(model.blocks)
    in_fake = [False]       # the fake runs the block's forward, which must not call the op again

    def run(key: int, inputs: list, params: list):
        block = blocks[key]
        names = [n for n, _ in block.named_parameters()]
        h, e, temb, cos, sin = inputs
        return [torch.func.functional_call(block, dict(zip(names, params)), (h, e, temb, (cos, sin)))]

    @torch.library.custom_op("trace_cost::block", mutates_args=(),
                             schema="(int key, Tensor[] inputs, Tensor[] params) -> Tensor[]")
    def block_op(key: int, inputs: list[torch.Tensor], params: list[torch.Tensor]) -> list[torch.Tensor]:
        in_fake[0] = True
        try:
            return [t.clone() for t in run(key, inputs, params)]
        finally:
            in_fake[0] = False

    @block_op.register_fake
    def _(key, inputs, params):
        if not run_block:
            return [torch.empty_like(inputs[0])]
        in_fake[0] = True
        try:
            return run(key, inputs, params)
        finally:
            in_fake[0] = False

    cls = type(blocks[0])
    forward = cls.forward

    def opaque(self, hidden_states, encoder_hidden_states, temb, rotary_emb):
        if in_fake[0] or not torch.compiler.is_compiling():
            return forward(self, hidden_states, encoder_hidden_states, temb, rotary_emb)
        params = self._listed if listed else list(self.parameters())
        inputs = [hidden_states, encoder_hidden_states, temb, rotary_emb[0], rotary_emb[1]]
        return block_op(self._key, inputs, params)[0]

    for key, block in enumerate(blocks):
        block._key = key
        block._listed = list(block.parameters())
    cls.forward = opaque


WAYS = {
    "inlined": lambda model: None,
    "nested (`nest_blocks`)": _nested,
    "stamped (`nest_blocks(stamp=True)`)": _stamped,
    "opaque": lambda model: _make_opaque(model, listed=False, run_block=True),
    "opaque, parameters listed": lambda model: _make_opaque(model, listed=True, run_block=True),
    "opaque, listed, no block run": lambda model: _make_opaque(model, listed=True, run_block=False),
    "layerwise casting": _cast,
    "layerwise casting, as before": lambda model: _cast(model, as_before=True),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(one(args.child, args.layers)))
        return

    import diffusers
    import torch
    times: dict[str, list[float]] = {name: [] for name in WAYS}
    for _ in range(args.runs):
        for name in WAYS:
            out = subprocess.run([sys.executable, "-P", __file__, "--child", name, "--layers",
                                  str(args.layers)], env=dict(os.environ, PYTHONWARNINGS="ignore"),
                                 capture_output=True, text=True)
            if out.returncode != 0:
                raise SystemExit(f"{name} failed:\n{out.stderr[-3000:]}")
            times[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"done: {name}: {times[name][-1]:.2f} s", file=sys.stderr)
    print(f"`python bench/trace_cost.py --layers {args.layers} --runs {args.runs}`\n\ntiny Wan, "
          f"{args.layers} layers, cpu, torch {torch.__version__}, diffusers {diffusers.__version__},"
          f" {os.cpu_count()} CPUs; Dynamo's trace alone (first call, backend eager), each run a "
          "fresh process\n")
    print("| blocks | first call, s |")
    print("|---|---|")
    for name, ts in times.items():
        print(f"| {name} | {' / '.join(f'{t:.2f}' for t in ts)} |")


if __name__ == "__main__":
    main()
