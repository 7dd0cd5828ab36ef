"""Run by test_blocked_gradcheck.py with TORCHMHA_SCORE_BLOCK_BYTES set: gradcheck and
gradgradcheck of the op in float64 where the blocked path is taken. Exits non-zero on failure."""

import sys

import torch

import torchmha

F64 = torch.float64
BATCH, TARGET_LEN, SOURCE_LEN, EMBED_DIM, NUM_HEADS = 2, 7, 5, 4, 2


def main(case: str) -> None:
    torch.manual_seed(0)
    # A block holds one head's scores for `rows` query rows.
    rows = max(1, 96 // (SOURCE_LEN * 8))
    print(f"blocks per batch entry: {-(-TARGET_LEN // rows)}")

    def parameter(*shape):
        return (torch.randn(shape, dtype=F64) * 0.5).requires_grad_(True)

    query = parameter(BATCH, TARGET_LEN, EMBED_DIM)
    memory = parameter(BATCH, SOURCE_LEN, EMBED_DIM)
    weights = (
        parameter(3 * EMBED_DIM, EMBED_DIM),
        parameter(3 * EMBED_DIM),
        parameter(EMBED_DIM, EMBED_DIM),
        parameter(EMBED_DIM),
    )
    masks = {}
    if case == "masks":
        padding = torch.zeros(BATCH, SOURCE_LEN, dtype=torch.bool)
        padding[1, :3] = True
        attn = torch.zeros(TARGET_LEN, SOURCE_LEN, dtype=torch.bool)
        attn[2, 3:] = True  # with the padding: row 2 of batch entry 1 sees no key
        attn[4, 1] = True
        masks = {"key_padding_mask": padding, "attn_mask": attn}
    average = case != "per_head"

    def attention(q, m, in_w, in_b, out_w, out_b):
        output, attn_weights = torchmha.multi_head_attention(
            q, m, m, NUM_HEADS, in_w, in_b, out_proj_weight=out_w, out_proj_bias=out_b,
            need_weights=True, average_attn_weights=average, batch_first=True, **masks,
        )  # fmt: skip
        return output, attn_weights

    inputs = (query, memory, *weights)
    output, attn_weights = attention(*inputs)
    assert torch.isfinite(output).all() and torch.isfinite(attn_weights).all()
    # The weights come straight from the blocked path's autograd Function.
    assert "BlockedAttention" in attn_weights.grad_fn.name(), attn_weights.grad_fn.name()
    assert torch.autograd.gradcheck(attention, inputs)
    assert torch.autograd.gradgradcheck(attention, inputs)
    print("gradcheck and gradgradcheck passed")


if __name__ == "__main__":
    main(sys.argv[1])
