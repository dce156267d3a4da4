"""DistributedDataParallel check for tests/test_models.py (run as a script: spawn needs a __main__).

Trains one SGD step of a small conv + gn_triton GroupNorm model on 2 CPU processes (gloo backend,
Triton interpreter) with half the batch each, and compares the parameters with the same step on
one process over the whole batch. Prints the largest difference.
"""

import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import gn_triton


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.GroupNorm(4, 8), torch.nn.SiLU(), torch.nn.Conv2d(8, 2, 1)
    ).double()
    return gn_triton.convert_model(model, activation_fusion=True)


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(4, 3, 6, 6, generator=g, dtype=torch.float64), torch.randn(
        4, 2, 6, 6, generator=g, dtype=torch.float64
    )


def step(model, x, target) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    torch.nn.functional.mse_loss(model(x), target).backward()
    optimizer.step()


def worker(rank: int, world: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("GN_DDP_PORT", "29533"))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model = torch.nn.parallel.DistributedDataParallel(make_model())
    x, target = batch()
    half = x.shape[0] // world
    step(model, x[rank * half : (rank + 1) * half], target[rank * half : (rank + 1) * half])
    if rank == 0:
        torch.save(model.module.state_dict(), os.path.join(out, "ddp.pt"))
    dist.destroy_process_group()


def main() -> None:
    out = sys.argv[1]
    mp.spawn(worker, args=(2, out), nprocs=2, join=True)
    single = make_model()
    step(single, *batch())
    ddp = torch.load(os.path.join(out, "ddp.pt"))
    diff = max((ddp[k] - v).abs().max().item() for k, v in single.state_dict().items())
    print(f"max parameter difference {diff:.3e}")


if __name__ == "__main__":
    main()
