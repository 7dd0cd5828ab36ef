"""Head-parallel tensor parallelism and FSDP2 (gloo, CPU) equal one process in float64.

Each test spawns its processes once and runs several checks in them; every rank writes what it
measured (the largest difference to the single-process model, or the error it raised) and the
test reads it back. Collectives time out, and the spawn is killed past a deadline, so a
distributed bug fails the test instead of hanging it.
"""

import copy
import json
import math
import os
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Callable, Dict, List, Optional

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor.parallel import parallelize_module

import torchmha
from torchmha.parallel import (
    HeadParallel,
    _gather,
    _sharded_tensors,
    full_state_dict,
    load_full_state_dict,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts" / "examples"))
import parallel as example  # noqa: E402  (scripts/examples/parallel.py: the model it trains)

TOLERANCE = 1e-10
DEADLINE_S = 120
BATCH, LENGTH, EMBED_DIM, STEPS = 2, 5, 8, 3


def spawn(worker: Callable, world_size: int, tmp_path: Path) -> List[Dict[str, object]]:
    """Runs ``worker(rank, world_size, store, output)`` in each process; returns their reports."""
    store = tmp_path / "store"
    outputs = [tmp_path / f"rank{rank}.json" for rank in range(world_size)]
    context = mp.start_processes(
        _run_worker,
        args=(worker, world_size, str(store), str(tmp_path)),
        nprocs=world_size,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + DEADLINE_S
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {world_size} processes did not finish within {DEADLINE_S} s")
    return [json.loads(output.read_text()) for output in outputs]


def _run_worker(rank: int, worker: Callable, world_size: int, store: str, directory: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=60),
    )
    report: Dict[str, object] = {}
    try:
        worker(rank, world_size, report)
    except Exception:  # a report of what failed, rather than a dead process
        report["worker failed"] = traceback.format_exc()
    finally:
        Path(directory, f"rank{rank}.json").write_text(json.dumps(report))
        dist.destroy_process_group()


def largest_difference(actual: Optional[Tensor], expected: Optional[Tensor]) -> float:
    if actual is None or expected is None:
        assert actual is None and expected is None, "one of two tensors is None"
        return 0.0
    assert actual.shape == expected.shape, f"{tuple(actual.shape)} != {tuple(expected.shape)}"
    return (actual - expected).abs().max().item()


# The tensor-parallel configurations: each covers some options, all together cover the issue's.
CONFIGS = {
    "plain, key padding mask, averaged weights": dict(
        module=dict(num_heads=4, batch_first=True),
        forward=dict(key_padding_mask=True, average_attn_weights=True),
    ),
    "grouped kv split, rotary, is_causal, per-head weights": dict(
        module=dict(num_heads=4, num_kv_heads=2, rope_theta=10000.0, batch_first=True),
        forward=dict(is_causal=True, average_attn_weights=False),
    ),
    "grouped kv replicated (1 kv head), rotary dim, per-head 3-D mask, bias_k": dict(
        module=dict(num_heads=2, num_kv_heads=1, rope_theta=100.0, rotary_dim=2, add_bias_kv=True),
        forward=dict(per_head_mask=True, average_attn_weights=False),
    ),
    "cross attention (kdim/vdim), zero attn, no bias, 2-D mask": dict(
        module=dict(num_heads=4, kdim=6, vdim=3, add_zero_attn=True, bias=False),
        forward=dict(causal_mask=True, average_attn_weights=True),
    ),
}


def make_pair(options: Dict[str, object], mesh) -> tuple:
    torch.manual_seed(0)
    reference = torchmha.MultiHeadAttention(EMBED_DIM, dtype=torch.float64, **options)
    with torch.no_grad():  # biases start at zero: make them count
        for name, parameter in reference.named_parameters():
            if "bias" in name:
                parameter.normal_()
    parallel = parallelize_module(copy.deepcopy(reference), mesh, HeadParallel())
    return reference, parallel


def make_inputs(module: torchmha.MultiHeadAttention, forward: Dict[str, object]):
    torch.manual_seed(1)
    batch_dim = (BATCH, LENGTH) if module.batch_first else (LENGTH, BATCH)
    query = torch.randn(*batch_dim, EMBED_DIM, dtype=torch.float64)
    cross = module.kdim != EMBED_DIM
    key = torch.randn(*batch_dim, module.kdim, dtype=torch.float64) if cross else query
    value = torch.randn(*batch_dim, module.vdim, dtype=torch.float64) if cross else query
    kwargs: Dict[str, object] = {"average_attn_weights": forward["average_attn_weights"]}
    if forward.get("key_padding_mask"):
        mask = torch.zeros(BATCH, LENGTH, dtype=torch.bool)
        mask[0, -2:] = True
        kwargs["key_padding_mask"] = mask
    if forward.get("is_causal"):
        kwargs["is_causal"] = True
    if forward.get("causal_mask"):
        kwargs["attn_mask"] = torch.ones(LENGTH, LENGTH, dtype=torch.bool).triu(1)
    if forward.get("per_head_mask"):
        kwargs["attn_mask"] = torch.randn(
            BATCH * module.num_heads, LENGTH, LENGTH, dtype=torch.float64
        )
    return query, key, value, kwargs


def run_step(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, kwargs) -> tuple:
    """Forward and backward of a loss on the outputs and the weights; returns what to compare."""
    inputs = [tensor.detach().requires_grad_() for tensor in (query, key, value)]
    if key is query:
        inputs[1] = inputs[2] = inputs[0]
    elif value is key:
        inputs[2] = inputs[1]
    output, weights = module(*inputs, need_weights=True, **kwargs)
    torch.manual_seed(2)
    loss = (output * torch.randn_like(output)).sum() + (weights * torch.randn_like(weights)).sum()
    loss.backward()
    return output, weights, [tensor.grad for tensor in inputs]


def full_gradients(module: nn.Module) -> Dict[str, Tensor]:
    """Every parameter's gradient; a parallel module's shards gathered."""
    gradients = {name: parameter.grad for name, parameter in module.named_parameters()}
    if hasattr(module, "head_layout"):
        for name in _sharded_tensors(module):
            gradients[name] = _gather(name, gradients[name], module.head_layout)
    return gradients


def check_tensor_parallel(report: Dict[str, object], mesh) -> None:
    for label, config in CONFIGS.items():
        reference, parallel = make_pair(config["module"], mesh)
        query, key, value, kwargs = make_inputs(reference, config["forward"])
        expected = run_step(reference, query, key, value, kwargs)
        actual = run_step(parallel, query, key, value, kwargs)
        differences = {
            "output": largest_difference(actual[0], expected[0]),
            "weights": largest_difference(actual[1], expected[1]),
        }
        for index, (got, want) in enumerate(zip(actual[2], expected[2])):
            differences[f"input {index} grad"] = largest_difference(got, want)
        reference_gradients = full_gradients(reference)
        for name, gradient in full_gradients(parallel).items():
            assert reference_gradients[name].abs().max() > 0, f"{label}: {name} has no gradient"
            differences[f"{name}.grad"] = largest_difference(gradient, reference_gradients[name])
        report[f"tp: {label}"] = differences


def check_unbatched(report: Dict[str, object], mesh) -> None:
    reference, parallel = make_pair(dict(num_heads=2, num_kv_heads=2, rope_theta=10.0), mesh)
    torch.manual_seed(1)
    query = torch.randn(LENGTH, EMBED_DIM, dtype=torch.float64)
    positions = torch.tensor([3, 1, 4, 1, 5])
    kwargs = dict(average_attn_weights=False, positions=positions)
    expected = run_step(reference, query, query, query, kwargs)
    actual = run_step(parallel, query, query, query, kwargs)
    with torch.no_grad():  # a copy of a parallel module is one too
        copied, _ = copy.deepcopy(parallel)(query, query, query, positions=positions)
    report["tp: unbatched, positions, per-head weights"] = {
        "output": largest_difference(actual[0], expected[0]),
        "output of a copy": largest_difference(copied, expected[0]),
        "weights": largest_difference(actual[1], expected[1]),
        "input grad": largest_difference(actual[2][0], expected[2][0]),
    }


def check_textbook(report: Dict[str, object], mesh) -> None:
    """The textbook adapter: outputs, every head's ``attn`` and gradients, with a mask."""
    torch.manual_seed(0)
    reference = torchmha.TextbookMultiHeadAttention(4, EMBED_DIM, dropout=0.0).double()
    parallel = parallelize_module(copy.deepcopy(reference), mesh, HeadParallel())
    torch.manual_seed(1)
    inputs = [torch.randn(BATCH, LENGTH, EMBED_DIM, dtype=torch.float64) for _ in range(3)]
    mask = torch.ones(BATCH, 1, LENGTH, LENGTH).tril()
    differences = {}
    results = []
    for module in (reference, parallel):
        leaves = [tensor.clone().requires_grad_() for tensor in inputs]
        output = module(*leaves, mask=mask)
        torch.manual_seed(2)
        loss = (output * torch.randn_like(output)).sum()
        (loss + (module.attn * torch.randn_like(module.attn)).sum()).backward()
        results.append(
            (output, module.attn, [leaf.grad for leaf in leaves], full_gradients(module))
        )
    expected, actual = results
    differences["output"] = largest_difference(actual[0], expected[0])
    differences["attn"] = largest_difference(actual[1], expected[1])
    for index in range(3):
        differences[f"input {index} grad"] = largest_difference(
            actual[2][index], expected[2][index]
        )
    for name, gradient in expected[3].items():
        differences[f"{name}.grad"] = largest_difference(actual[3][name], gradient)
    report["tp: textbook adapter, mask, attn"] = differences


def check_weights_from_rank_zero(report: Dict[str, object], mesh) -> None:
    """Ranks that start from different weights all get mesh rank 0's (``src_data_rank=0``)."""
    torch.manual_seed(10 + mesh.get_local_rank())
    options = dict(num_heads=2, add_bias_kv=True, dtype=torch.float64)
    parallel = parallelize_module(
        torchmha.MultiHeadAttention(EMBED_DIM, **options), mesh, HeadParallel()
    )
    torch.manual_seed(10)
    rank_zero = torchmha.MultiHeadAttention(EMBED_DIM, **options).state_dict()
    report["state dict: weights from mesh rank 0"] = {
        name: largest_difference(tensor, rank_zero[name])
        for name, tensor in full_state_dict(parallel).items()
    }


def check_state_dicts(report: Dict[str, object], mesh) -> None:
    """A full state dict loads into the parallel model; one SGD step later, back again."""
    options = dict(num_heads=4, num_kv_heads=1, add_bias_kv=True, batch_first=True)
    reference, parallel = make_pair(options, mesh)
    torch.manual_seed(3)
    trained = torchmha.MultiHeadAttention(EMBED_DIM, dtype=torch.float64, **options)
    load_full_state_dict(parallel, trained.state_dict())
    reference.load_state_dict(trained.state_dict())
    query, key, value, kwargs = make_inputs(reference, dict(average_attn_weights=True))
    differences = {
        name: largest_difference(tensor, trained.state_dict()[name])
        for name, tensor in full_state_dict(parallel).items()
    }
    for module in (reference, parallel):
        optimizer = torch.optim.SGD(module.parameters(), lr=0.5)
        run_step(module, query, key, value, kwargs)
        optimizer.step()
    stepped = full_state_dict(parallel)
    assert stepped.keys() == reference.state_dict().keys()
    for name, tensor in reference.state_dict().items():
        differences[f"after a step: {name}"] = largest_difference(stepped[name], tensor)
    report["state dict: full -> tensor parallel -> full"] = differences


def check_errors(report: Dict[str, object], tp_mesh, mesh_2d) -> None:
    cases = {
        "heads": (lambda: torchmha.MultiHeadAttention(6, 3), tp_mesh),
        "kv heads": (lambda: torchmha.MultiHeadAttention(12, 6, num_kv_heads=3), tp_mesh),
        "mesh": (lambda: torchmha.MultiHeadAttention(EMBED_DIM, 2), mesh_2d),
        "module": (lambda: nn.MultiheadAttention(EMBED_DIM, 2), tp_mesh),
    }
    for name, (make, device_mesh) in cases.items():
        try:
            parallelize_module(make(), device_mesh, HeadParallel())
            report[f"error: {name}"] = "no error"
        except ValueError as error:
            report[f"error: {name}"] = str(error)


def make_training_data(dp_rank: int, dp_size: int):
    """The same model and batches everywhere; a data-parallel rank keeps its rows."""
    torch.manual_seed(0)
    model = example.TinyModel().double()
    inputs = torch.randn(STEPS, 4, LENGTH, example.EMBED_DIM, dtype=torch.float64)
    targets = torch.randn(STEPS, 4, LENGTH, dtype=torch.float64)
    rows = slice(dp_rank * 4 // dp_size, (dp_rank + 1) * 4 // dp_size)
    return model, inputs[:, rows], targets[:, rows]


def check_training(report: Dict[str, object], label: str, tp_mesh, dp_mesh) -> None:
    """Trains the example's model parallelized, and on one process; compares the weights."""
    reference, inputs, targets = make_training_data(0, 1)
    initial = {name: tensor.clone() for name, tensor in reference.state_dict().items()}
    train_losses = example.train(reference, inputs, targets)
    dp_rank, dp_size = (0, 1) if dp_mesh is None else (dp_mesh.get_local_rank(), dp_mesh.size())
    model, inputs, targets = make_training_data(dp_rank, dp_size)
    parallel_losses = example.train(example.parallelize(model, tp_mesh, dp_mesh), inputs, targets)
    trained = full_state_dict(model)
    assert trained.keys() == reference.state_dict().keys()
    differences = {}
    for name, tensor in reference.state_dict().items():
        assert not torch.equal(tensor, initial[name]), f"{name} did not train"
        differences[name] = largest_difference(trained[name], tensor)
    if dp_mesh is None:  # each rank's loss is the whole batch's
        differences["losses"] = max(
            abs(a.item() - b.item()) for a, b in zip(parallel_losses, train_losses)
        )
    report[f"training: {label}"] = differences


def parallel_worker(rank: int, world_size: int, report: Dict[str, object]) -> None:
    """Tensor parallel over 2 ranks (twice, one per data-parallel row), FSDP2 over 2, 2-D."""
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    check_errors(report, mesh["tp"], mesh)
    check_tensor_parallel(report, mesh["tp"])
    check_unbatched(report, mesh["tp"])
    check_textbook(report, mesh["tp"])
    check_state_dicts(report, mesh["tp"])
    check_weights_from_rank_zero(report, mesh["tp"])
    check_training(report, "tensor parallel, tp=2", mesh["tp"], None)
    check_training(report, "FSDP2, dp=2", None, mesh["dp"])
    check_training(report, "2-D, dp=2 x tp=2", mesh["tp"], mesh["dp"])
    # The example's own entry (what torchrun runs after init_process_group), 2-D.
    report["example losses"] = example.run(["--tp", "2", "--fsdp", "--steps", "3"])


def assert_within_tolerance(reports: List[Dict[str, object]], prefix: str) -> None:
    for rank, report in enumerate(reports):
        assert "worker failed" not in report, f"rank {rank}: {report['worker failed']}"
        checks = {name: value for name, value in report.items() if name.startswith(prefix)}
        assert checks, f"rank {rank} ran no check starting with {prefix!r}"
        for check, differences in checks.items():
            for quantity, difference in differences.items():
                assert difference <= TOLERANCE, f"rank {rank}, {check}, {quantity}: {difference}"


def test_head_parallel_and_fsdp2_equal_one_process(tmp_path: Path) -> None:
    """One spawn of 4 ranks, a (dp=2, tp=2) mesh: every check compares to one process."""
    reports = spawn(parallel_worker, 4, tmp_path)
    for prefix in ("tp: ", "state dict: ", "training: "):
        assert_within_tolerance(reports, prefix)
    # The messages name the counts, on every rank.
    for report in reports:
        assert "num_heads 3 is not divisible by the mesh size 2" in report["error: heads"]
        assert "num_kv_heads 3 and the mesh size 2" in report["error: kv heads"]
        assert "1-D device mesh" in report["error: mesh"] and "(2, 2)" in report["error: mesh"]
        assert "but got torch.nn.modules.activation.MultiheadAttention" in report["error: module"]
    # The example trains: 3 finite losses, the same on every rank (all-reduced).
    losses = reports[0]["example losses"]
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses), losses
    assert all(report["example losses"] == losses for report in reports)
    if os.environ.get("TORCHMHA_PRINT_PARALLEL"):
        for check, differences in reports[0].items():
            if isinstance(differences, dict):
                print(f"{check}: largest difference {max(differences.values()):.3g}")
