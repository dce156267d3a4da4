"""timm's models convert whole: timm's GroupNorm layers subclass nn.GroupNorm with a forward that is
torch's (F.group_norm), and convert_model must convert them all (it once took only the exact class,
silently). timm is not in the `models` extra: installing it pulls torchvision, whose newest release
makes pip replace the installed torch; the test runs where timm imports, and skips elsewhere
(tests/test_models.py covers the same rule with local subclasses)."""

import copy
import warnings

import pytest
import torch
from gn_testing import error

import gn_triton

try:
    import timm
except Exception as e:  # ImportError, or a torchvision built for another torch failing at import
    pytest.skip(f"timm does not import here: {type(e).__name__}: {e}", allow_module_level=True)


def test_resnet50_gn_converts_every_norm_and_equals_torch(device):
    torch.manual_seed(0)
    plain = timm.create_model("resnet50_gn", pretrained=False).to(device, torch.float64).eval()
    model = copy.deepcopy(plain)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is left unconverted, so nothing to warn about
        gn_triton.convert_model(model)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert len(norms) == 53 and all(isinstance(m, gn_triton.GroupNorm) for m in norms)
    assert all(isinstance(m, timm.layers.GroupNorm) for m in norms)  # still timm's class too
    assert gn_triton.modules.unconverted_group_norms(model) == []
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64, device=device)
    with torch.no_grad():
        assert error(model(x), plain(x)) < 1e-9
    gn_triton.revert_model(model)
    assert [type(m) for m in model.modules()] == [type(m) for m in plain.modules()]
