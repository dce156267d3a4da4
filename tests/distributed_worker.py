"""gn_triton.distributed on CPU processes (gloo), for tests/test_distributed.py (run as a script: spawn
needs a __main__):

    python tests/distributed_worker.py WORLD OUT_DIR PORT

Every rank builds the same full tensors from one seed, runs its shard (a slab along H of 4-D or T of
5-D input, of uneven sizes, some empty) through gn_triton.distributed.group_norm forward and backward,
and compares with the float64 reference of the full tensor: its slab of y and dx, and the parameters'
gradients summed over the ranks (all_reduce); a gradient penalty (double backward) against torch. Then
bad and mismatched arguments, which must raise on every rank. Each rank writes OUT_DIR/rank<r>.json:
[{"case": ..., "errors": {...}} or {"case": ..., "raised": "Type: message"}].
"""

import json
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from gn_testing import error as relative_error
from gn_testing import forced, make_input, make_modulation, make_params, reference

import gn_triton.distributed as gnd


def shard_sizes(total: int, world: int) -> list[int]:
    """Uneven sizes summing to `total`, the second-to-last shard empty (when world > 2)."""
    if world == 2:
        return [total // 3, total - total // 3]
    sizes = [1 + k for k in range(world - 2)] + [0]
    return sizes + [total - sum(sizes)]


# (name, shape, sharded dim, dtype, layout, epilogue, plan). The shapes' sharded dim is long enough for
# every shard to be non-empty where shard_sizes says so.
CASES = [
    ("4-D H, weight+bias", (2, 6, 9, 5), 2, torch.float64, "contiguous", dict(), "heuristic"),
    ("4-D H, silu, scale+shift", (2, 6, 9, 5), 2, torch.float64, "contiguous",
     dict(activation="silu", scale=True, shift=True), "heuristic"),
    ("4-D H, gelu, no weight", (1, 12, 11, 3), 2, torch.float64, "contiguous",
     dict(activation="gelu", weight=False), "split 3, 2 channel chunks"),
    ("4-D H, gelu_tanh, bias only", (2, 8, 9, 4), 2, torch.float64, "channels_last",
     dict(activation="gelu_tanh", weight=False), "split 2, waves of 3 blocks"),
    ("4-D W, offset 1e4, no affine", (2, 6, 4, 10), 3, torch.float64, "contiguous",
     dict(weight=False, bias=False, offset=1e4), "fused, 4 groups per program"),
    ("5-D T, silu, scale+shift", (1, 6, 9, 3, 2), 2, torch.float64, "contiguous",
     dict(activation="silu", scale=True, shift=True), "split 3, 4 groups per program"),
    ("5-D T, channels_last_3d", (2, 4, 10, 2, 3), 2, torch.float64, "channels_last", dict(), "heuristic"),
    ("4-D H, fp32, offset 100", (2, 6, 9, 5), 2, torch.float32, "contiguous", dict(offset=100.0), "heuristic"),
    ("4-D H, bf16, silu", (1, 8, 12, 4), 2, torch.bfloat16, "contiguous", dict(activation="silu"), "heuristic"),
]  # fmt: skip
TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 3e-2}


def run_case(rank: int, world: int, case) -> dict:
    name, shape, dim, dtype, layout, epilogue, plan = case
    epilogue = dict(epilogue)
    G = shape[1] // 2
    torch.manual_seed(sum(map(ord, name)))  # the same tensors on every rank
    x = make_input(shape, dtype, offset=epilogue.pop("offset", 0.0), layout=layout)
    weight, bias = make_params(shape[1], dtype, weight=epilogue.pop("weight", True), bias=epilogue.pop("bias", True))
    scale, shift = make_modulation(shape[0], shape[1], dtype, scale=epilogue.pop("scale", False),
                                   shift=epilogue.pop("shift", False))  # fmt: skip
    dy = torch.randn(shape, dtype=torch.float64).to(dtype)
    ref = reference(x, G, weight, bias, dy, activation=epilogue.get("activation"), scale=scale, shift=shift)
    sizes = shard_sizes(shape[dim], world)
    start = sum(sizes[:rank])

    def mine(t):
        return t.narrow(dim, start, sizes[rank])

    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in (weight, bias, scale, shift)]
    x_shard = mine(x).detach().clone().requires_grad_()
    with forced(plan):
        y = gnd.group_norm(x_shard, G, leaves[0], leaves[1], scale=leaves[2], shift=leaves[3], **epilogue)
        y.backward(mine(dy))
    errors = {"y": relative_error(y, mine(ref[0])), "dx": relative_error(x_shard.grad, mine(ref[1]))}
    errors["y memory format"] = 0.0 if y.stride() == x_shard.stride() or y.numel() == 0 else float("inf")
    for what, leaf, expected in zip(("dweight", "dbias", "dscale", "dshift"), leaves, ref[2:]):
        if leaf is not None:
            total = leaf.grad.double()
            dist.all_reduce(total)  # this rank's contribution, summed: the full gradient
            errors[what] = relative_error(total, expected)
    return {"case": name, "sizes": sizes, "tolerance": TOLERANCE[dtype], "errors": errors}


def gradient_penalty(rank: int, world: int) -> dict:
    """Double backward: the gradient of (loss + |d loss/dx|^2) through the shards (create_graph=True)
    against torch's F.group_norm of the whole tensor in float64 (x's slab, weight and bias summed)."""
    shape, G, dim = (2, 6, 9, 5), 3, 2
    torch.manual_seed(7)
    x = make_input(shape, torch.float64, offset=3.0)
    weight, bias = make_params(shape[1], torch.float64)
    dy = torch.randn(shape, dtype=torch.float64)

    def penalised(f, x, w, b, dy):
        loss = (f(x, w, b) * dy).sum()
        (g,) = torch.autograd.grad(loss, x, create_graph=True)
        return loss + (g * g).sum()

    leaves = [t.detach().clone().requires_grad_() for t in (x, weight, bias)]
    penalised(lambda x, w, b: F.silu(F.group_norm(x, G, w, b)), *leaves, dy).backward()
    expected = [t.grad for t in leaves]
    sizes = shard_sizes(shape[dim], world)
    start = sum(sizes[:rank])
    x_shard, w, b = (t.detach().clone().requires_grad_() for t in (x.narrow(dim, start, sizes[rank]), weight, bias))
    dy_shard = dy.narrow(dim, start, sizes[rank])
    penalised(lambda x, w, b: gnd.group_norm(x, G, w, b, activation="silu"), x_shard, w, b, dy_shard).backward()
    errors = {"dx": relative_error(x_shard.grad, expected[0].narrow(dim, start, sizes[rank]))}
    for what, leaf, e in zip(("dweight", "dbias"), (w, b), expected[1:]):
        total = leaf.grad.clone()
        dist.all_reduce(total)  # this rank's contribution, summed: the full gradient
        errors[what] = relative_error(total, e)
    return {"case": "gradient penalty (double backward)", "tolerance": 1e-10, "errors": errors}


def bad_calls(rank: int, world: int):
    """(name, call): arguments that are wrong on one rank or differ between ranks."""
    x = torch.randn(2, 4, 3 + rank, 5, dtype=torch.float64)
    w = torch.ones(4, dtype=torch.float64)
    return [
        ("channels differ", lambda: gnd.group_norm(torch.randn(2, 4 + 2 * rank, 3, 5, dtype=torch.float64), 2)),
        ("groups differ", lambda: gnd.group_norm(x, 2 if rank == 0 else 4)),
        ("two dims differ", lambda: gnd.group_norm(torch.randn(2, 4, 3 + rank, 5 + rank, dtype=torch.float64), 2)),
        ("weight wrong on rank 1", lambda: gnd.group_norm(x, 2, w if rank != 1 else torch.ones(3, dtype=w.dtype))),
        ("activation differs", lambda: gnd.group_norm(x, 2, activation=None if rank else "silu")),
        ("eps differs", lambda: gnd.group_norm(x, 2, eps=1e-5 * (1 + rank))),
        ("one value per group in all", lambda: gnd.group_norm(
            torch.randn(1, 2, 1 if rank == 0 else 0, 1, dtype=torch.float64), 2)),
    ]  # fmt: skip


def worker(rank: int, world: int, out: str, port: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    results = [run_case(rank, world, case) for case in CASES]
    results.append(gradient_penalty(rank, world))
    for name, call in bad_calls(rank, world):
        try:
            call()
            results.append({"case": name, "raised": None})
        except Exception as e:  # what each rank raises is the result
            results.append({"case": name, "raised": f"{type(e).__name__}: {e}"})
    # Still in step after the errors, and inside a compiled function (the call runs eagerly there).
    x = torch.randn(1, 4, 2 + rank, 3, dtype=torch.float64)
    compiled = torch.compile(lambda t: gnd.group_norm(t * 2, 2, activation="silu") + 1, backend="aot_eager")
    same = torch.equal(compiled(x), gnd.group_norm(x * 2, 2, activation="silu") + 1)
    results.append({"case": "compiled, after the errors", "errors": {"y": 0.0 if same else float("inf")},
                    "tolerance": 0.0})  # fmt: skip
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(results, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    world, out, port = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    mp.spawn(worker, args=(world, out, port), nprocs=world, join=True)
