"""Forward and gradients against the float64 reference: a matrix of named shapes, dtypes, paths
and layouts. Every output starts poisoned with NaN (conftest.poisoned_outputs)."""

import pytest
import torch
from cases import AFFINE, DTYPES, FUSED_AND_SPLIT, MANY_GROUPS, PARAM_LAYOUTS, PATHS, SHAPES, SIXTEEN_BIT
from gn_testing import assert_matches_reference, forced, make_input, make_modulation, make_params

import gn_triton


def check_shape(name, dtype, plan, device, offset, scale):
    size, groups = SHAPES[name]
    x = make_input(size, dtype, device, offset=offset, scale=scale)
    w, b = make_params(size[1], dtype, device)
    with forced(plan):
        assert_matches_reference(x, groups, w, b)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES)
def test_shapes_and_dtypes(shape, dtype, device):
    """Every named shape in every dtype, on the planner's own plan."""
    check_shape(shape, dtype, "heuristic", device, offset=3.0, scale=2.0)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shape", SHAPES)
def test_paths(shape, path, device):
    """Every named shape on every forced path (fp32; the planner's own plan is test_shapes_and_dtypes)."""
    check_shape(shape, torch.float32, path, device, offset=-5.0, scale=3.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", MANY_GROUPS)
def test_many_tiny_groups(shape, dtype, device):
    """G = C >= 2048 on the planner's own plan: within Triton's block-tensor cap, right values."""
    size, groups = MANY_GROUPS[shape]
    layout = "channels_last" if len(size) == 4 else "contiguous"
    x = make_input(size, dtype, device, offset=2.0, layout=layout)
    w, b = make_params(size[1], dtype, device)
    assert_matches_reference(x, groups, w, b)


@pytest.mark.parametrize("path", FUSED_AND_SPLIT)
@pytest.mark.parametrize("layout", PARAM_LAYOUTS)
def test_parameter_layouts(layout, path, device):
    """weight, bias, scale and shift as views of any strides (strided, stride 0, transposed, a chunk):
    the forward and every gradient, each gradient of its view's shape."""
    x = make_input((2, 6, 4, 5), torch.float32, device, offset=1.0)
    w, b = make_params(6, torch.float32, device, layout=layout)
    scale, shift = make_modulation(2, 6, torch.float32, device, layout=layout)
    assert not (w.is_contiguous() and scale.is_contiguous()) or layout == "chunk"
    with forced(path):
        assert_matches_reference(x, 3, w, b, scale=scale, shift=shift, activation="silu")


LAYOUT_SHAPES = {"4-D": ((2, 6, 4, 5), 2), "5-D": ((2, 4, 3, 2, 5), 2)}
LAYOUT_RUNS = [
    *[(layout, shape, path, torch.float32) for path in ("heuristic", "split 3, small tiles")
      for shape in LAYOUT_SHAPES for layout in ("channels_last", "sliced", "permuted")],
    *[("channels_last", "4-D", "heuristic", dtype) for dtype in SIXTEEN_BIT],
]  # fmt: skip


@pytest.mark.parametrize("layout,shape,path,dtype", LAYOUT_RUNS, ids=["-".join(map(str, r)) for r in LAYOUT_RUNS])
def test_layouts(layout, shape, path, dtype, device):
    """channels_last and strided inputs: right values, and the output keeps torch's memory format."""
    size, groups = LAYOUT_SHAPES[shape]
    x = make_input(size, dtype, device, offset=1.0, layout=layout)
    w, b = make_params(size[1], dtype, device)
    with forced(path):
        assert_matches_reference(x, groups, w, b)


@pytest.mark.parametrize("affine", ["bias only", "weight only", "neither"])
@pytest.mark.parametrize("path", ["heuristic", "split 3, small tiles"])
def test_optional_affine(affine, path, device):
    """weight None with a bias works in forward and backward (torch's own CPU backward crashes)."""
    x = make_input((2, 6, 5, 3), torch.float32, device)
    w, b = make_params(6, torch.float32, device, **AFFINE[affine])
    with forced(path):
        assert_matches_reference(x, 3, w, b)


MIXED = [(torch.float16, torch.float32, torch.float32), (torch.bfloat16, torch.float32, torch.float32),
         (torch.float16, torch.bfloat16, torch.float32)]  # fmt: skip


@pytest.mark.parametrize("x_dtype,w_dtype,b_dtype", MIXED, ids=["fp16 input", "bf16 input", "fp16, bf16 weight"])
def test_mixed_param_dtypes(x_dtype, w_dtype, b_dtype, device):
    """16-bit input with parameters of other dtypes: each is upcast in the kernel, and each gradient
    comes back in its tensor's dtype (checked by assert_matches_reference)."""
    x = make_input((2, 8, 4, 4), x_dtype, device)
    w, _ = make_params(8, w_dtype, device)
    _, b = make_params(8, b_dtype, device)
    assert_matches_reference(x, 4, w, b)


GRADIENTS = [("stride 0", "heuristic"), ("stride 0", "split 3, small tiles"), ("sliced", "heuristic")]


@pytest.mark.parametrize("grad,path", GRADIENTS, ids=["-".join(g) for g in GRADIENTS])
def test_gradient_layouts(grad, path, device):
    """The incoming gradient as y.sum().backward() hands it (expanded, stride 0) or as a strided view."""
    x = make_input((2, 6, 4, 5), torch.float32, device, offset=2.0)
    w, b = make_params(6, torch.float32, device)
    if grad == "stride 0":
        dy = torch.ones((), device=device).expand(x.shape)
    else:
        dy = make_input(x.shape, torch.float32, device, layout="sliced")
    assert not dy.is_contiguous()
    with forced(path):
        assert_matches_reference(x, 3, w, b, dy=dy)


@pytest.mark.parametrize("shape", [(2, 8, 5, 6), (1, 8, 3, 4, 5)], ids=["NHWC", "NDHWC"])
@pytest.mark.parametrize("path", ["heuristic", "split 3, small tiles"])
def test_channels_last_makes_no_copy(shape, path, device, monkeypatch):
    """channels_last input and gradient are read in place: the launcher never copies them."""
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
    with forced(path):
        y = gn_triton.group_norm(x, 4, w, b)
        y.backward(dy)
    fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
    assert copies == []
    assert y.is_contiguous(memory_format=fmt) and x.grad.is_contiguous(memory_format=fmt)
