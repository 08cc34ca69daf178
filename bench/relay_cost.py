"""What the relay adds to each call of a forward broken before its blocks (runtime/relay.py).

The head wrapper (record the call's inputs, tag each output tensor) and the tail's lookup of the
record on its inputs, timed apart from any model, at OmniGen's and Lumina 2's shapes of the hand-off
(four and six tensors), against a call of the same function unwrapped. Host time only: on a GPU
the same Python runs while kernels queue. Then, for scale, a tiny OmniGen's computed and reused
calls through ``backend="mixcache"`` (Inductor; a schedule reusing every other step).

    python bench/relay_cost.py
"""
from __future__ import annotations

import argparse
import platform
import timeit
import warnings

import torch

from dit_compile.runtime.relay import Head, received


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--number", type=int, default=20000)
    p.add_argument("--repeat", type=int, default=7)
    a = p.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"best of {a.repeat} x {a.number} calls, microseconds a call")
    print("| outputs tagged | plain call | head call | head adds | tail lookup |")
    print("|---:|---:|---:|---:|---:|")
    for n in (4, 6):
        args = [torch.randn(4) for _ in range(n)]
        outs = tuple(torch.randn(4) for _ in range(n))

        def fn(*_, outs=outs):   # a compiled graph's outputs: new tensors at each call
            return tuple(o.detach() for o in outs)

        # A bare head no later graph takes: it would warn, as for a model, that nothing caches.
        head = Head(fn, (0, 1, 2), range(n))
        warnings.filterwarnings("ignore", message="mixcache: the model: its forward breaks")

        def best(f) -> float:
            return min(timeit.repeat(f, number=a.number, repeat=a.repeat)) / a.number * 1e6

        plain, wrapped = best(lambda: fn(*args)), best(lambda: head(*args))
        tagged = head(*args)            # the head's last call: its record is taken
        assert received(tagged) is not None
        lookup = best(lambda: received(tagged))
        print(f"| {n} | {plain:.1f} | {wrapped:.1f} | {wrapped - plain:.1f} | {lookup:.1f} |")
    omnigen_calls()


def omnigen_calls(steps: int = 20, generations: int = 3) -> None:
    """Median call times of a tiny OmniGen by what the call did, over the generations after the
    first (which compiles)."""
    import statistics
    import time

    import dit_compile
    from pipelines import omnigen_transformer
    model, kw = omnigen_transformer()
    f = torch.compile(model, backend="mixcache",
                      options={"cache": {"rule": "schedule", "step": list(range(1, steps, 2))}})
    times: dict[str, list[float]] = {}
    with torch.no_grad():
        for g in range(generations):
            for t in torch.linspace(0.95, 0.05, steps).tolist():
                start = time.perf_counter()
                f(**dict(kw, timestep=torch.tensor([t])))
                took = time.perf_counter() - start
                if g:
                    action = dit_compile.stats(f)["trace"][-1]["action"]
                    times.setdefault(action, []).append(took)
    print(f"\ntiny OmniGen through the backend, median of {steps * (generations - 1)} calls:")
    for action, ts in times.items():
        print(f"  {action}: {statistics.median(ts) * 1e6:.0f} us ({len(ts)} calls)")


if __name__ == "__main__":
    main()
