import gc
import os
import sys

import torch

# Without CUDA, Triton kernels run under Triton's interpreter; it reads the switch when triton is
# first imported (Inductor may import it before any kernel test runs), so set it here, first.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist (-n 2, CI's two cores) each worker takes its share of the cores for its
# intra-op threads: with torch's default of one thread a core, each worker's OpenMP threads spin
# on the cores the others use (about a tenth of the suite's time, measured). Inductor's CPU
# kernels read the count as they are generated.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _workers > 1:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _workers))

import pytest  # noqa: E402

# `python -m pytest` puts the working directory first on sys.path. From this repository's root
# that makes its source folders importable as top-level packages, and `kernels/` (installed as
# dit_compile.kernels) then shadows the `kernels` package transformers imports (transformers
# 5.25 and later depend on it): every import of a diffusers model failed. The tests import what
# is installed, and start their Python subprocesses in tests/.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _ROOT]
sys.path.insert(0, os.path.dirname(__file__))


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` skip, saying so, where there is no CUDA device (CI has none); on a GPU
    machine ``pytest -m gpu`` runs them alone (bench/gpu_suite.sh adds the Triton kernel tests)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
    # Every test leaves objects behind that outlive it (state torch keeps past a reset: a few
    # thousand objects a test), and each of the cyclic collector's full passes walked all of
    # them again: 83 s of one xdist worker's 600 went to those passes, 25 s once what is alive
    # between two tests is collected and frozen out of later passes (gc.callbacks, measured).
    gc.collect()
    gc.freeze()


@pytest.fixture
def nested_wan_blocks(monkeypatch):
    """Wan's block class marked as a nested compile region, as PyTorch advises for a shorter
    trace: Dynamo traces one block and stamps the other calls out as ``invoke_subgraph`` nodes.
    (Undone after the test, before _fresh_dynamo's reset.)"""
    from diffusers.models.transformers.transformer_wan import WanTransformerBlock
    monkeypatch.setattr(WanTransformerBlock, "forward",
                        torch.compiler.nested_compile_region(WanTransformerBlock.forward))


def capture(model: torch.nn.Module, kwargs: dict) -> torch.fx.GraphModule:
    """Dynamo's graph of ``model(**kwargs)`` (fullgraph); its real inputs are in ``gm.inputs``."""
    graphs = []
    torch._dynamo.reset()

    def record(gm, example_inputs, **_):
        gm.inputs = list(example_inputs)
        graphs.append(gm)
        return gm.forward

    with torch.no_grad():
        torch.compile(model, backend=record, fullgraph=True)(**kwargs, return_dict=False) \
            if "return_dict" in _params(model) else \
            torch.compile(model, backend=record, fullgraph=True)(**kwargs)
    assert len(graphs) == 1
    return graphs[0]


def _params(model):
    import inspect
    return inspect.signature(inspect.unwrap(type(model).forward)).parameters
