"""One suite for CPU and GPU.

Without CUDA (or with --device=cpu) the kernels run in Triton's interpreter: TRITON_INTERPRET=1 must
be set before gn_triton is imported, because Triton decides at decoration time. With CUDA (or
--device=cuda) the same tests run the compiled kernels.
"""

import os
import tempfile

import pytest
import torch


def pytest_addoption(parser):
    parser.addoption(
        "--device",
        choices=("cpu", "cuda"),
        default=None,
        help="cpu: Triton interpreter; cuda: compiled kernels (default: cuda when available)",
    )


def pytest_configure(config):
    # Tuned plans go to a throw-away cache, never the user's (gn_triton._plan_cache).
    os.environ.setdefault("GN_TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="gn_triton_plans_"))
    device = config.getoption("--device") or ("cuda" if torch.cuda.is_available() else "cpu")
    config.gn_device = device
    if device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"
    config.addinivalue_line("markers", "gpu: needs a CUDA device")


def pytest_report_header(config):
    mode = "Triton interpreter on CPU" if config.gn_device == "cpu" else "compiled kernels on CUDA"
    return f"gn_triton tests: device={config.gn_device} ({mode})"


def pytest_collection_modifyitems(config, items):
    if config.gn_device != "cuda":
        skip = pytest.mark.skip(reason="needs a CUDA device (run with --device=cuda on a GPU)")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def device(request):
    return request.config.gn_device


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Every tensor the launcher allocates starts as NaN, so an element a kernel fails to write
    shows up in the results (torch.empty would often hand back zeros and hide it)."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(t):
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(real_empty_like(*a, **k)))


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)
