"""``need_weights=True`` on the CPU with large scores: computed in blocks of query rows.

When the scores outgrow 8 MiB, the op computes ``need_weights=True`` on the CPU block
by block, with the softmax in place, and its backward recomputes each block. These shapes make
several blocks per batch entry, including a short last one, and the result must equal
``torch.nn.MultiheadAttention`` in float64: outputs and weights, averaged and per head, with 2-D,
3-D and padding masks, rows whose keys are all masked (zero weights and a zero attention output,
where PyTorch gives NaN), and the gradients of the inputs and every parameter.
``test_blocked_gradcheck`` runs gradcheck and gradgradcheck with blocks shrunk to a few rows.
"""

import copy

import pytest
import torch
from conftest import LOW_PRECISION_FLOOR, assert_no_worse_than_pytorch
from torch import nn

import torchmha

F64 = torch.float64
# 8 KiB of float64 scores per query row and head (1024 keys): 256 rows a 2 MiB block, 5 blocks.
BATCH, TARGET_LEN, SOURCE_LEN, EMBED_DIM, NUM_HEADS = 2, 1100, 1024, 8, 2


@pytest.fixture(autouse=True)
def _two_threads():
    """The blocked path spreads its blocks over the intra-op threads: two, so that it does."""
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


def modules(**kwargs):
    torch.manual_seed(0)
    reference = nn.MultiheadAttention(EMBED_DIM, NUM_HEADS, batch_first=True, dtype=F64, **kwargs)
    ours = torchmha.MultiHeadAttention(EMBED_DIM, NUM_HEADS, batch_first=True, dtype=F64, **kwargs)
    ours.load_state_dict(reference.state_dict())
    return reference.eval(), ours.eval()


def masks(kind: str):
    generator = torch.Generator().manual_seed(1)
    if kind == "none":
        return {}
    if kind == "attn_2d":
        return {"attn_mask": torch.rand(TARGET_LEN, SOURCE_LEN, generator=generator) < 0.3}
    if kind == "attn_3d_float":
        shape = (BATCH * NUM_HEADS, TARGET_LEN, SOURCE_LEN)
        return {"attn_mask": torch.randn(shape, generator=generator, dtype=F64)}
    padding = torch.rand(BATCH, SOURCE_LEN, generator=generator) < 0.5
    return {"key_padding_mask": padding}


@pytest.mark.parametrize("average", [True, False])
@pytest.mark.parametrize("kind", ["none", "attn_2d", "attn_3d_float", "padding"])
@pytest.mark.parametrize("grad_mode", [torch.no_grad, torch.inference_mode])
def test_blocked_weights_equal_pytorch(kind, average, grad_mode):
    reference, ours = modules()
    query = torch.randn(BATCH, TARGET_LEN, EMBED_DIM, dtype=F64)
    memory = torch.randn(BATCH, SOURCE_LEN, EMBED_DIM, dtype=F64)
    given = masks(kind)
    with grad_mode():
        expected = reference(query, memory, memory, average_attn_weights=average, **given)
        actual = ours(query, memory, memory, average_attn_weights=average, **given)
    torch.testing.assert_close(actual[0], expected[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(actual[1], expected[1], rtol=1e-10, atol=1e-12)


def test_blocked_weights_self_attention_with_bias_kv():
    """The packed self-attention projection, appended bias_k/bias_v and a zero key."""
    reference, ours = modules(add_bias_kv=True, add_zero_attn=True)
    x = torch.randn(BATCH, SOURCE_LEN, EMBED_DIM, dtype=F64)
    with torch.inference_mode():
        expected = reference(x, x, x, average_attn_weights=False)
        actual = ours(x, x, x, average_attn_weights=False)
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12)


def test_blocked_weights_fully_masked_rows_attend_to_nothing():
    """Rows 3 and 700 (in the first and the third block) of batch entry 1 see no key."""
    reference, ours = modules()
    query = torch.randn(BATCH, TARGET_LEN, EMBED_DIM, dtype=F64)
    memory = torch.randn(BATCH, SOURCE_LEN, EMBED_DIM, dtype=F64)
    attn_mask = torch.zeros(BATCH * NUM_HEADS, TARGET_LEN, SOURCE_LEN, dtype=torch.bool)
    attn_mask[NUM_HEADS : 2 * NUM_HEADS, [3, 700]] = True
    with torch.inference_mode():
        expected = reference(query, memory, memory, attn_mask=attn_mask)
        output, weights = ours(query, memory, memory, attn_mask=attn_mask)
    masked = torch.zeros(BATCH, TARGET_LEN, dtype=torch.bool)
    masked[1, [3, 700]] = True
    assert expected[1][masked].isnan().all(), "PyTorch's weights for these rows are NaN"
    assert (weights[masked] == 0).all()
    torch.testing.assert_close(output[masked], ours.out_proj.bias.expand(2, -1).detach())
    torch.testing.assert_close(output[~masked], expected[0][~masked], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(weights[~masked], expected[1][~masked], rtol=1e-10, atol=1e-12)


def parameter_grads(module):
    grads = {name: p.grad for name, p in module.named_parameters()}
    return {
        "out_proj.weight" if name == "out_proj.weight" else name: g for name, g in grads.items()
    }


@pytest.mark.parametrize("average", [True, False])
@pytest.mark.parametrize("loss_uses", ["output", "weights", "both"])
@pytest.mark.parametrize("kind", ["none", "padding", "attn_3d_float"])
def test_blocked_training_equals_pytorch(kind, loss_uses, average):
    """Forward and backward (inputs and every parameter) through the blocked path."""
    reference, ours = modules()
    reference.train()
    ours.train()
    query = torch.randn(BATCH, TARGET_LEN, EMBED_DIM, dtype=F64)
    memory = torch.randn(BATCH, SOURCE_LEN, EMBED_DIM, dtype=F64)
    given = masks(kind)
    results = {}
    for name, module in (("torch", reference), ("ours", ours)):
        q = query.clone().requires_grad_(True)
        m = memory.clone().requires_grad_(True)
        output, weights = module(q, m, m, average_attn_weights=average, **given)
        if module is ours:
            assert "BlockedAttention" in weights.grad_fn.name(), "the blocked path was not taken"
        loss = torch.zeros((), dtype=F64)
        if loss_uses in ("output", "both"):
            loss = (
                loss
                + (output * torch.linspace(-1, 1, output.numel(), dtype=F64).view_as(output)).sum()
            )
        if loss_uses in ("weights", "both"):
            loss = loss + (weights.pow(2) * 1e3).sum()
        loss.backward()
        results[name] = (output, weights, q.grad, m.grad, parameter_grads(module))
    expected, actual = results["torch"], results["ours"]
    for got, want in zip(actual[:4], expected[:4]):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)
    for name, grad in expected[4].items():
        torch.testing.assert_close(actual[4][name], grad, rtol=1e-9, atol=1e-11, msg=name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_blocked_low_precision_no_worse_than_pytorch(dtype):
    """bfloat16/float16 scores of 8.6 MiB also take the blocked path, forward and backward; judged
    against float64 truth, torchmha's error stays within twice PyTorch's in the same dtype."""
    reference64, _ = modules()
    reference = copy.deepcopy(reference64).to(dtype).train()
    ours = torchmha.MultiHeadAttention(EMBED_DIM, NUM_HEADS, batch_first=True, dtype=dtype).train()
    ours.load_state_dict(reference.state_dict())
    query = torch.randn(BATCH, TARGET_LEN, EMBED_DIM, dtype=F64)
    memory = torch.randn(BATCH, SOURCE_LEN, EMBED_DIM, dtype=F64)
    reference64.load_state_dict({k: v.double() for k, v in reference.state_dict().items()})
    results = {}
    for name, module, cast in (
        ("truth", reference64.train(), F64),
        ("torch", reference, dtype),
        ("ours", ours, dtype),
    ):
        q = query.to(cast, copy=True).requires_grad_(True)
        m = memory.to(cast, copy=True).requires_grad_(True)
        output, weights = module(q, m, m)
        (output.double().sum() + 1e3 * weights.double().pow(2).sum()).backward()
        results[name] = (output, weights, q.grad, m.grad, module.in_proj_weight.grad)
    names = ("output", "weights", "query grad", "memory grad", "in_proj_weight grad")
    for i, name in enumerate(names):
        truth = results["truth"][i]
        scale = truth.abs().max().item()
        assert_no_worse_than_pytorch(
            results["ours"][i], results["torch"][i], truth, LOW_PRECISION_FLOOR[dtype] * scale, name
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("attention", ["self", "encoder_decoder"])
def test_head_layout_copies_without_autograd_equal_with_autograd(dtype, batch_first, attention):
    """Without autograd, the weights path lays projections of 1 MiB and more out head by head (and
    merges the heads back) by copying 8-byte words; with autograd, by a plain copy. Both must give
    the same numbers, and PyTorch's within its own dtype's rounding. Scores of 1-2 MiB keep the
    unblocked path, whose head merge is a copy."""
    torch.manual_seed(0)
    embed, heads = 512, 2
    reference = nn.MultiheadAttention(embed, heads, batch_first=batch_first, dtype=dtype).eval()
    ours = torchmha.MultiHeadAttention(embed, heads, batch_first=batch_first, dtype=dtype).eval()
    ours.load_state_dict(reference.state_dict())
    query = torch.randn(4, 256, embed, dtype=dtype)
    memory = torch.randn(4, 192, embed, dtype=dtype) if attention == "encoder_decoder" else query
    if not batch_first:
        query, memory = query.transpose(0, 1), memory.transpose(0, 1)
    with torch.inference_mode():
        words = ours(query, memory, memory)
        expected = reference(query, memory, memory)
    plain = ours(query.clone().requires_grad_(True), memory, memory)
    for got, want, via_plain_copy in zip(words, expected, plain):
        torch.testing.assert_close(got, via_plain_copy.detach(), rtol=0, atol=0)
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("average", [True, False])
def test_blocked_unbatched_splits_rows_across_threads(average):
    """One (unbatched) entry: its blocks of query rows are spread over the threads in the forward,
    its heads in the backward, and 2201 rows leave a short last block. Equal to PyTorch in
    float64."""
    reference, ours = modules()
    reference.train()
    ours.train()
    query = torch.randn(2 * TARGET_LEN + 1, EMBED_DIM, dtype=F64)
    memory = torch.randn(SOURCE_LEN, EMBED_DIM, dtype=F64)
    padding = torch.rand(SOURCE_LEN, generator=torch.Generator().manual_seed(2)) < 0.3
    results = {}
    for name, module in (("torch", reference), ("ours", ours)):
        q = query.clone().requires_grad_(True)
        m = memory.clone().requires_grad_(True)
        output, weights = module(q, m, m, key_padding_mask=padding, average_attn_weights=average)
        if module is ours:
            blocked = weights.grad_fn.next_functions[0][0]  # under the unbatched squeeze
            assert "BlockedAttention" in blocked.name(), "the blocked path was not taken"
        (output.sum() + weights.pow(2).sum() * 1e3).backward()
        results[name] = (output, weights, q.grad, m.grad, module.in_proj_weight.grad)
    for got, want in zip(results["ours"], results["torch"]):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


def head_major_copies(module, *inputs):
    """Runs the module under the profiler and returns the 5-D copies made: the one head-major copy
    of the packed (N, L, n, H, D) projection is the only one."""
    with torch.profiler.profile(record_shapes=True) as profile:
        module(*inputs)
    return [
        event.input_shapes[0]
        for event in profile.events()
        if event.name == "aten::contiguous" and len(event.input_shapes[0]) == 5
    ]


@pytest.mark.parametrize(
    "layout, head_major",
    [
        # Keys 256 B apart in the packed projection (1024 rows: 256 KiB): read in place.
        ("batch_first", False),
        # Sequence-first with 128 entries: keys 16 KiB apart (16 MiB): copied head-major first.
        ("sequence_first", True),
    ],
)
def test_blocked_reads_close_keys_in_place_and_copies_far_ones(layout, head_major):
    """The CPU's blocks read q, k and v as views of the packed projection where a head's keys lie
    within 8 MiB, and take one head-major copy beyond; both equal PyTorch in float64, forward and
    backward."""
    batch_first = layout == "batch_first"
    torch.manual_seed(0)
    reference = nn.MultiheadAttention(EMBED_DIM, NUM_HEADS, batch_first=batch_first, dtype=F64)
    ours = torchmha.MultiHeadAttention(EMBED_DIM, NUM_HEADS, batch_first=batch_first, dtype=F64)
    ours.load_state_dict(reference.state_dict())
    batch, target_len = (BATCH, TARGET_LEN) if batch_first else (128, 16)
    query = torch.randn(batch, target_len, EMBED_DIM, dtype=F64)
    memory = torch.randn(batch, SOURCE_LEN, EMBED_DIM, dtype=F64)
    if not batch_first:
        query, memory = query.transpose(0, 1), memory.transpose(0, 1)
    with torch.inference_mode():
        copies = head_major_copies(ours.eval(), query, memory, memory)
        expected = reference.eval()(query, memory, memory)
        actual = ours(query, memory, memory)
    assert len(copies) == (1 if head_major else 0), copies
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12)

    results = {}
    for name, module in (("torch", reference.train()), ("ours", ours.train())):
        q = query.clone().requires_grad_(True)
        m = memory.clone().requires_grad_(True)
        output, weights = module(q, m, m)
        if module is ours:
            assert "BlockedAttention" in weights.grad_fn.name(), "the blocked path was not taken"
        (output.sum() + weights.pow(2).sum() * 1e3).backward()
        results[name] = (q.grad, m.grad, module.in_proj_weight.grad)
    for got, want in zip(results["ours"], results["torch"]):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)
