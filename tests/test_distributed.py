"""gn_triton.stats (statistics as values: take, merge, normalise) and gn_triton.distributed (GroupNorm of
a tensor sharded across processes along its positions) against the float64 reference of the whole
tensor. The multi-process cases run tests/distributed_worker.py on 2 and 4 CPU processes (gloo)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from gn_testing import (
    ROOT,
    assert_matches_reference,
    error,
    forced,
    make_input,
    make_modulation,
    make_params,
    python_without_interpreter,
    sharded,
)

import gn_triton
import gn_triton.distributed as gnd
from gn_triton import stats
from gn_triton.reference import group_norm_reference

WORKER = Path(__file__).with_name("distributed_worker.py")


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _run_worker(world: int, out: Path, interpreter: bool) -> list[list[dict]]:
    args = (str(WORKER), str(world), str(out), _free_port())
    if interpreter:
        env = dict(os.environ, TRITON_INTERPRET="1")
        proc = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=900)
    else:
        proc = python_without_interpreter(*args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(world)]


# What every rank must raise for the worker's bad calls: (exception type, words in the message); the
# rank whose own argument is bad raises its own error.
BAD = {
    "channels differ": ("RuntimeError", "same N and C"),
    "groups differ": ("RuntimeError", "differ in num_groups: [2, 4"),
    "two dims differ": ("RuntimeError", "differ in dimensions [2, 3]"),
    "weight wrong on rank 1": ("RuntimeError", "rank(s) [1] rejected their arguments"),
    "activation differs": ("RuntimeError", "'activation=silu', 'activation=None'"),
    "eps differs": ("RuntimeError", "differ in eps: [1e-05, 2e-05"),
    "one value per group in all": ("ValueError", "more than 1 value per channel"),
}


def _check_results(results: list[list[dict]]) -> None:
    for rank, cases in enumerate(results):
        assert len(cases) == len(results[0]) > len(BAD)
        for case in cases:
            where = f"rank {rank}, {case['case']}"
            if "errors" in case:
                assert case["errors"], where
                for what, err in case["errors"].items():
                    assert err <= case["tolerance"], f"{where}: {what} error {err:.3g} > {case['tolerance']:.3g}"
                continue
            kind, words = BAD[case["case"]]
            raised = case["raised"]
            assert raised is not None, f"{where}: did not raise"
            if rank == 1 and case["case"] == "weight wrong on rank 1":
                kind, words = "RuntimeError", "expected weight to be a vector of size equal to the number of channels"
            assert raised.startswith(kind + ":") and words in raised, f"{where}: {raised}"


@pytest.mark.parametrize("world", [2, 4])
def test_shards_match_the_whole_tensor(world, tmp_path, device):
    """Shards along H (4-D) or T (5-D) of uneven sizes (an empty one with 4 processes), every epilogue,
    fused and split plans, contiguous and channels_last, float64/fp32/bf16: y and dx slab by slab, and
    the parameters' gradients summed over the ranks, against the reference of the whole tensor; bad
    and mismatched arguments raise on every rank, which then still work together."""
    if device != "cpu":
        pytest.skip("the workers run CPU processes (gloo)")
    _check_results(_run_worker(world, tmp_path, interpreter=True))


def test_shards_without_the_interpreter(tmp_path, device):
    """CPU tensors without Triton's interpreter run the same parts in torch ops, with the same results."""
    if device != "cpu":
        pytest.skip("the workers run CPU processes (gloo)")
    _check_results(_run_worker(2, tmp_path, interpreter=False))


def test_patch_parallel_example_matches_one_process():
    """The example: conv + GroupNorm + SiLU on 3 slabs with halo exchange, forward and backward."""
    proc = python_without_interpreter("notebooks/patch_parallel.py", "--world", "3", "--port", _free_port())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert float(proc.stdout.split("max difference")[1].split()[0]) < 1e-12, proc.stdout


@pytest.mark.parametrize(
    "plan", ["heuristic", "split 3, small tiles", "split 2, waves of 3 blocks", "split 3, 2 channel chunks"]
)
@pytest.mark.parametrize(("dtype", "layout", "epilogue"), [
    (torch.float32, "contiguous", dict(activation="silu", scale=True, shift=True)),
    (torch.bfloat16, "channels_last", dict(activation="gelu")),
    (torch.float64, "contiguous", dict(shift=True))])  # fmt: skip
def test_shard_steps_in_one_process_match_the_reference(plan, dtype, layout, epilogue, device):
    """gn_triton.distributed's steps for 3 shards along H (one empty), run in one process where ranks
    would exchange (gn_testing.sharded): every output and gradient against the float64 reference, as
    gn_triton.group_norm is held (the GPU benchmark job runs the same check on the GPU)."""
    x = make_input((2, 6, 10, 3), dtype, device, offset=3.0, layout=layout)
    weight, bias = make_params(6, dtype, device)
    scale, shift = make_modulation(2, 6, dtype, device, scale=epilogue.pop("scale", False),
                                   shift=epilogue.pop("shift", False))  # fmt: skip
    with forced(plan):
        assert_matches_reference(x, 3, weight, bias, fn=sharded(2, [4, 0, 6]), scale=scale, shift=shift, **epilogue)


# --- gn_triton.stats on one process ---------------------------------------------------------------


def _tiles(x: torch.Tensor, dim: int, sizes: list[int]) -> list[torch.Tensor]:
    return list(torch.split(x, sizes, dim))


@pytest.mark.parametrize(
    "plan", ["heuristic", "split 3, small tiles", "split 3, 4 groups per program", "split 3, 2 channel chunks"]
)
@pytest.mark.parametrize(("dtype", "layout", "offset"), [
    (torch.float32, "contiguous", 0.0), (torch.float32, "channels_last", 1e4), (torch.bfloat16, "contiguous", 3.0),
    (torch.float64, "contiguous", 1e4)])  # fmt: skip
def test_tiled_pass_equals_group_norm(plan, dtype, layout, offset, device):
    """group_stats of tiles (one empty), merged, then normalize tile by tile: the statistics against
    float64 and the output against gn_triton.group_norm of the whole tensor and the reference."""
    x = make_input((2, 8, 11, 5), dtype, device, offset=offset, layout=layout)
    weight, bias = make_params(8, dtype, device)
    tiles = _tiles(x, 2, [4, 0, 7])
    with forced(plan):
        merged = stats.merge_stats([stats.group_stats(t, 4) for t in tiles])
        out = torch.cat([stats.normalize(t, merged, weight, bias, activation="silu") for t in tiles], 2)
    rows = x.double().reshape(2, 4, -1)
    mean = rows[..., 0] + (rows - rows[..., :1]).mean(-1)  # shifted: exact for 1e4-offset float64 data
    assert torch.equal(merged.count, torch.full((2, 4), 2 * 55, device=device))
    mean_err = ((merged.mean.double() + merged.mean_lo.double() - mean).abs() / rows.std(-1)).max().item()
    m2_err = (merged.m2.double() / ((rows - mean[..., None]) ** 2).sum(-1) - 1).abs().max().item()
    exact = 1e-13 if dtype == torch.float64 else 1e-6
    assert mean_err < exact and m2_err < exact, (mean_err, m2_err)
    whole = gn_triton.group_norm(x, 4, weight, bias, activation="silu")
    reference = group_norm_reference(x, 4, weight, bias, activation="silu")
    assert error(out, reference) <= 2 * error(whole, reference) + (1e-12 if dtype == torch.float64 else 1e-6)


def test_merge_is_exact_for_an_outlier_and_an_offset(device):
    """A piece holding one outlier beside pieces of 1e4-offset data: the merged mean and variance keep
    fp32 accuracy (the pieces' means are pairs, merged in float64 around the largest piece's mean)."""
    x = make_input((1, 2, 64, 4), torch.float32, device, offset=1e4)
    x[0, :, 0, 0] = 1e4 + 1e3
    merged = stats.merge_stats([stats.group_stats(t, 1) for t in _tiles(x, 2, [1, 20, 43])])
    rows = x.double().reshape(1, 1, -1)
    var = rows.var(-1, correction=0)
    assert ((merged.mean.double() + merged.mean_lo.double() - rows.mean(-1)).abs() / var.sqrt()).item() < 1e-6
    assert abs(merged.m2.double().item() / (var * rows.shape[-1]).item() - 1) < 1e-6


def test_merge_is_deterministic_and_in_list_order(device):
    parts = [stats.group_stats(t, 2) for t in _tiles(make_input((2, 4, 9, 3), torch.float32, device), 2, [2, 3, 4])]
    a, b = stats.merge_stats(parts), stats.merge_stats(parts)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert torch.equal(stats.merge_stats(parts[:1]).count, parts[0].count)


def test_stats_reject_bad_input(device):
    x = make_input((2, 4, 3, 3), torch.float32, device)
    good = stats.group_stats(x, 2)
    with pytest.raises(RuntimeError, match="divisible by num_groups"):
        stats.group_stats(x, 3)
    with pytest.raises(TypeError, match="sequence of GroupStats"):
        stats.merge_stats([])
    with pytest.raises(RuntimeError, match="piece 1 has"):
        stats.merge_stats([good, stats.group_stats(x, 4)])
    with pytest.raises(TypeError, match="stats must be GroupStats"):
        stats.normalize(x, tuple(good))
    with pytest.raises(RuntimeError, match=r"stats.count of shape \(N, G\)"):
        stats.normalize(x[:1], good)
    with pytest.raises(RuntimeError, match="does not track gradients"):
        stats.group_stats(x.clone().requires_grad_(), 2)
    with torch.no_grad():
        stats.normalize(x, good, torch.ones(4, device=device, requires_grad=True))  # fine without autograd


def test_distributed_module_keeps_state_dict_and_converts_in_place():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1), torch.nn.GroupNorm(4, 8), gn_triton.GroupNorm(2, 8))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    norms = (model[1], model[2])
    assert gnd.convert_model(model) is model
    assert all(type(m) is gnd.GroupNorm and m is n for m, n in zip((model[1], model[2]), norms))
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert isinstance(model[1], torch.nn.GroupNorm) and model[1].group is None
    fresh = gnd.GroupNorm(4, 8, activation="silu")
    assert fresh.state_dict().keys() == torch.nn.GroupNorm(4, 8).state_dict().keys()


def test_docs_explain_the_api():
    text = (ROOT / "docs" / "distributed.md").read_text()
    for words in ("gn_triton.distributed.group_norm", "gn_triton.stats", "contribution", "all_gather", "gloo"):
        assert words in text
