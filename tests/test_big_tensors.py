"""Groups of 2^31 elements or more (G = 1 on a tensor over 2^31 elements): int64 offsets, and a group
size that does not wrap around in int32 (it once did, and dx came out wrong)."""

import contextlib

import pytest
import torch
import triton
import triton.language as tl
from gn_triton.kernels._tile import group_size

import gn_triton
from gn_triton import _tuning

HUGE = (1, 2, 2**30 + 64)  # one group (G = 1) of 2^31 + 128 elements; channel 1 ends past offset 2^31


@triton.jit
def _group_size_kernel(Out, Cg, S, ACC: tl.constexpr):
    tl.store(Out, group_size(Cg, S, ACC))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_group_size_of_2_31_elements_or_more(device, dtype):
    """The group size the backward divides by, for groups just past 2^31 and 2^32 elements."""
    acc = tl.float64 if dtype == torch.float64 else tl.float32
    for cg, s in ((2, 2**30 + 64), (2**16, 2**16), (3, 2**31 - 1)):
        out = torch.zeros(1, dtype=dtype, device=device)
        _group_size_kernel[(1,)](out, cg, s, ACC=acc)
        assert out.item() == torch.tensor(cg * s, dtype=dtype).item(), (cg, s)


def _chunks(t: torch.Tensor, size: int = 1 << 26):
    flat = t.reshape(-1)
    return (flat[i : i + size] for i in range(0, flat.numel(), size))


# Each path's forced plan fields (the split: 256 spans of the 2^31 elements, with the heuristic tile);
# the calls' plans are then checked to be that path's (split > 1 or not).
PATHS = {"fused": dict(split=1), "split": dict(split=256)}


@contextlib.contextmanager
def plans_chosen(monkeypatch, path, **fields):
    """Force `path` (and `fields`) for the calls inside the block and collect (direction, plan) of
    each call."""
    chosen, real = [], _tuning.choose_plan

    def spy(direction, *args, **kwargs):
        plan = real(direction, *args, **kwargs)
        chosen.append((direction, plan))
        return plan

    monkeypatch.setattr(_tuning, "choose_plan", spy)
    with _tuning.override_plan(**PATHS[path], **fields):
        yield chosen


def assert_ran(chosen, path):
    assert [d for d, _ in chosen] == ["fwd", "bwd"], chosen
    assert all((plan.split > 1) == (path == "split") for _, plan in chosen), chosen


@pytest.mark.parametrize("path", PATHS)
def test_paths_are_forced_and_checked(path, monkeypatch, device):
    """The mechanism of the 2^31 test on a tiny G = 1 tensor: the forced path is the one that runs."""
    x = torch.randn(1, 2, 4096, device=device, requires_grad=True)
    with plans_chosen(monkeypatch, path, block_s=1024) as chosen:  # 4 spans of a tile each
        gn_triton.group_norm(x, 1).sum().backward()
    assert_ran(chosen, path)


@pytest.mark.gpu
@pytest.mark.parametrize("path", PATHS)
def test_group_norm_over_2_31_elements(path, monkeypatch):
    """Forward and backward of G = 1 on 2^31 + 128 fp16 elements against float64 sums taken chunk by
    chunk; dx and y are compared on the first and last 4096 positions of each channel."""
    monkeypatch.setenv("GN_TRITON_AUTOTUNE", "0")  # a heuristic plan: no timing of 4 GiB tensors
    x = torch.randn(HUGE, device="cuda", dtype=torch.float16)
    # A gradient with a large mean and a part along x: a wrong group size shows in both dx terms.
    dy = (1.0 + 0.5 * x + 0.5 * torch.randn_like(x)).to(torch.float16)
    w = torch.tensor([1.25, 0.75], device="cuda", requires_grad=True)
    b = torch.tensor([0.5, -0.5], device="cuda", requires_grad=True)
    xr = x.detach().requires_grad_()
    with plans_chosen(monkeypatch, path) as chosen:
        y = gn_triton.group_norm(xr, 1, w, b)
        y.backward(dy)
    assert_ran(chosen, path)

    n = x.numel()
    mean = sum(c.double().sum() for c in _chunks(x)) / n
    rstd = (sum(((c.double() - mean) ** 2).sum() for c in _chunks(x)) / n + 1e-5) ** -0.5
    sum_g, sum_g_xhat = [], []  # per channel: sum(dy), sum(dy*x_hat)
    for ch in range(HUGE[1]):
        pairs = zip(_chunks(x[0, ch]), _chunks(dy[0, ch]))
        sums = [(g.double().sum(), (g.double() * (xc.double() - mean) * rstd).sum()) for xc, g in pairs]
        sum_g.append(sum(s[0] for s in sums))
        sum_g_xhat.append(sum(s[1] for s in sums))
    w64 = w.detach().double()
    mean_gw = sum(w64[c] * sum_g[c] for c in range(2)) / n
    mean_gw_xhat = sum(w64[c] * sum_g_xhat[c] for c in range(2)) / n

    torch.testing.assert_close(b.grad.double(), torch.stack(sum_g), rtol=1e-3, atol=0)
    # sum(dy*x_hat) ~ 0.5 n is a sum of ~n terms of size ~1: fp32 partials are good to ~1e-4 of n.
    torch.testing.assert_close(w.grad.double(), torch.stack(sum_g_xhat), rtol=0, atol=1e-4 * n)
    for ch in range(HUGE[1]):
        for sl in (slice(0, 4096), slice(HUGE[2] - 4096, HUGE[2])):
            xhat = (x[0, ch, sl].double() - mean) * rstd
            torch.testing.assert_close(y[0, ch, sl].double(), xhat * w64[ch] + b.detach().double()[ch],
                                       rtol=1e-2, atol=1e-2)  # fmt: skip
            dx = rstd * (dy[0, ch, sl].double() * w64[ch] - mean_gw - xhat * mean_gw_xhat)
            torch.testing.assert_close(xr.grad[0, ch, sl].double(), dx, rtol=1e-2, atol=1e-2)
