"""gn_triton called from several threads at once: Triton's interpreter patches triton.language for the
length of each launch, so two interpreted launches at once crash inside it; gn_triton serialises them
(gn_triton._interpreter). Compiled kernels on a GPU need no lock."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F

import gn_triton


def test_two_threads_calling_group_norm_match_torch(device):
    if device != "cpu":
        pytest.skip("the interpreter's case")
    shapes = [(2, 6, 7, 5), (3, 4, 9), (1, 8, 3, 3, 2)]
    inputs = [(3 + torch.randn(s, dtype=torch.float64)).requires_grad_() for s in shapes]
    results, errors = {}, []

    def work(i):
        try:
            for _ in range(3):
                x = inputs[i]
                y = gn_triton.group_norm(x, 2, activation="silu")
                (dx,) = torch.autograd.grad(y.square().sum(), x)
                results[i] = (y.detach(), dx)
        except Exception as e:  # reported below, in the test's thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(shapes))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    for i, x in enumerate(inputs):
        y = F.silu(F.group_norm(x, 2))
        (dx,) = torch.autograd.grad(y.square().sum(), x)
        assert (results[i][0] - y).abs().max() <= 1e-10 * y.abs().max()
        assert (results[i][1] - dx).abs().max() <= 1e-10 * dx.abs().max()
