"""gn_triton's build for the Hugging Face kernels hub (release/hub.py, docs/distribution.md), loaded by
the real `kernels` package (the test extra): get_local_kernel, its group_norm against the float64
reference, kernelize of a model of plain nn.GroupNorms and of a diffusers U-Net through a local layer
mapping (outputs and gradients equal to the model's own, gn_triton's launches counted), torch's forward
where gn_triton does not run a call, and the hub copy beside the installed gn_triton in one process."""

import copy
import importlib
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from gn_testing import assert_matches_reference, make_input, make_params, recording

import gn_triton

ROOT = Path(__file__).resolve().parents[1]


def _import_kernels():
    """The `kernels` package. Run from the repository root, `python -m pytest` puts the root first on
    sys.path, where kernels/ (gn_triton.kernels' source folder) would shadow it."""
    path = sys.path[:]
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT]
    try:
        return pytest.importorskip("kernels", reason="the `kernels` package (test extra) is not installed")
    finally:
        sys.path[:] = path


kernels = _import_kernels()
assert hasattr(kernels, "get_local_kernel"), kernels.__file__

BACKENDS = ("cuda", "rocm", "cpu")


@pytest.fixture(scope="module")
def hub_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hub") / "gn-triton"
    subprocess.run([sys.executable, str(ROOT / "release" / "hub.py"), "--out", str(out)], check=True)
    return out


@pytest.fixture(scope="module")
def hub(hub_dir):
    return kernels.get_local_kernel(hub_dir)


def mapping(hub_dir, layer_name):
    repo = kernels.LocalLayerRepository(hub_dir, layer_name=layer_name)
    return {layer_name: {backend: repo for backend in BACKENDS}}


def test_layout_and_metadata(hub_dir):
    """Three noarch variants of the same files, each with kernels' metadata under its own id (the module
    name and ops namespace), the package's version and a digest that kernels' own hashing agrees with."""
    assert (hub_dir / "LICENSE").read_text() == (ROOT / "LICENSE").read_text()
    ids = set()
    for backend in BACKENDS:
        variant = hub_dir / "build" / f"torch-{backend}"
        metadata = kernels.Metadata.read_from_file(variant / "metadata.json")
        assert (metadata.name.python_name, metadata.version, metadata.license) == ("gn_triton", 1, "MIT")
        assert metadata.python_depends == [] and str(metadata.backend.backend_type).lower().endswith(backend)
        assert metadata.id.startswith(f"_gn_triton_{backend}_") and metadata.id.isidentifier()
        ids.add(metadata.id)
        digest = kernels._rust.Digest.hash_variant(kernels._rust.DigestAlgorithm.SHA256, variant)
        assert json.loads((variant / "metadata.json").read_text())["digest"]["files"] == digest.files
        assert "kernels/gn_fwd.py" in digest.files and "layers.py" in digest.files
        assert f'"{gn_triton.__version__}"' in (variant / "_version.py").read_text()
    assert len(ids) == len(BACKENDS)


def test_loads_and_matches_the_reference(hub, hub_dir):
    """get_local_kernel imports a variant under its id; its group_norm (forward and every gradient, with
    and without a fused SiLU) matches the float64 reference on mean-shifted input of odd sizes."""
    variant = Path(hub.__file__).parent
    assert hub.__name__ == json.loads((variant / "metadata.json").read_text())["id"] == hub._ops.NAMESPACE
    assert variant.parent == hub_dir / "build" and hub.__version__ == gn_triton.__version__
    assert kernels.get_local_kernel(hub_dir) is hub  # loaded once, its ops registered once
    x = make_input((3, 6, 5, 7), torch.float64, offset=100.0)
    w, b = make_params(6, torch.float64)
    for activation in (None, "silu"):
        assert_matches_reference(x, 3, w, b, fn=hub.group_norm, activation=activation)
    cpu = kernels.get_local_kernel(hub_dir, backend="cpu")
    assert cpu.__name__.startswith("_gn_triton_cpu_")


def test_beside_the_installed_gn_triton(hub, monkeypatch, device):
    """Both in one process: each has its own ops namespace and launches its own kernels, with equal
    results (the same code)."""
    assert gn_triton._ops.NAMESPACE == "gn_triton" != hub._ops.NAMESPACE
    assert getattr(torch.ops, hub._ops.NAMESPACE).group_norm_fwd.default is not torch.ops.gn_triton.group_norm_fwd
    x = make_input((2, 6, 3, 5), device=device, offset=10.0)
    w, b = make_params(6, device=device)
    results = []
    for module, other in ((hub, gn_triton), (gn_triton, hub)):
        with recording(monkeypatch, module._launch) as ours, recording(monkeypatch, other._launch) as theirs:
            results.append(module.group_norm(x, 3, w, b))
        assert ours and not theirs, module.__name__
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)


class NormSiLU(torch.nn.GroupNorm):
    """A model's own GroupNorm followed by SiLU in one forward, marked for kernelize as "GroupNormSiLU"."""

    def forward(self, x):
        return F.silu(super().forward(x))


@pytest.fixture
def kernelizable(monkeypatch):
    """nn.GroupNorm marked for kernelize as "GroupNorm" and NormSiLU as "GroupNormSiLU" (what
    replace_kernel_forward_from_hub does: two class attributes), unmarked again after the test."""
    for cls, layer in ((torch.nn.GroupNorm, "GroupNorm"), (NormSiLU, "GroupNormSiLU")):
        for name in ("kernel_layer_name", "kernel_condition"):
            monkeypatch.setattr(cls, name, None, raising=False)
        kernels.replace_kernel_forward_from_hub(cls, layer)


def plain_model() -> torch.nn.Module:
    conv = torch.nn.Conv2d
    return torch.nn.Sequential(
        conv(3, 12, 3, padding=1), torch.nn.GroupNorm(4, 12), torch.nn.SiLU(), conv(12, 6, 1),
        NormSiLU(3, 6), conv(6, 6, 1), torch.nn.GroupNorm(2, 6, affine=False),
    ).double()  # fmt: skip


def run(model, x):
    model.zero_grad()
    out = model(x)
    out.square().mean().backward()
    return out.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def calls(model) -> list:
    """A list that every GroupNorm forward of `model` appends its module to."""
    seen = []
    for m in model.modules():
        if isinstance(m, torch.nn.GroupNorm):
            m.register_forward_hook(lambda m, args, out: seen.append(m))
    return seen


MODES = {"inference": kernels.Mode.INFERENCE, "training": kernels.Mode.TRAINING,
         "training+compile": kernels.Mode.TRAINING | kernels.Mode.TORCH_COMPILE}  # fmt: skip


@pytest.mark.parametrize("mode", MODES)
def test_kernelize_plain_group_norms(hub, hub_dir, kernelizable, monkeypatch, device, mode):
    """nn.GroupNorm (also without affine) through the "GroupNorm" layer and a GroupNorm+SiLU module
    through "GroupNormSiLU": the same outputs and gradients as the model's own forward (float64), every
    norm call on the hub copy's kernels (its launches counted: one fused call for the norm and SiLU)."""
    model = plain_model().to(device)
    x = make_input((2, 3, 5, 7), torch.float64, device, offset=3.0)
    expected, expected_grads = run(model, x)
    with kernels.use_kernel_mapping(mapping(hub_dir, "GroupNorm") | mapping(hub_dir, "GroupNormSiLU")):
        kernelized = kernels.kernelize(copy.deepcopy(model), mode=MODES[mode])
    assert [m.forward.__func__.__qualname__ for m in kernelized.modules() if "forward" in m.__dict__] == [
        "GroupNorm.forward", "GroupNormSiLU.forward", "GroupNorm.forward",
    ]  # fmt: skip
    assert all(m.forward.__func__.__module__ == f"{hub.__name__}.layers" for m in kernelized if "forward" in m.__dict__)
    seen = calls(kernelized)
    with recording(monkeypatch, hub._launch) as launches, recording(monkeypatch, gn_triton._launch) as installed:
        out, grads = run(kernelized, x)
    assert len(seen) == 3 and not installed
    assert sum(name.startswith("_gn_fwd") for name, *_ in launches) >= 3  # a fused or split launch per call
    assert sum(name.startswith("_gn_bwd") for name, *_ in launches) >= 3
    silu = [kw["EPILOGUE"].ACTIVATION for name, _, kw in launches if name.startswith("_gn_fwd") and "EPILOGUE" in kw]
    assert sorted(silu) == [0, 0, 1], silu  # SiLU fused in the GroupNormSiLU call only
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    for name, g in grads.items():
        torch.testing.assert_close(g, expected_grads[name], rtol=1e-10, atol=1e-12, msg=name)


def test_kernelized_model_compiles(hub, hub_dir, kernelizable, monkeypatch, device):
    """Kernelized for training with torch.compile (the layers say they support it), the model compiles
    whole (fullgraph) and its graph runs the hub copy's ops: the model's own outputs and gradients."""
    model = plain_model().to(device)
    x = make_input((2, 3, 5, 7), torch.float64, device, offset=3.0)
    expected, expected_grads = run(model, x)
    with kernels.use_kernel_mapping(mapping(hub_dir, "GroupNorm") | mapping(hub_dir, "GroupNormSiLU")):
        kernelized = kernels.kernelize(copy.deepcopy(model), mode=MODES["training+compile"])
    torch._dynamo.reset()
    compiled = torch.compile(kernelized, fullgraph=True)
    with recording(monkeypatch, hub._launch) as launches:
        out, grads = run(compiled, x)
    assert sum(name.startswith("_gn_fwd") for name, *_ in launches) >= 3
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    for name, g in grads.items():
        torch.testing.assert_close(g, expected_grads[name.removeprefix("_orig_mod.")], rtol=1e-10, atol=1e-12)


def test_kernelize_diffusers_unet(hub, hub_dir, kernelizable, monkeypatch, device):
    """diffusers' UNet2DModel (every norm a plain nn.GroupNorm), kernelized for training: the outputs and
    every parameter gradient of the unkernelized model (float64), each norm call on the hub copy."""
    pytest.importorskip("diffusers")
    from test_diffusers import run as run_unet
    from test_diffusers import unet

    model = unet().to(device=device, dtype=torch.float64)
    args = (torch.randn(2, 3, 8, 8, dtype=torch.float64, device=device), torch.tensor([10, 500], device=device))
    expected, expected_grads = run_unet(model, args)
    with kernels.use_kernel_mapping(mapping(hub_dir, "GroupNorm")):
        kernelized = kernels.kernelize(copy.deepcopy(model), mode=kernels.Mode.TRAINING, device=device)
    n_norms = sum(isinstance(m, torch.nn.GroupNorm) for m in model.modules())
    assert sum("forward" in m.__dict__ for m in kernelized.modules()) == n_norms > 10
    seen = calls(kernelized)
    with recording(monkeypatch, hub._launch) as launches:
        out, grads = run_unet(kernelized, args)
    assert len(seen) >= n_norms
    assert sum(name.startswith("_gn_fwd") for name, *_ in launches) >= len(seen)
    assert sum(name.startswith("_gn_bwd") for name, *_ in launches) >= len(seen)
    assert (out - expected).abs().max() <= 1e-9 * expected.abs().max()
    for name, g in grads.items():
        e = expected_grads[name]
        assert (g - e).abs().max() <= 1e-8 * e.abs().max().clamp_min(1e-3), name


def test_unsupported_calls_run_torch(hub, hub_dir, kernelizable, monkeypatch):
    """Where gn_triton does not run a call (here a CPU tensor without Triton's interpreter; also another
    device or a dtype the kernels do not take) the layers run torch's own forward: bitwise the model's
    own outputs and gradients, torch's errors, no gn_triton launch."""
    monkeypatch.setattr(hub._checks, "INTERPRET", False)
    model = plain_model()
    x = make_input((2, 3, 5, 7), torch.float64, offset=3.0)
    assert hub.backend_for(x) == "torch"
    expected, expected_grads = run(model, x)
    with kernels.use_kernel_mapping(mapping(hub_dir, "GroupNorm") | mapping(hub_dir, "GroupNormSiLU")):
        kernelized = kernels.kernelize(copy.deepcopy(model), mode=kernels.Mode.TRAINING)
    with recording(monkeypatch, hub._launch) as launches:
        out, grads = run(kernelized, x)
    assert not launches and torch.equal(out, expected)
    assert all(torch.equal(g, expected_grads[name]) for name, g in grads.items())
    ints = torch.ones(2, 12, 3, 3, dtype=torch.int64)
    with pytest.raises(Exception) as theirs:
        model[1](ints)
    with pytest.raises(type(theirs.value), match=re.escape(str(theirs.value))):
        kernelized[1](ints)


def test_the_installed_package_has_the_layers():
    """The layers are gn_triton's own module, so the installed package kernelizes too (the same classes
    as the hub copy's) and `kernels` accepts them: forward and its two flags only."""
    module = importlib.import_module("gn_triton.layers")
    for layer in (module.GroupNorm, module.GroupNormSiLU):
        kernels._internals.layer.layer._validate_layer(check_cls=torch.nn.GroupNorm, cls=layer, repo="gn_triton")


def test_the_build_refuses_an_absolute_self_import(tmp_path):
    """The hub imports its copy under the build id, where `import gn_triton` would reach an installed
    gn_triton (or nothing): release/hub.py refuses a module that imports the package by name."""
    spec = importlib.util.spec_from_file_location("hub_build", ROOT / "release" / "hub.py")
    hub_build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hub_build)
    hub_build.check_relative_imports(hub_build.sources())  # the package as it is passes
    for line in ("import gn_triton.functional", "from gn_triton import _ops", "from gn_triton._ops import NAMESPACE"):
        (tmp_path / "bad.py").write_text(f"{line}\n")
        with pytest.raises(SystemExit, match="imports gn_triton by name"):
            hub_build.check_relative_imports({"bad.py": tmp_path / "bad.py"})
