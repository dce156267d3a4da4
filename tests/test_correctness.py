"""Forward and gradients against the float64 reference: a matrix of named shapes, dtypes, paths
and layouts. Every output starts poisoned with NaN (conftest.poisoned_outputs)."""

import pytest
import torch
from gn_testing import assert_matches_reference, make_input, make_params

from gn_triton import _tuning

# (name, shape, groups): the named edge cases of the issue, kept tiny for the interpreter.
CASES = [
    ("nchw", (2, 8, 5, 7), 4),
    ("G=1 (LayerNorm)", (2, 6, 3, 5), 1),
    ("G=C (InstanceNorm)", (2, 6, 3, 5), 6),
    ("prime sizes", (3, 7, 11, 13), 7),
    ("C/G=3 not a power of two", (2, 12, 4, 5), 4),
    ("(N, C)", (5, 12), 4),
    ("3-D (N, C, L)", (2, 6, 17), 3),
    ("5-D (N, C, D, H, W)", (2, 4, 3, 4, 5), 2),
    ("N=1", (1, 8, 9, 9), 4),
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]

# Plans that force each code path and its loops on tiny shapes: the fused path with a tile smaller
# than a row (channel and position loops), several groups per program, and the split path.
PATHS = {
    "heuristic": {},
    "fused, small tiles": dict(split=1, block_c=2, block_s=4),
    "fused, 4 groups per program": dict(split=1, groups_per_program=4, block_c=4, block_s=8),
    "split 3, small tiles": dict(split=3, block_c=2, block_s=4),
    "split, waves of 3 blocks": dict(split=2, block_c=4, block_s=4, wave_blocks=3),
    "split, 4 groups per program": dict(split=3, groups_per_program=4, block_c=4, block_s=4),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name,shape,groups", CASES, ids=[c[0] for c in CASES])
def test_shapes_and_dtypes(name, shape, groups, dtype, device):
    x = make_input(shape, dtype, device, offset=3.0, scale=2.0)
    w, b = make_params(shape[1], dtype, device)
    assert_matches_reference(x, groups, w, b)


@pytest.mark.parametrize("path", PATHS, ids=list(PATHS))
@pytest.mark.parametrize("name,shape,groups", CASES, ids=[c[0] for c in CASES])
def test_paths(name, shape, groups, path, device):
    x = make_input(shape, torch.float32, device, offset=-5.0, scale=3.0)
    w, b = make_params(shape[1], torch.float32, device)
    with _tuning.override_plan(**PATHS[path]):
        assert_matches_reference(x, groups, w, b)


@pytest.mark.parametrize("layout", ["channels_last", "sliced", "permuted"])
@pytest.mark.parametrize("shape", [(2, 6, 4, 5), (2, 4, 3, 2, 5)], ids=["4-D", "5-D"])
@pytest.mark.parametrize("path", ["heuristic", "split 3, small tiles"])
def test_layouts(shape, layout, path, device):
    """channels_last and strided inputs: right values, and the output keeps torch's memory format."""
    x = make_input(shape, torch.float32, device, offset=1.0, layout=layout)
    w, b = make_params(shape[1], torch.float32, device)
    with _tuning.override_plan(**PATHS[path]):
        assert_matches_reference(x, 2, w, b)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_channels_last_16bit(dtype, device):
    x = make_input((2, 8, 3, 5), dtype, device, layout="channels_last")
    w, b = make_params(8, dtype, device)
    assert_matches_reference(x, 4, w, b)


@pytest.mark.parametrize(
    "weight,bias", [(False, True), (True, False), (False, False)], ids=["bias only", "weight only", "neither"]
)
@pytest.mark.parametrize("path", ["heuristic", "split 3, small tiles"])
def test_optional_affine(weight, bias, path, device):
    """weight None with a bias works in forward and backward (torch's own CPU backward crashes)."""
    x = make_input((2, 6, 5, 3), torch.float32, device)
    w, b = make_params(6, torch.float32, device, weight=weight, bias=bias)
    with _tuning.override_plan(**PATHS[path]):
        assert_matches_reference(x, 3, w, b)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fp32_params_with_16bit_input(dtype, device):
    x = make_input((2, 8, 4, 4), dtype, device)
    w, b = make_params(8, torch.float32, device)
    y, dx, dw, db = assert_matches_reference(x, 4, w, b)
    assert y.dtype == dtype and dw.dtype == torch.float32 and db.dtype == torch.float32


@pytest.mark.parametrize("path", ["heuristic", "split 3, small tiles"])
def test_stride0_grad(path, device):
    """y.sum().backward() hands the backward an expanded (stride-0) gradient."""
    import gn_triton

    x = make_input((2, 6, 4, 5), torch.float32, device, offset=2.0).requires_grad_()
    w, b = make_params(6, torch.float32, device)
    w.requires_grad_()
    with _tuning.override_plan(**PATHS[path]):
        gn_triton.group_norm(x, 3, w, b).sum().backward()
    dy = torch.ones_like(x)
    from gn_testing import error, reference

    _, dx_ref, dw_ref, _ = reference(x, 3, w, b, dy)
    assert error(x.grad, dx_ref) < 1e-5
    assert error(w.grad, dw_ref) < 1e-5


def test_sliced_grad(device):
    """A non-contiguous incoming gradient (a view) gives the same result as its contiguous copy."""
    x = make_input((2, 6, 4, 5), torch.float32, device)
    w, b = make_params(6, torch.float32, device)
    dy = make_input((2, 6, 4, 5), torch.float32, device, layout="sliced")
    assert not dy.is_contiguous()
    assert_matches_reference(x, 3, w, b, dy=dy)


@pytest.mark.parametrize("shape", [(2, 8, 5, 6), (1, 8, 3, 4, 5)], ids=["NHWC", "NDHWC"])
@pytest.mark.parametrize("path", ["heuristic", "split 3, small tiles"])
def test_channels_last_makes_no_copy(shape, path, device, monkeypatch):
    """channels_last input and gradient are read in place: the launcher never copies them."""
    import gn_triton

    copies = []
    real = torch.Tensor.contiguous

    def spy(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        if out.data_ptr() != self.data_ptr():
            copies.append(tuple(self.shape))
        return out

    x = make_input(shape, torch.float32, device, layout="channels_last").requires_grad_()
    dy = make_input(shape, torch.float32, device, layout="channels_last")
    w, b = make_params(shape[1], torch.float32, device)
    monkeypatch.setattr(torch.Tensor, "contiguous", spy)
    with _tuning.override_plan(**PATHS[path]):
        y = gn_triton.group_norm(x, 4, w, b)
        y.backward(dy)
    fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
    assert copies == []
    assert y.is_contiguous(memory_format=fmt) and x.grad.is_contiguous(memory_format=fmt)
