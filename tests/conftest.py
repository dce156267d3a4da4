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


# Which tests each software stack runs (Makefile: `make test` runs all; `make test-stacks` selects with
# these markers). Node ids are matched by prefix.
# The slow families, each with the smoke test that every stack runs:
SLOW_FAMILIES = {
    "tests/test_notebooks.py": "tests/test_notebooks.py::test_notebook_runs_in_fast_mode[01_quickstart",
    "tests/test_perf.py": "tests/test_perf.py::test_functional_sweep_end_to_end",
    "tests/test_gpu_evidence.py": "tests/test_gpu_evidence.py::test_stages_run_in_order",
    "tests/test_static_report.py": "tests/test_static_report.py::test_every_kernel_compiles_for_sm80_and_sm90",
    "tests/test_diffusers.py": "tests/test_diffusers.py::test_converted_model_matches[AutoencoderKL",
    "tests/test_compile_fusion.py": "tests/test_compile_fusion.py::test_unconverted_sequential_calls_gn_triton",
    "tests/test_models.py::test_ddp": "tests/test_models.py::test_ddp",
}
# The newest-triton stack's subset: API, module, autograd, compile, every kernel on one path each, the
# AMD compile check and the sharded GroupNorm on 2 processes.
STACK_SUBSET = (
    "tests/test_api.py",
    "tests/test_launch_path.py",
    "tests/test_amd.py",
    "tests/test_models.py",
    "tests/test_compile_fusion.py",
    "tests/test_correctness.py::test_paths[nchw-",
    "tests/test_epilogues.py::test_activation_matches_reference[weight+bias-torch.float32-split",
    "tests/test_distributed.py::test_shards_match_the_whole_tensor[2",
)


def pytest_collection_modifyitems(config, items):
    for item in items:
        for family, smoke in SLOW_FAMILIES.items():
            if item.nodeid.startswith(family):
                item.add_marker(pytest.mark.slow_family)
                if item.nodeid.startswith(smoke):
                    item.add_marker(pytest.mark.smoke)
        if item.nodeid.startswith(STACK_SUBSET):
            item.add_marker(pytest.mark.stack_subset)
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
