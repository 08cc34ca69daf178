"""Compiling a graph's pieces in a child process while the model runs (``background_compile``).

A first generation otherwise waits for Inductor before its first step: on an H100, regional
compilation's 19 s first generation against 5.7 s for the next ones is mostly that wait. Here the
backend hands the pieces it would compile to one child process per graph and returns at once;
until a piece's artifact is ready the piece runs as its FX graph (the ops Dynamo traced, as
``regions="eager"`` runs them), and at the first call after the child has saved it the artifact is
loaded and runs from then on. Outputs move by the eager-vs-Inductor difference at the switch, no
more.

Why a process: a thread's compile would hold the GIL the eager calls need (each op gives it up and
waits for it back). Why this wire: the piece travels as an FX graph (``GraphPickler``) with its
node metadata dropped (Dynamo's fake tensors do not pickle), and its inputs as shapes, strides,
dtypes and devices; the child rebuilds the metadata from empty tensors of those layouts,
compiles with ``torch._inductor.standalone_compile`` and saves the artifact (written atomically,
so a file that exists is whole); the parent loads it with ``CompiledArtifact.load``. A child that
fails is a warning naming why, and the piece is then compiled in this process as it would have been
without the option.

The child (``WORKER``: this file run on its own, then ``child``) starts in the job's own temporary
folder, so that a source tree in the user's working directory cannot shadow what it imports.
"""
from __future__ import annotations

import copy
import importlib
import logging
import os
import pickle
import subprocess
import sys
import tempfile
import time
import warnings
import weakref
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

log = logging.getLogger("dit_compile")

# The child's command, the job's path appended: this file run on its own (it imports only torch),
# not the package, whose import (diffusers among it) would add seconds to the child's start; a
# job whose graphs hold the package's own ops imports it (``imports``).
WORKER = [sys.executable, "-c",
          "import runpy, sys; runpy.run_path(sys.argv[1])['child'](sys.argv[2])",
          os.path.abspath(__file__)]
POLL_S = 0.05          # the least time between two looks for a finished artifact, per piece
# Children compiling at once, at most: a forward Dynamo breaks into many graphs would otherwise
# start a process (torch imported, a CUDA context) per graph; past this, graphs compile here.
MAX_CHILDREN = 2
_children: "weakref.WeakSet[Job]" = weakref.WeakSet()


def room() -> bool:
    """Whether another child may start now (``MAX_CHILDREN``)."""
    return sum(job.proc.poll() is None for job in _children) < MAX_CHILDREN


def shippable(inputs: Sequence[Any]) -> bool:
    """Whether a piece with these example inputs can be compiled elsewhere: tensors of concrete
    sizes and strides only (a symbolic size lives in this process's shape environment)."""
    return all(isinstance(x, torch.Tensor)
               and all(isinstance(d, int) for d in (*x.shape, *x.stride())) for x in inputs)


def _spec(x: torch.Tensor) -> tuple[Any, ...]:
    return tuple(x.shape), tuple(x.stride()), x.dtype, str(x.device)


def _bare(gm: fx.GraphModule) -> fx.GraphModule:
    """``gm`` with no node metadata, which is where Dynamo's fake tensors are."""
    graph = copy.deepcopy(gm.graph)
    for n in graph.nodes:
        n.meta = {}
    return fx.GraphModule(gm, graph)


def _settings() -> dict[str, dict[str, Any]]:
    """The compile settings the user changed in this process (``torch._inductor.config`` and
    ``torch.compiler.config``, patched or set: ``coordinate_descent_tuning``, a debug trace,
    caches off), for the child to compile as a compile here would. A custom pass (a callable of
    this process) cannot travel: refused, and the graph compiles here."""
    import torch.compiler.config
    from torch._inductor import config
    # Not the caches' settings: the child's artifact is made of what its compile caches.
    changed = {name: {k: v for k, v in module._get_dict(ignored_prefixes=["_"],
                                                          skip_default=True).items()
                      if "cache" not in k}
               for name, module in (("inductor", config), ("compiler", torch.compiler.config))}
    passes = sorted(k for d in changed.values() for k, v in d.items()
                    if callable(v) or hasattr(v, "uuid"))
    if passes:
        raise ValueError(f"Inductor's {', '.join(passes)} holds a pass of this process, which a "
                         "child process cannot run")
    return changed


def _imports(graphs: Sequence[fx.GraphModule]) -> list[str]:
    """What the child imports to have the graphs' custom ops: this package, for its own."""
    ours = any(isinstance(n.target, torch._ops.OpOverload) and n.target.namespace == "dit_compile"
               for gm in graphs for n in gm.graph.nodes)
    return ["dit_compile"] if ours else []


class Job:
    """One child process compiling a graph's pieces, in the order given, into one folder."""

    def __init__(self, pieces: Sequence[tuple[fx.GraphModule, Sequence[torch.Tensor]]],
                 options: dict[str, Any], name: str):
        from torch.fx._graph_pickler import GraphPickler, Options
        # Ops the child has: torch's own, and this package's (which it then imports, _imports); a
        # graph with any other custom op (a user's) is refused here, and compiles in the process.
        shipped = Options(ops_filter=lambda op: op.startswith(
            ("torch.ops.aten.", "torch.ops.prims.", "torch.ops.dit_compile.")))
        self.name = name
        self.forward: Callable[..., Any] | None = None     # the model class's (register)
        self.pieces: "weakref.WeakSet[Swapping]" = weakref.WeakSet()
        # (The child removes it itself if this process dies first: _exit_with_parent.)
        self.folder = tempfile.TemporaryDirectory(prefix="mixcache-compile-",
                                                  ignore_cleanup_errors=True)
        job = {"options": options, "settings": _settings(),
               "imports": _imports([gm for gm, _ in pieces]),
               "pieces": [(GraphPickler.dumps(_bare(gm), shipped), [_spec(x) for x in inputs])
                          for gm, inputs in pieces]}
        path = os.path.join(self.folder.name, "job.pkl")
        with open(path, "wb") as f:
            pickle.dump(job, f)
        self.started = time.perf_counter()
        self.log = open(os.path.join(self.folder.name, "child.log"), "wb")
        # The child's stdin is a pipe this process holds open: it ends when this process does,
        # however it ends (killed included), and the child then stops (_exit_with_parent).
        self.proc = subprocess.Popen([*WORKER, path], cwd=self.folder.name, stdout=self.log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.PIPE)
        # A process that exits before its child is done does not leave it compiling.
        self._stop = weakref.finalize(self, _stop, self.proc, self.log, self.folder)
        _children.add(self)

    def artifact(self, i: int) -> str | None:
        """The path of piece ``i``'s artifact once saved; None while the child works on it."""
        path = os.path.join(self.folder.name, f"{i}.bin")
        return path if os.path.exists(path) else None

    def failure(self) -> str | None:
        """Why the child stopped without every artifact, once it has; None otherwise."""
        if self.proc.poll() in (None, 0):
            return None
        self.log.flush()
        with open(self.log.name, "rb") as f:
            tail = f.read().decode(errors="replace").strip().splitlines()[-6:]
        return f"exit status {self.proc.returncode}: " + " | ".join(tail)

    def wait(self, timeout: float | None = None) -> None:
        self.proc.wait(timeout)


def _stop(proc: subprocess.Popen, logfile: Any, folder: tempfile.TemporaryDirectory) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    if proc.stdin is not None:
        proc.stdin.close()
    logfile.close()
    folder.cleanup()


def _exit_with_parent(folder: str) -> None:
    """In the child: stop, removing the job's folder, once the parent is gone (its end of the
    stdin pipe closed), so that a parent killed mid-compile leaves no child compiling on."""
    import shutil
    import threading

    def watch() -> None:
        # The file descriptor, not sys.stdin: a daemon thread blocked in a buffered read holds
        # its lock, and the interpreter's shutdown aborts on it.
        while os.read(0, 4096):
            pass
        shutil.rmtree(folder, ignore_errors=True)
        os._exit(1)
    threading.Thread(target=watch, daemon=True).start()


class Swapping:
    """A piece's callable: its FX graph until the child's artifact is ready, then the artifact.

    ``finish`` wraps the loaded artifact as the backend wraps its own compiles (the output
    structure, the traced strides); ``compile_here`` compiles the piece in this process from a
    call's arguments, for a child that failed."""

    def __init__(self, job: Job, index: int, piece: fx.GraphModule,
                 finish: Callable[[Callable[..., Any]], Callable[..., Any]],
                 compile_here: Callable[[list[Any]], Callable[..., Any]]):
        self.job, self.index, self.piece = job, index, piece
        job.pieces.add(self)
        self.finish, self.compile_here = finish, compile_here
        self.fn: Callable[..., Any] | None = None
        self.eager_calls = 0
        self._next_look = 0.0

    def __call__(self, *args: Any) -> Any:
        fn = self.fn
        if fn is None:
            now = time.monotonic()
            if now < self._next_look:
                self.eager_calls += 1
                return self.piece(*args)
            self._next_look = now + POLL_S
            fn = self.swap(list(args))
            if fn is None:
                self.eager_calls += 1
                return self.piece(*args)
        return fn(*args)

    def swap(self, args: list[Any] | None = None) -> Callable[..., Any] | None:
        """The compiled callable if it is ready now (loading it at this first look), else None.
        With ``args``, a failed child is reported and the piece compiled here from them."""
        if self.fn is not None:
            return self.fn
        path = self.job.artifact(self.index)
        if path is not None:
            start = time.perf_counter()
            artifact = torch._inductor.CompiledArtifact.load(path=path, format="binary")
            self.fn = self.finish(artifact)
            self.job.proc.poll()        # reaped once done: no zombie till the Job is collected
            log.info("mixcache: %s: piece %d compiled in the background, swapped in after %.2f s "
                     "(%d calls ran uncompiled; load %.2f s)", self.job.name, self.index,
                     time.perf_counter() - self.job.started, self.eager_calls,
                     time.perf_counter() - start)
            return self.fn
        why = self.job.failure()
        if why is not None and args is not None:
            warnings.warn(f"mixcache: {self.job.name}: the background compile failed ({why}); "
                          "compiling in this process instead", stacklevel=3)
            self.fn = self.compile_here(args)
            return self.fn
        return None


def register(model: torch.nn.Module, fns: Sequence[Callable[..., Any]]) -> None:
    """Note ``fns``' pieces compiling in the background on ``model``, for ``wait``; weakly, so a
    graph Dynamo drops takes its pieces with it."""
    from ..notes import notes    # not at the top: the child runs this file alone (WORKER)
    pieces = [f for f in fns if isinstance(f, Swapping)]
    if pieces:
        noted = notes(model)
        if noted.background is None:
            noted.background = _Pieces()
        noted.background.update(pieces)
    for piece in pieces:
        piece.job.forward = type(model).forward


class _Pieces(weakref.WeakSet):
    """A model's pieces compiling in the background. A copy of the model (``copy.deepcopy``,
    ``torch.save``) gets none: they hold the child's pipe, which neither copies nor pickles (both
    raised), and the graphs are Dynamo's, found again through the model's class (``wait``)."""

    def __deepcopy__(self, memo: dict) -> _Pieces:
        return _Pieces()

    def __reduce__(self) -> tuple:
        return (_Pieces, ())


def wait(model: torch.nn.Module, timeout: float | None = None) -> int:
    """Wait for ``model``'s child processes and swap in what they compiled; the number of pieces
    swapped in. A failed child's pieces stay uncompiled until their next call compiles them here
    (with the warning)."""
    from ..notes import notes    # not at the top: the child runs this file alone (WORKER)
    model = getattr(model, "_orig_mod", model)
    pieces = list(notes(model).background or ())
    # A graph serves every instance of the class (Dynamo keeps it on the forward's code): Wan
    # 2.2's two experts run the pieces the first one's call compiled.
    pieces += [p for job in list(_children) if job.forward is type(model).forward
               for p in list(job.pieces)]
    deadline = None if timeout is None else time.monotonic() + timeout
    for job in {id(p.job): p.job for p in pieces}.values():
        job.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
    return sum(p.swap() is not None for p in {id(p): p for p in pieces}.values())


def child(path: str) -> None:
    """The child process: compile each piece of the job at ``path``, save its artifact beside it."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx._graph_pickler import GraphPickler
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    with open(path, "rb") as f:
        job = pickle.load(f)
    _exit_with_parent(os.path.dirname(path))
    import torch.compiler.config
    torch._inductor.config.load_config(job["settings"]["inductor"])
    torch.compiler.config.load_config(job["settings"]["compiler"])
    for module in job["imports"]:
        importlib.import_module(module)
    folder = os.path.dirname(path)
    for i, (data, specs) in enumerate(job["pieces"]):
        # No shape environment: sizes stay the numbers they are (torch 2.11's fake tensors of a
        # mode with one took symbolic sizes, and a lowered MoE graph's linear then failed).
        mode = FakeTensorMode()
        gm = GraphPickler.loads(data, mode)
        inputs = [torch.empty_strided(shape, stride, dtype=dtype, device=device)
                  for shape, stride, dtype, device in specs]
        # AOTAutograd's cache (which the artifact is made of) reads Dynamo's metadata key.
        FakeTensorProp(gm, mode).propagate(*[mode.from_tensor(x) for x in inputs])
        for n in gm.graph.nodes:
            if "val" in n.meta:
                n.meta["example_value"] = n.meta["val"]
        with torch.no_grad():
            artifact = torch._inductor.standalone_compile(
                gm, inputs, dynamic_shapes="from_example_inputs", options=job["options"])
        artifact.save(path=os.path.join(folder, f"{i}.bin"), format="binary")

