"""Tensor parallelism by heads and FSDP2 on a tiny two-block model of torchmha attention.

    torchrun --nproc-per-node 2 scripts/examples/parallel.py              # heads over 2 ranks
    torchrun --nproc-per-node 2 scripts/examples/parallel.py --fsdp       # FSDP2 over 2 ranks
    torchrun --nproc-per-node 4 scripts/examples/parallel.py --tp 2 --fsdp   # 2-D: data x heads

Runs on the CPU with gloo, trains a few steps on random data and prints the loss on rank 0.
``HeadParallel`` splits each attention by heads over the mesh's "tp" dimension; ``fully_shard``
shards every block's parameters (the head shards included) over its "dp" dimension.
"""

import argparse
from typing import List, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor.parallel import parallelize_module

import torchmha
from torchmha.parallel import HeadParallel

EMBED_DIM, NUM_HEADS, NUM_KV_HEADS = 8, 4, 2


class Block(nn.Module):
    """Pre-norm causal self-attention (grouped heads, rotary) and an MLP, with residuals."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(EMBED_DIM)
        self.attention = torchmha.MultiHeadAttention(
            EMBED_DIM, NUM_HEADS, num_kv_heads=NUM_KV_HEADS, rope_theta=10000.0, batch_first=True
        )
        self.mlp = nn.Sequential(
            nn.Linear(EMBED_DIM, 2 * EMBED_DIM), nn.GELU(), nn.Linear(2 * EMBED_DIM, EMBED_DIM)
        )

    def forward(self, x: Tensor) -> Tensor:
        normed = self.norm(x)
        x = x + self.attention(normed, normed, normed, need_weights=False, is_causal=True)[0]
        return x + self.mlp(x)


class TinyModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(EMBED_DIM, 1)

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        # One feature: summing it drops the dimension without returning a view (FSDP2 warns).
        return self.head(x).sum(dim=-1)


def parallelize(
    model: TinyModel, tp_mesh: Optional[DeviceMesh], dp_mesh: Optional[DeviceMesh]
) -> TinyModel:
    """Heads over ``tp_mesh`` first, then FSDP2 over ``dp_mesh`` (each optional)."""
    if tp_mesh is not None:
        plan = {f"blocks.{index}.attention": HeadParallel() for index in range(len(model.blocks))}
        parallelize_module(model, tp_mesh, plan)
    if dp_mesh is not None:
        for block in model.blocks:
            fully_shard(block, mesh=dp_mesh)
        fully_shard(model, mesh=dp_mesh)
    return model


def train(model: nn.Module, inputs: Tensor, targets: Tensor, lr: float = 0.1) -> list:
    """SGD on a mean squared error, one batch per step; returns the losses."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    losses = []
    for step_inputs, step_targets in zip(inputs, targets):
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(step_inputs), step_targets)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    return losses


def run(argv: Optional[List[str]] = None) -> List[float]:
    """Trains on the initialized process group; returns (and rank 0 prints) each step's loss."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tp", type=int, default=None, help="ranks per attention (default: all)")
    parser.add_argument("--fsdp", action="store_true", help="FSDP2 over the other dimension")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args(argv)

    world_size = dist.get_world_size()
    tp = args.tp or (world_size if not args.fsdp else 1)
    if world_size % tp != 0:
        raise SystemExit(f"--tp {tp} does not divide the world size {world_size}")
    mesh = init_device_mesh("cpu", (world_size // tp, tp), mesh_dim_names=("dp", "tp"))
    dp_rank = mesh["dp"].get_local_rank()

    torch.manual_seed(0)  # the same initial model on every rank
    model = parallelize(
        TinyModel(), mesh["tp"] if tp > 1 else None, mesh["dp"] if args.fsdp else None
    )
    # Every rank of a data-parallel group gets its own batches; the heads of one share them.
    torch.manual_seed(1 + dp_rank)
    inputs = torch.randn(args.steps, 4, 6, EMBED_DIM)
    targets = torch.randn(args.steps, 4, 6)
    losses = []
    for step, loss in enumerate(train(model, inputs, targets)):
        # Each data-parallel group's loss, once per rank: the mean over ranks is the step's loss.
        dist.all_reduce(loss, op=dist.ReduceOp.SUM)
        losses.append(loss.item() / world_size)
        if dist.get_rank() == 0:
            print(f"step {step}: loss {losses[-1]:.4f}", flush=True)
    return losses


def main() -> None:
    dist.init_process_group("gloo")  # torchrun's environment says where the others are
    try:
        run()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
