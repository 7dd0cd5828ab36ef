"""torch.export: models using torchmha export, and the exported programs match eager."""

import copy

import torch
from conftest import TOLERANCES
from interchange_models import (
    EMBED_DIM,
    MAX_SEQ_LEN,
    AttentionBlock,
    DecoderBlock,
    GreedyDecoder,
    TextbookBlock,
    example_inputs,
    greedy_generation,
    padded_prompts,
    positions_of_length,
    randomize,
)
from torch import nn
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


CACHE_BUFFERS = ["cache.key", "cache.seq_lens", "cache.value"]


def empty_cache(module: nn.Module) -> None:
    """Zeroes the cache's buffers (lengths, keys, values) of an exported program's module."""
    buffers = dict(module.named_buffers())
    for name in CACHE_BUFFERS:
        buffers[name].zero_()


def test_exported_decoder_owning_its_cache_generates_what_eager_generates() -> None:
    """torch.export of a decoder that owns its key/value cache (buffers), one program for the
    ragged prefill and the single-token steps (a dynamic length from 1): the greedy generations of
    exported.module() and of the decomposed program's module equal eager's at every step, so the
    cache's writes persist from call to call. The decomposed program lists the cache's buffers as
    mutated (what AOTInductor compiles from)."""
    eager = randomize(GreedyDecoder()).double()
    exported_model = copy.deepcopy(eager)
    tokens, padding = padded_prompts()
    expected = greedy_generation(eager, tokens, padding)
    length = Dim("length", min=1, max=MAX_SEQ_LEN)
    with torch.no_grad():
        program = torch.export.export(
            exported_model, (tokens, padding), dynamic_shapes=({1: length}, {1: length})
        )
    decomposed = program.run_decompositions()
    assert sorted(decomposed.graph_signature.buffers_to_mutate.values()) == CACHE_BUFFERS
    for route, module in (("exported", program.module()), ("decomposed", decomposed.module())):
        # The programs share the exported module's buffers: each route starts from empty.
        empty_cache(module)
        actual = greedy_generation(module, tokens, padding)
        assert torch.equal(actual[0], expected[0]), route
        torch.testing.assert_close(actual[1], expected[1], **TOLERANCES[torch.float64], msg=route)
        assert torch.equal(dict(module.named_buffers())["cache.seq_lens"], eager.cache.seq_lens)
