"""``fit_teacache``: TeaCache's rescaling polynomial, fitted to one model by running it.

TeaCache reuses a step while the accumulated change of the first block's timestep-modulated input
stays below a threshold, but it accumulates that change mapped through a polynomial fitted offline
to each model: how far the input moved says how far the output will move only up to a factor that
depends on the model and the noise level. The fit needs the same signal the rule reads, found in
the compiled graph by dataflow, so it runs through the compiled model itself: the runtime records
the pairs, and a least-squares fit maps one to the other.
"""
from __future__ import annotations

import numbers
import threading
from typing import Any, Callable

import torch

from .runtime.cache import find_state


def fit_teacache(model: torch.nn.Module, run: Callable[[], Any], degree: int = 4) -> list[float]:
    """Fit the ``teacache`` rule's ``coefficients`` for ``model`` on the generations ``run`` makes.

    ``model`` is compiled with ``backend="mixcache"`` and a ``teacache`` rule (signal
    ``"modulated"``, TeaCache's, or ``"input"``; any threshold); ``run()`` generates with it, one
    or more generations, on prompts and seeds other than those to be judged. While it runs, every
    call computes, and per sample and guidance branch the relative L1 change of the rule's signal
    and of the output since the branch's previous call are recorded. A polynomial of ``degree``
    fitted by least squares maps the one to the other. Returns its coefficients, highest degree
    first (numpy.polyfit's order, as TeaCache publishes them), for
    ``{"rule": "teacache", "coefficients": [...], ...}``; compiling with them is a new
    configuration, so its cache starts empty.

    The model's cache and counters are dropped before and after (as ``dit_compile.reset``). Where
    the model has not run in this configuration yet (not at all, or another compile of the same
    module ran since), ``run`` is called once more, first, to make its state."""
    from .sketch import refuse_split
    refuse_split(model, "fit_teacache")
    # A NumPy integer is an integer (a degree taken from np.arange), as in the options.
    if not isinstance(degree, numbers.Integral) or isinstance(degree, bool) or not 1 <= degree <= 7:
        raise ValueError(f"degree={degree!r}: must be an integer from 1 to 7 (the rule takes up to "
                         "8 coefficients)")
    degree = int(degree)
    # The state hangs on the model's parameters, shared by every compile of the model; a run of
    # this one replaces another configuration's state with its own at its first call. Recorded
    # only where the state that was asked to record is still the model's after the run.
    def mine() -> Any:      # the calling thread's: another thread may generate meanwhile
        return find_state(model, threading.current_thread())
    state, pairs = mine(), None
    try:
        for _ in range(2):
            if state is not None:
                state.reset()
                state.calibration = []
            try:
                run()
            finally:
                if state is not None:
                    pairs, state.calibration = state.calibration, None
            now = mine()
            if now is not None and now is state:
                break
            state, pairs = now, None      # that run compiled the model, or made its own state
    finally:
        # Dropped after as well, a run that raised included: its calls computed everything.
        for each in {id(s): s for s in (state, mine()) if s is not None}.values():
            each.reset()
            each.clear_stats()
    if state is None:
        raise ValueError("fit_teacache: this model has no mixcache state after running: compile "
                         "it with backend='mixcache' and a teacache rule, and have run() call it")
    if not pairs:
        raise ValueError("fit_teacache: nothing recorded: the model must be compiled with a "
                         "teacache rule (signal 'modulated' or 'input'), and run() must call it "
                         "over at least two steps")
    x = torch.cat([c.detach().double().cpu().flatten() for c, _ in pairs])
    y = torch.cat([o.detach().double().cpu().flatten() for _, o in pairs])
    if x.unique().numel() <= degree:
        raise ValueError(f"fit_teacache: {x.unique().numel()} distinct changes recorded, too few "
                         f"for a polynomial of degree {degree}: run more steps or generations")
    return _polyfit(x, y, degree)


def _polyfit(x: torch.Tensor, y: torch.Tensor, degree: int) -> list[float]:
    """numpy.polyfit's least-squares fit of ``y`` on ``x`` (float64), highest degree first.

    Its columns scaled to unit norm before solving, and its cut-off for small singular values,
    as numpy's: over the changes a latent makes in a step (0.01-0.03), the column of x^7 is 1e-12
    of the constant's, and the solver's own cut-off dropped the high degrees unscaled (degree 7
    fitted no better than degree 5, its polynomial up to 0.018 off numpy's over the data)."""
    vander = torch.vander(x, degree + 1)     # columns x^degree .. x^0: highest degree first
    scale = vander.square().sum(0).sqrt()    # none zero: x has more than degree distinct values
    rcond = len(x) * torch.finfo(torch.float64).eps
    solution = torch.linalg.lstsq(vander / scale, y.unsqueeze(1), rcond=rcond,
                                  driver="gelsd").solution
    return [float(c) for c in solution.flatten() / scale]
