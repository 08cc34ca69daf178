"""Which run of the sampler a call of the model belongs to, read off the pipeline calling it.

The model's inputs cannot always tell a new generation from the next step of the last one: a run
that starts below the last one's last timestep (img2img at a low strength after a 4-step
generation, or after a generation that a callback or an error stopped) looks like its
continuation. The pipeline knows: every run of a diffusers sampler begins with
``scheduler.set_timesteps``, which makes a new ``scheduler.timesteps`` tensor, and that tensor
stays the same object until the run ends. So the tensor identifies the run, and a call under
another one is a new generation. It is found on the Python stack, in the ``__call__`` frame of the
pipeline (``self.scheduler``) or of a modular pipeline's block (``components.scheduler``); a model
called from anywhere else has no run, and the timestep rules alone decide (runtime/cache.py).
"""
from __future__ import annotations

import os
import sys

import torch

# Frames between the executor and the pipeline: torch.compile's and nn.Module's own call frames,
# the compiled forward's, a pipeline helper that calls the model; generous, and cheap to walk.
MAX_DEPTH = 40
# Folders whose frames hold no pipeline: torch's (Dynamo's and nn.Module's __call__) and the
# runtime's own (the executor's). Reading a frame's locals builds a dict of them, once a call.
_NOT_PIPELINES = (os.path.dirname(torch.__file__) + os.sep, os.path.dirname(__file__) + os.sep)


def sampler_run() -> torch.Tensor | None:
    """The ``timesteps`` tensor of the scheduler whose pipeline is calling the model, or None."""
    frame = sys._getframe(1)
    for _ in range(MAX_DEPTH):
        if frame is None:
            return None
        if (frame.f_code.co_name == "__call__"
                and not frame.f_code.co_filename.startswith(_NOT_PIPELINES)):
            local = frame.f_locals
            for owner in (local.get("components"), local.get("self")):
                if owner is None or isinstance(owner, torch.nn.Module):
                    continue    # a model holds no scheduler (and nn.Module's getattr raises)
                run = getattr(getattr(owner, "scheduler", None), "timesteps", None)
                if isinstance(run, torch.Tensor):
                    return run
        frame = frame.f_back
    return None
