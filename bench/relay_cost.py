"""What the relay adds to each call of a forward broken before its blocks (runtime/relay.py).

The head wrapper (record the call's inputs, tag each output tensor) and the tail's lookup of the
record on its inputs, timed apart from any model, at OmniGen's and Lumina 2's shapes of the hand-off
(four and six tensors), against a call of the same function unwrapped. Host time only: on a GPU
the same Python runs while kernels queue.

    python bench/relay_cost.py
"""
from __future__ import annotations

import argparse
import platform
import timeit

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

        head = Head(fn, (0, 1, 2))

        def best(f) -> float:
            return min(timeit.repeat(f, number=a.number, repeat=a.repeat)) / a.number * 1e6

        plain, wrapped = best(lambda: fn(*args)), best(lambda: head(*args))
        tagged = head(*args)            # the head's last call: its record is taken
        assert received(tagged) is not None
        lookup = best(lambda: received(tagged))
        print(f"| {n} | {plain:.1f} | {wrapped:.1f} | {wrapped - plain:.1f} | {lookup:.1f} |")


if __name__ == "__main__":
    main()
