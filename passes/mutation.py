"""Which inputs a graph writes into. A forward that fills a KV cache it is handed (AnyFlow-FAR's
prefill call returns nothing else) has an effect a reused call would skip; a block that does
``x += f(x)`` changes the value a probe residual is taken against."""
from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
from torch.multiprocessing.reductions import StorageWeakRef

from .inputs import source_name

_INPLACE_OPERATORS = {operator.setitem, operator.iadd, operator.isub, operator.imul,
                      operator.itruediv, operator.ifloordiv, operator.imod, operator.ipow,
                      operator.imatmul, operator.iand, operator.ior, operator.ixor,
                      operator.ilshift, operator.irshift}


def written(n: fx.Node) -> Any:
    """The value ``n`` writes into (its first argument, or its ``out=``), or None where ``n``
    writes nothing. Dynamo's graphs are not functionalized: an in-place op is the method or function
    of its name with a trailing underscore (``copy_``, ``torch.relu_``), an augmented assignment
    or a ``setitem``."""
    if n.op not in ("call_function", "call_method"):
        return None
    if "out" in n.kwargs:
        return n.kwargs["out"]
    if n.target in _INPLACE_OPERATORS:
        return n.args[0] if n.args else None
    if n.op == "call_function" and getattr(n.target, "__module__", None) in ("_operator", "operator"):
        return None     # and_, or_, not_, is_: named like in-place ops, pure
    name = n.target if n.op == "call_method" else getattr(n.target, "__name__", "")
    if isinstance(name, str) and name.endswith("_") and not name.endswith("__"):
        return n.args[0] if n.args else None
    return None


def written_inputs(gm: fx.GraphModule) -> list[fx.Node]:
    """The placeholders of ``gm`` whose memory it writes into: directly or through a view (the
    fake values Dynamo recorded share a storage exactly where the real ones will). A write into a
    value with no fake tensor recorded counts against every input: an unknown is never taken for
    a pure function."""
    inputs: dict[Any, list[fx.Node]] = {}
    for p in gm.graph.find_nodes(op="placeholder"):
        if isinstance(v := example_value(p), torch.Tensor):
            inputs.setdefault(_storage(v) or id(p), []).append(p)
    every = [p for ps in inputs.values() for p in ps]
    hit: dict[fx.Node, None] = {}
    for n in gm.graph.nodes:
        target = written(n)
        if target is None:
            continue
        value = example_value(target) if isinstance(target, fx.Node) else None
        if isinstance(value, (bool, int, float, torch.SymBool, torch.SymInt, torch.SymFloat)):
            continue    # a number holds no memory to write into
        key = _storage(value)
        hit.update(dict.fromkeys(every if key is None else inputs.get(key, [])))
    return list(hit)


def example_value(n: fx.Node) -> Any:
    """The fake value Dynamo (``example_value``) or a later trace (``val``) recorded for ``n``."""
    return n.meta.get("example_value", n.meta.get("val"))


def _storage(v: Any) -> StorageWeakRef | None:
    """``v``'s storage, or None: not a tensor, or one without a storage (sparse)."""
    if not isinstance(v, torch.Tensor):
        return None
    while torch._C._functorch.is_batchedtensor(v):    # inside a traced vmap (a flex mask's)
        v = torch._C._functorch.get_unwrapped(v)
    try:
        return StorageWeakRef(v.untyped_storage())
    except (NotImplementedError, RuntimeError):
        return None


def writes_inputs(gm: fx.GraphModule) -> str | None:
    """Why nothing of ``gm`` can be reused where it writes into its inputs, or None. A reused call
    (a step, a branch, a span of blocks) would skip the writes, and a later call would read what
    they left undone: AnyFlow-FAR's KV cache, filled by a call of its own."""
    names = [source_name(p) for p in written_inputs(gm)]
    if not names:
        return None
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return (f"this forward writes into its inputs in place ({shown}), and a reused call would "
            "skip the writes")
