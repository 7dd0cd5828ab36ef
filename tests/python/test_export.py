"""torch.export: models using torchmha export, and the exported programs match eager."""

import torch
from interchange_models import (
    EMBED_DIM,
    AttentionBlock,
    DecoderBlock,
    TextbookBlock,
    example_inputs,
    positions_of_length,
    randomize,
)
from torch.export import Dim


def test_exported_block_matches_eager_at_other_lengths() -> None:
    """Exported with a dynamic sequence length, the program runs at lengths it never saw."""
    model = randomize(AttentionBlock())
    inputs = example_inputs()
    length = Dim("length", min=2, max=64)
    program = torch.export.export(
        model,
        (inputs["x"], inputs["key_padding_mask"]),
        dynamic_shapes=({1: length}, {1: length}),
    )
    for sequence in (3, 7, 20):
        x = torch.randn(2, sequence, EMBED_DIM)
        padding = torch.zeros(2, sequence, dtype=torch.bool)
        padding[0, -1] = True
        torch.testing.assert_close(program.module()(x, padding), model(x, padding))


def test_exported_grouped_rotary_block_matches_eager_at_other_lengths() -> None:
    """Grouped-query attention with rotary embeddings and positions, exported with a dynamic
    length; the decomposed program (standard ATen) gives the same numbers."""
    model = randomize(DecoderBlock())
    inputs = example_inputs()
    length = Dim("length", min=2, max=64)
    program = torch.export.export(
        model, (inputs["x"], inputs["positions"]), dynamic_shapes=({1: length}, {1: length})
    )
    decomposed = program.run_decompositions()
    for sequence in (3, 7, 20):
        x = torch.randn(2, sequence, EMBED_DIM)
        positions = positions_of_length(sequence)
        expected = model(x, positions)
        torch.testing.assert_close(program.module()(x, positions), expected)
        torch.testing.assert_close(decomposed.module()(x, positions), expected)


def test_exported_textbook_block_matches_eager() -> None:
    """The chapter's adapter exports too."""
    model = randomize(TextbookBlock())
    inputs = example_inputs()
    program = torch.export.export(model, (inputs["x"], inputs["mask"]))
    torch.testing.assert_close(
        program.module()(inputs["x"], inputs["mask"]), model(inputs["x"], inputs["mask"])
    )


def test_decomposed_program_is_standard_aten_and_matches_eager() -> None:
    """export keeps the op as one node; run_decompositions() leaves standard ATen ops only."""
    model = randomize(AttentionBlock())
    inputs = example_inputs()
    args = (inputs["x"], inputs["key_padding_mask"])
    program = torch.export.export(model, args)
    targets = [str(node.target) for node in program.graph.nodes if node.op == "call_function"]
    assert "torchmha.multi_head_attention.default" in targets
    decomposed = program.run_decompositions()
    targets = [str(node.target) for node in decomposed.graph.nodes if node.op == "call_function"]
    assert not [target for target in targets if target.startswith("torchmha.")], targets
    torch.testing.assert_close(decomposed.module()(*args), model(*args))
