"""Patch-parallel conv + GroupNorm + SiLU on several processes, equal to the same network on one.

    python notebooks/patch_parallel.py --world 4           # CPU processes (gloo), Triton's interpreter
    torchrun --nproc-per-node 4 notebooks/patch_parallel.py --torchrun   # one GPU per process (NCCL)

The input image is cut into horizontal slabs, one per process, as patch-parallel VAE decoders do with
activations too large for one GPU. Each 3x3 convolution needs one row of each neighbour's slab (a
1-pixel halo, exchanged with all_gather: its backward sends the halo's gradient back), and each
GroupNorm needs the statistics of the whole image: gn_triton.distributed.convert_model makes every
GroupNorm exchange them (one small all_gather per call). A forward and backward on the slabs give the
single-process network's output slab by slab, its input gradient, and its parameter gradients once
summed over the processes. Prints the largest differences.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import gn_triton.distributed as gnd


class HaloExchange(torch.autograd.Function):
    """x (N, C, H_slab, W) with one row of each neighbouring slab added above and below (zeros at the
    image's edges: the convolution's own zero padding). Every slab must hold a row."""

    @staticmethod
    def forward(ctx, x):
        rank, world = dist.get_rank(), dist.get_world_size()
        edges = _gather(torch.cat([x[:, :, :1], x[:, :, -1:]], 2))  # (world, N, C, 2, W): first and last rows
        above = edges[rank - 1, :, :, 1:] if rank > 0 else torch.zeros_like(x[:, :, :1])
        below = edges[rank + 1, :, :, :1] if rank < world - 1 else torch.zeros_like(x[:, :, :1])
        return torch.cat([above, x, below], 2)

    @staticmethod
    def backward(ctx, grad):
        rank, world = dist.get_rank(), dist.get_world_size()
        halos = _gather(torch.cat([grad[:, :, :1], grad[:, :, -1:]], 2))  # each slab's halo gradients
        dx = grad[:, :, 1:-1].clone()
        if rank > 0:  # the previous slab's lower halo was my first row
            dx[:, :, :1] += halos[rank - 1, :, :, 1:]
        if rank < world - 1:  # the next slab's upper halo was my last row
            dx[:, :, -1:] += halos[rank + 1, :, :, :1]
        return dx


def _gather(t: torch.Tensor) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.stack(parts)


class Block(torch.nn.Module):
    """conv3x3 -> GroupNorm+SiLU -> conv3x3 -> GroupNorm, the core of a VAE decoder's resnet block."""

    def __init__(self, channels: int = 8, groups: int = 4, sharded: bool = False):
        super().__init__()
        self.sharded = sharded
        pad = (0, 1) if sharded else 1  # sharded: the rows come from the halo
        self.conv1 = torch.nn.Conv2d(3, channels, 3, padding=pad)
        self.norm1 = torch.nn.GroupNorm(groups, channels)
        self.act = torch.nn.SiLU()
        self.conv2 = torch.nn.Conv2d(channels, channels, 3, padding=pad)
        self.norm2 = torch.nn.GroupNorm(groups, channels)

    def forward(self, x):
        halo = HaloExchange.apply if self.sharded else (lambda t: t)
        return self.norm2(self.conv2(halo(self.act(self.norm1(self.conv1(halo(x)))))))


def model(sharded: bool) -> Block:
    torch.manual_seed(0)
    block = Block(sharded=sharded).double()
    return gnd.convert_model(block) if sharded else block


def data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 13, 6, generator=g, dtype=torch.float64)
    return x, torch.randn(2, 8, 13, 6, generator=g, dtype=torch.float64)


def run(device: torch.device) -> dict:
    """This process's slab through the sharded block, compared with the whole image on one process."""
    rank, world = dist.get_rank(), dist.get_world_size()
    x, dy = (t.to(device) for t in data())
    rows = torch.tensor_split(torch.arange(x.shape[2]), world)[rank]
    first, count = int(rows[0]), len(rows)

    whole = model(sharded=False).to(device)
    x_whole = x.clone().requires_grad_()
    y_whole = whole(x_whole)
    y_whole.backward(dy)

    sharded = model(sharded=True).to(device)
    x_slab = x[:, :, first : first + count].clone().requires_grad_()
    y_slab = sharded(x_slab)
    y_slab.backward(dy[:, :, first : first + count])

    diffs = {"y": (y_slab - y_whole[:, :, first : first + count]).abs().max().item(),
             "dx": (x_slab.grad - x_whole.grad[:, :, first : first + count]).abs().max().item()}  # fmt: skip
    for (name, p), q in zip(sharded.named_parameters(), whole.parameters()):
        grad = p.grad.clone()
        dist.all_reduce(grad)  # each slab's contribution, summed: the whole image's gradient
        diffs[f"d{name}"] = (grad - q.grad).abs().max().item()
    return diffs


def worker(rank: int, world: int, port: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    diffs = run(torch.device("cpu"))
    if rank == 0:
        shown = ", ".join(f"{k} {v:.2e}" for k, v in diffs.items())
        print(f"{world} processes: largest difference to one process: {shown}")
        print(f"max difference {max(diffs.values()):.3e}")
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=int, default=2, help="CPU processes to spawn (gloo)")
    parser.add_argument("--port", default="29541", help="loopback port of the process group")
    parser.add_argument("--torchrun", action="store_true", help="launched by torchrun: one GPU per process (NCCL)")
    args = parser.parse_args()
    if args.torchrun:
        dist.init_process_group("nccl")
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        diffs = run(device)
        if dist.get_rank() == 0:
            print(f"max difference {max(diffs.values()):.3e}")
        dist.destroy_process_group()
        return
    os.environ.setdefault("TRITON_INTERPRET", "1")  # CPU tensors run gn_triton's kernels in the interpreter
    mp.spawn(worker, args=(args.world, args.port), nprocs=args.world, join=True)


if __name__ == "__main__":
    main()
