"""The stitched callable that Dynamo runs in place of the traced graph.

Contract: ``Executor(plan, fns)(*graph_inputs)`` returns what the traced graph returns, running
``fns[i]`` (the compiled form of ``plan.pieces[i]``) over one value table. Everything that can be
decided at compile time (which slots each piece reads and writes, when a slot is dead) is decided in
``__init__``; a call is indexing and the compiled pieces, nothing else.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

from torch.utils import _pytree as pytree

from ..passes.split import Plan


class Executor:
    def __init__(self, plan: Plan, fns: Sequence[Callable[..., Any]]):
        self.plan = plan
        self.fns = list(fns)
        self._pad = [None] * (plan.n_slots - plan.n_inputs)
        out_slots = {s for s in plan.out_leaves if isinstance(s, int)}
        # Free each slot after the last piece that reads it, so block outputs of a 40-layer stack
        # are not all alive at once; outputs and graph inputs are never freed here.
        last_read: dict[int, int] = {}
        for i, p in enumerate(plan.pieces):
            for s in p.args:
                last_read[s] = i
        frees: list[list[int]] = [[] for _ in plan.pieces]
        for s, i in last_read.items():
            if s >= plan.n_inputs and s not in out_slots:
                frees[i].append(s)
        self.calls = [(fn, p.args, p.outs, p.single, tuple(f))
                      for fn, p, f in zip(self.fns, plan.pieces, frees)]
        self._flat_out = plan.out_spec.num_leaves == len(plan.out_leaves) and all(
            isinstance(s, int) for s in plan.out_leaves)

    def run(self, env: list[Any], start: int = 0, stop: int | None = None) -> None:
        """Run pieces ``start:stop`` over ``env`` in place."""
        for fn, args, outs, single, frees in self.calls[start:stop]:
            r = fn(*[env[i] for i in args])
            if single:
                env[outs[0]] = r
            else:
                for o, v in zip(outs, r):
                    env[o] = v
            for s in frees:
                env[s] = None

    def output(self, env: list[Any]) -> Any:
        leaves = [env[s] if isinstance(s, int) else s[1] for s in self.plan.out_leaves]
        return pytree.tree_unflatten(leaves, self.plan.out_spec)

    def __call__(self, *args: Any) -> Any:
        env = [*args, *self._pad]
        self.run(env)
        return self.output(env)
