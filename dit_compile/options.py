"""The options of ``backend="mixcache"``: one dataclass, parsed once, with errors that list what is valid."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

REGION_COMPILERS = ("inductor", "eager")
INDUCTOR_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


class OptionError(ValueError):
    """An option passed through ``torch.compile(..., options={...})`` is unknown or out of range."""


@dataclass(frozen=True)
class Options:
    # How each region is compiled: "inductor" (the product) or "eager" (run the region's FX graph
    # as is; for tests and debugging, where Inductor's compile time is not wanted).
    regions: str = "inductor"
    # Share one compiled artifact between blocks whose graphs are identical.
    share_blocks: bool = True
    # Caching: the MixCache "balanced" preset unless told otherwise; None computes everything (and
    # matches plain Inductor); a preset name, or a dict/list parsed by runtime.policy.make_policy.
    cache: Any = "balanced"
    # Memory bound on cached tensors, in bytes (None: unbounded).
    cache_memory: int | None = None
    # Inductor's mode for the regions. torch.compile refuses mode= beside options=, so a user who
    # sets options and wants CUDA graphs ("reduce-overhead") says it here.
    mode: str | None = None

    @classmethod
    def parse(cls, options: dict[str, Any] | None) -> "Options":
        options = dict(options or {})
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - set(fields))
        if unknown:
            raise OptionError(f"unknown mixcache option(s) {unknown}; valid options: {sorted(fields)}")
        opts = cls(**options)
        if opts.regions not in REGION_COMPILERS:
            raise OptionError(f"option regions={opts.regions!r}: must be one of {REGION_COMPILERS}")
        if not isinstance(opts.share_blocks, bool):
            raise OptionError(f"option share_blocks={opts.share_blocks!r}: must be True or False")
        if opts.mode is not None and opts.mode not in INDUCTOR_MODES:
            raise OptionError(f"option mode={opts.mode!r}: must be one of {INDUCTOR_MODES} or None")
        if opts.cache_memory is not None and (not isinstance(opts.cache_memory, int)
                                              or opts.cache_memory <= 0):
            raise OptionError(f"option cache_memory={opts.cache_memory!r}: must be a positive "
                              "number of bytes or None")
        return opts
