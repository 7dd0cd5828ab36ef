"""DistributedDataParallel (gloo, CPU, 2 processes) trains torchmha exactly like one process."""

from pathlib import Path
from typing import Dict

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

import torchmha

WORLD_SIZE, STEPS, BATCH, LENGTH, EMBED_DIM = 2, 3, 4, 6, 8


class Classifier(nn.Module):
    """Self-attention, mean pooling, a linear head: a whole small model on torchmha."""

    def __init__(self) -> None:
        super().__init__()
        self.attention = torchmha.MultiHeadAttention(EMBED_DIM, 2, batch_first=True)
        self.head = nn.Linear(EMBED_DIM, 3)

    def forward(self, x: Tensor) -> Tensor:
        attended, _ = self.attention(x, x, x, need_weights=False)
        return self.head(attended.mean(dim=1))


def make_model_and_data():
    """The same initial weights and the same batches in every process."""
    torch.manual_seed(0)
    model = Classifier().double()
    inputs = torch.randn(STEPS, BATCH, LENGTH, EMBED_DIM, dtype=torch.float64)
    targets = torch.randint(0, 3, (STEPS, BATCH))
    return model, inputs, targets


def train(model: nn.Module, inputs: Tensor, targets: Tensor) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for step in range(STEPS):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(inputs[step]), targets[step]).backward()
        optimizer.step()


def worker(rank: int, store: str, output: str) -> None:
    """One DDP rank: trains on its half of each batch; rank 0 writes the final weights."""
    # A file store: no port to pick, so no race with other processes on the machine.
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD_SIZE)
    try:
        model, inputs, targets = make_model_and_data()
        shard = slice(rank * BATCH // WORLD_SIZE, (rank + 1) * BATCH // WORLD_SIZE)
        train(DistributedDataParallel(model), inputs[:, shard], targets[:, shard])
        if rank == 0:
            torch.save(dict(model.state_dict()), output)
    finally:
        dist.destroy_process_group()


def test_ddp_matches_single_process(tmp_path: Path) -> None:
    """Equal shards and mean losses: DDP's averaged gradients are the full batch's."""
    output = tmp_path / "ddp_state.pt"
    store = tmp_path / "store"
    mp.spawn(worker, args=(str(store), str(output)), nprocs=WORLD_SIZE, join=True)
    distributed: Dict[str, Tensor] = torch.load(output)

    model, inputs, targets = make_model_and_data()
    initial = {name: value.clone() for name, value in model.state_dict().items()}
    train(model, inputs, targets)
    assert distributed.keys() == model.state_dict().keys()
    for name, value in model.state_dict().items():
        torch.testing.assert_close(distributed[name], value, atol=1e-12, rtol=1e-10)
        assert not torch.equal(value, initial[name]), f"{name} did not train"
