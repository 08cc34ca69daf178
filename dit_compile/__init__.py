"""dit-compile: a torch.compile backend for diffusion-transformer inference.

    torch.compile(transformer, backend="mixcache")

Installing the package registers the backend through the ``torch_dynamo_backends`` entry point; no
import is needed. Where the package is importable but not installed, pass the function itself:
``torch.compile(transformer, backend=dit_compile.mixcache)``.
"""
from __future__ import annotations

from .backend import mixcache
from .explain import Report, explain
from .options import OptionError, Options

__all__ = ["mixcache", "explain", "Report", "Options", "OptionError"]
