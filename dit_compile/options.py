"""The options of ``backend="mixcache"``: one dataclass, parsed once, with errors that list what is valid."""
from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass
from typing import Any

REGION_COMPILERS = ("inductor", "blocks", "eager")
# Only where torch cannot list its own modes; torch adds modes ("lite" in 2.13), so ask it first.
_FALLBACK_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def inductor_modes() -> tuple[str, ...]:
    """The modes the installed torch's Inductor accepts (``torch.compile(mode=...)``)."""
    try:
        import torch._inductor
        return tuple(torch._inductor.list_mode_options())
    except Exception:  # a torch without the listing: the modes every version has
        return _FALLBACK_MODES


class OptionError(ValueError):
    """An option passed through ``torch.compile(..., options={...})`` is unknown or out of range."""


@dataclass(frozen=True)
class Options:
    # How each region is compiled: "inductor" (the product), "blocks" (Inductor for the blocks
    # only; the prologue, glue and epilogue run as FX graphs, as regional compilation leaves them
    # eager: a shorter first generation for a few more kernel launches per call) or "eager" (every
    # region's FX graph as is; for tests and debugging, where Inductor's compile time is not wanted).
    regions: str = "inductor"
    # Share one compiled artifact between blocks whose graphs are identical.
    share_blocks: bool = True
    # Caching: the MixCache "balanced" preset unless told otherwise; None computes everything (and
    # matches plain Inductor); a preset name, or a dict/list parsed by runtime.policy.make_policy.
    cache: Any = "balanced"
    # Lower MoE dispatches that sync to the host (HiDream, NucleusMoE) in place, as
    # dit_compile.lower_moe does, when they break the graph: the next call traces one graph.
    lower_moe: bool = True
    # How the pipeline's timestep moves through a generation: "falling" with the noise (t or
    # sigma, most pipelines), "rising" (1 - sigma in [0, 1]: Lumina 2's and Z-Image's; 1000 (1 -
    # sigma): Mochi's), or "auto": as each run of a diffusers sampler shows it (falling where
    # none does). The runtime tells generations and steps apart by it.
    timestep: str = "auto"
    # Memory bound on cached tensors, in bytes (None: unbounded).
    cache_memory: int | None = None
    # Inductor's mode for the regions. torch.compile refuses mode= beside options=, so a user who
    # sets options and wants CUDA graphs ("reduce-overhead") says it here.
    mode: str | None = None
    # Compile the regions in a child process while the first calls run their FX graphs, each
    # region switching to Inductor's code at its first call after the child has it ready: a first
    # generation that does not wait for the compile (its early steps uncompiled, slower). Not with
    # CUDA graphs (a mode that records them). dit_compile.wait_for_compiles(model) waits.
    background_compile: bool = False

    @classmethod
    def parse(cls, options: "dict[str, Any] | Options | None") -> "Options":
        """``torch.compile``'s ``options`` for this backend checked and completed with the
        defaults (the cache option parsed too): an ``OptionError`` names what is wrong and lists
        what is valid."""
        if isinstance(options, Options):
            options = dataclasses.asdict(options)      # checked again, as given
        if options is not None and not isinstance(options, dict):
            raise OptionError(f"options must be a dict of mixcache options (or an Options), not "
                              f"{type(options).__name__} {options!r}: e.g. options="
                              "{'cache': 'balanced'}")
        from .runtime.policy import native
        options = {k: native(v) for k, v in (options or {}).items()}    # NumPy values as Python's
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - set(fields))
        if unknown:
            raise OptionError(f"unknown mixcache option(s) {unknown}; valid options: {sorted(fields)}")
        if options.get("cache_memory") is not None:
            options["cache_memory"] = _byte_count(options["cache_memory"])
        opts = cls(**options)
        if opts.regions not in REGION_COMPILERS:
            raise OptionError(f"option regions={opts.regions!r}: must be one of {REGION_COMPILERS}")
        from .runtime.cache import TIMESTEP_DIRECTIONS
        if opts.timestep not in TIMESTEP_DIRECTIONS:
            raise OptionError(f"option timestep={opts.timestep!r}: must be one of "
                              f"{TIMESTEP_DIRECTIONS}")
        for flag in ("share_blocks", "lower_moe", "background_compile"):
            if not isinstance(getattr(opts, flag), bool):
                raise OptionError(f"option {flag}={getattr(opts, flag)!r}: must be True or False")
        modes = inductor_modes()
        if opts.mode is not None and opts.mode not in modes:
            raise OptionError(f"option mode={opts.mode!r}: must be one of {modes} or None")
        if opts.background_compile and opts.mode is not None and _records_cuda_graphs(opts.mode):
            raise OptionError(f"option background_compile=True with mode={opts.mode!r}: CUDA "
                              "graphs are recorded by a compile in this process; choose one")
        # The cache spec is checked here, before the model is seen, so a bad one is an error even
        # where the backend falls back to plain Inductor; the block indices wait for the blocks.
        from .runtime.policy import make_policy
        make_policy(opts.cache, None)
        return opts


def inductor_config(mode: str | None) -> dict[str, Any]:
    """Inductor's config patches for ``mode`` (None or "default": none)."""
    if mode is None or mode == "default":
        return {}
    import torch._inductor
    return dict(torch._inductor.list_mode_options(mode))


def _records_cuda_graphs(mode: str) -> bool:
    return bool(inductor_config(mode).get("triton.cudagraphs"))


def _byte_count(value: Any) -> int:
    """``cache_memory`` as an int: whole-number floats (``2e9``) are bytes too; a bool is not a
    size (Python counts it as an int, so ``True`` would bound the cache to one byte)."""
    whole = (isinstance(value, numbers.Real) and not isinstance(value, bool)
             and (isinstance(value, numbers.Integral) or float(value).is_integer()))
    if not whole or value <= 0:
        raise OptionError(f"option cache_memory={value!r}: must be a positive whole number of bytes "
                          "(such as 2e9) or None")
    return int(value)
