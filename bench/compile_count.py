"""How many block graphs Inductor compiles per model under ``backend="mixcache"``, with and without
pruned twins (``passes.split.pruned_twins``: a last block whose other outputs nothing reads runs a
mate's compile).

    python bench/compile_count.py [NAME ...]

The models are the tests' tiny configurations (``tests/tiny_models.py``, ``tests/zoo_image.py``,
``tests/zoo_video.py``), compiled with caching off; the counts are read from the backend's INFO log
(one line per piece compiled). Counts, not times: a compile a model is spared costs what its
block's compile costs on the machine at hand.
"""
from __future__ import annotations

import argparse
import collections
import logging
import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import pipelines  # noqa: E402
import tiny_models  # noqa: E402
import zoo_image  # noqa: E402
import zoo_video  # noqa: E402

import dit_compile  # noqa: E402
from dit_compile import inductor  # noqa: E402


class _Compiles(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.kinds: collections.Counter = collections.Counter()

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "compiled piece" in message:
            self.kinds[message.split("(", 1)[1].split(",", 1)[0]] += 1


def _cogvideox() -> tuple[torch.nn.Module, dict]:
    return pipelines.cogvideox_transformer(layers=4), dict(
        hidden_states=torch.randn(1, 3, 4, 8, 8), encoder_hidden_states=torch.randn(1, 16, 32),
        timestep=torch.tensor([500]))


def models() -> dict:
    found = {name: tiny_models.MODELS[name] for name in sorted(tiny_models.MODELS)}
    # The tiny HunyuanVideo's first single-stream block is handed strided tokens: with two, it
    # is no mate for the last; with three, both share the middle one.
    found["hunyuan, 3 single blocks"] = lambda: tiny_models.hunyuan(single_layers=3)
    found["cogvideox"] = _cogvideox
    for zoo in (zoo_image.ZOO, zoo_video.ZOO):
        found.update({name: factory for name, (factory, _, _) in zoo.items()})
    return found


def block_compiles(factory, twins: bool, log: _Compiles) -> tuple[int, dict[str, int]]:
    """Block graphs compiled for one call, and the stacks the region pass found."""
    real = inductor.pruned_twins
    if not twins:
        inductor.pruned_twins = lambda plan, taken=(): {}
    try:
        torch._dynamo.reset()
        dit_compile.frames.install_trace_hook()     # reset() drops it
        model, kwargs = factory()
        log.kinds.clear()
        with torch.no_grad():
            torch.compile(model, backend="mixcache", options={"cache": None})(**kwargs)
        stacks = dit_compile.explain(model, **kwargs).stacks
    finally:
        inductor.pruned_twins = real
    return log.kinds["block"], stacks


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("names", nargs="*", help="models (default: all)")
    names = ap.parse_args().names
    unknown = sorted(set(names) - set(models()))
    if unknown:
        ap.error(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(models())}")
    warnings.filterwarnings("ignore")
    logging.getLogger("torch").setLevel(logging.ERROR)
    log = _Compiles()
    logging.getLogger("dit_compile").addHandler(log)
    logging.getLogger("dit_compile").setLevel(logging.INFO)
    print(f"torch {torch.__version__}; block graphs compiled for one call, caching off\n")
    print("| model | stacks (blocks) | without twins | with twins |")
    print("|---|---|---|---|")
    for name, factory in models().items():
        if names and name not in names:
            continue
        before, stacks = block_compiles(factory, False, log)
        after, _ = block_compiles(factory, True, log)
        shown = ", ".join(f"{s} ({k})" for s, k in stacks.items())
        print(f"| {name} | {shown} | {before} | {after} |", flush=True)


if __name__ == "__main__":
    main()
