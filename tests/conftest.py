import os

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from scratch: no cache entries or recompile counts leak between tests."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def interpret_env() -> dict:
    """The environment a subprocess needs to run the Triton kernels on the CPU."""
    env = dict(os.environ)
    env["TRITON_INTERPRET"] = "1"
    return env


# Without a GPU, the Triton kernels run under the interpreter (set before any kernel loads).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
