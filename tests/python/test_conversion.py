"""Checkpoints with separate q_proj/k_proj/v_proj/o_proj layers, into torchmha modules and back.

The reference for what the loaded module must compute is the checkpoint's own ``nn.Linear``
layers (PyTorch's) feeding ``F.scaled_dot_product_attention(..., enable_gqa=True)``; the
Hugging Face ``LlamaAttention`` comparison lives in test_llama_reference.py.
"""

from typing import Callable, Dict

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import torchmha
from torchmha import load_separate_projections, separate_projections_state_dict

EMBED_DIM, NUM_HEADS, HEAD_DIM = 16, 4, 4
FLOAT64 = {"dtype": torch.float64}

MODULES: Dict[str, Callable[..., nn.Module]] = {
    "python": torchmha.MultiHeadAttention,
    "cpp": torchmha.cpp.MultiHeadAttention,
}

# (keyword arguments of the module) for the round trips; kdim/vdim give q/k/v_proj_weight.
OPTIONS = {
    "mha": {},
    "gqa": {"num_kv_heads": 2},
    "mqa": {"num_kv_heads": 1},
    "gqa-no-bias": {"num_kv_heads": 2, "bias": False},
    "gqa-kdim-vdim": {"num_kv_heads": 2, "kdim": 6, "vdim": 10},
    "gqa-bias-kv": {"num_kv_heads": 2, "add_bias_kv": True},
    "gqa-rotary": {"num_kv_heads": 2, "rope_theta": 10000.0},
}


def build(kind: str, **options) -> nn.Module:
    """A module with random values in every tensor (biases are zero after construction)."""
    module = MODULES[kind](EMBED_DIM, NUM_HEADS, **options).to(torch.float64)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn_like(parameter))
    return module


def snapshot(module: nn.Module) -> Dict[str, Tensor]:
    return {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}


def assert_state_equal(module: nn.Module, expected: Dict[str, Tensor]) -> None:
    actual = module.state_dict()
    assert actual.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(actual[name], tensor), name


def linear_checkpoint(
    num_kv_heads: int,
    q_bias: bool = False,
    k_bias: bool = False,
    v_bias: bool = False,
    o_bias: bool = False,
    prefix: str = "",
) -> Dict[str, Tensor]:
    """The state dict of four ``nn.Linear`` layers, as a Llama-style attention block has them."""
    kv_dim = num_kv_heads * HEAD_DIM
    layers = {
        "q_proj": nn.Linear(EMBED_DIM, EMBED_DIM, bias=q_bias, **FLOAT64),
        "k_proj": nn.Linear(EMBED_DIM, kv_dim, bias=k_bias, **FLOAT64),
        "v_proj": nn.Linear(EMBED_DIM, kv_dim, bias=v_bias, **FLOAT64),
        "o_proj": nn.Linear(EMBED_DIM, EMBED_DIM, bias=o_bias, **FLOAT64),
    }
    return {
        f"{prefix}{name}.{key}": tensor
        for name, layer in layers.items()
        for key, tensor in layer.state_dict().items()
    }


def reference_attention(checkpoint: Dict[str, Tensor], x: Tensor, num_kv_heads: int) -> Tensor:
    """``x`` (N, L, E) through the checkpoint's linear layers and SDPA with grouped heads."""

    def linear(name: str, inputs: Tensor) -> Tensor:
        return F.linear(inputs, checkpoint[f"{name}.weight"], checkpoint.get(f"{name}.bias"))

    def heads(projected: Tensor, count: int) -> Tensor:
        return projected.unflatten(-1, (count, HEAD_DIM)).transpose(1, 2)

    attended = F.scaled_dot_product_attention(
        heads(linear("q_proj", x), NUM_HEADS),
        heads(linear("k_proj", x), num_kv_heads),
        heads(linear("v_proj", x), num_kv_heads),
        enable_gqa=True,
    )
    return linear("o_proj", attended.transpose(1, 2).flatten(-2))


def outputs(module: nn.Module, x: Tensor) -> Tensor:
    """Self-attention on ``x`` (N, L, E); the module is built sequence-first."""
    sequence_first = x.transpose(0, 1)
    output, _ = module(sequence_first, sequence_first, sequence_first, need_weights=False)
    return output.transpose(0, 1)


@pytest.mark.parametrize("kind", MODULES)
@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
def test_round_trip_from_the_module(kind: str, options: dict) -> None:
    source = build(kind, **options)
    converted = separate_projections_state_dict(source, prefix="model.layers.3.self_attn.")
    target = build(kind, **options)
    load_separate_projections(target, converted, prefix="model.layers.3.self_attn.")
    assert_state_equal(target, snapshot(source))


@pytest.mark.parametrize("kind", MODULES)
@pytest.mark.parametrize("num_kv_heads", [4, 2, 1])
@pytest.mark.parametrize("biases", ["none", "qwen2", "all", "no-k"])
def test_round_trip_from_the_checkpoint(kind: str, num_kv_heads: int, biases: str) -> None:
    flags = {
        "none": (False, False, False, False),
        "qwen2": (True, True, True, False),
        "all": (True, True, True, True),
        "no-k": (True, False, True, True),
    }[biases]
    checkpoint = linear_checkpoint(num_kv_heads, *flags)
    module = build(kind, num_kv_heads=num_kv_heads)
    load_separate_projections(module, checkpoint)
    back = separate_projections_state_dict(module)
    # Every bias the checkpoint lacked comes back as zeros; every other tensor unchanged.
    expected = {
        f"{name}.{kind_}": checkpoint.get(
            f"{name}.{kind_}", torch.zeros(back[f"{name}.{kind_}"].shape, **FLOAT64)
        )
        for name in ("q_proj", "k_proj", "v_proj", "o_proj")
        for kind_ in ("weight", "bias")
    }
    assert back.keys() == expected.keys()
    for key, tensor in expected.items():
        assert torch.equal(back[key], tensor), key


@pytest.mark.parametrize("kind", MODULES)
@pytest.mark.parametrize("num_kv_heads", [4, 2, 1])
@pytest.mark.parametrize("with_biases", [False, True], ids=["llama", "qwen2"])
def test_loaded_module_computes_what_the_linear_layers_do(
    kind: str, num_kv_heads: int, with_biases: bool
) -> None:
    checkpoint = linear_checkpoint(num_kv_heads, *([with_biases] * 3), False)
    module = build(kind, num_kv_heads=num_kv_heads, bias=with_biases)
    load_separate_projections(module, checkpoint)
    x = torch.randn(2, 5, EMBED_DIM, **FLOAT64)
    torch.testing.assert_close(
        outputs(module, x), reference_attention(checkpoint, x, num_kv_heads), rtol=0, atol=1e-12
    )


@pytest.mark.parametrize("kind", MODULES)
def test_separate_weights_round_trip_at_pytorch_defaults(kind: str) -> None:
    """kdim/vdim modules hold q/k/v_proj_weight; the conversion fills them, not in_proj_weight."""
    source = build(kind, kdim=6, vdim=10)
    converted = separate_projections_state_dict(source)
    assert converted["k_proj.weight"].shape == (EMBED_DIM, 6)
    assert converted["v_proj.weight"].shape == (EMBED_DIM, 10)
    target = build(kind, kdim=6, vdim=10)
    load_separate_projections(target, converted)
    assert_state_equal(target, snapshot(source))


def test_the_way_back_shares_no_memory() -> None:
    """safetensors refuses tensors that share storage; in_proj_weight's three slices would."""
    module = build("python", num_kv_heads=2)
    converted = separate_projections_state_dict(module)
    pointers = {tensor.untyped_storage().data_ptr() for tensor in converted.values()}
    pointers |= {tensor.untyped_storage().data_ptr() for tensor in module.state_dict().values()}
    assert len(pointers) == len(converted) + len(module.state_dict())
    assert all(not tensor.requires_grad for tensor in converted.values())


def test_keys_outside_the_prefix_are_ignored() -> None:
    checkpoint = linear_checkpoint(2, prefix="model.layers.0.self_attn.")
    checkpoint.update(linear_checkpoint(2, prefix="model.layers.1.self_attn."))
    checkpoint["model.embed_tokens.weight"] = torch.randn(7, EMBED_DIM, **FLOAT64)
    module = build("python", num_kv_heads=2, bias=False)
    load_separate_projections(module, checkpoint, prefix="model.layers.1.self_attn.")
    back = separate_projections_state_dict(module, prefix="model.layers.1.self_attn.")
    for key, tensor in back.items():
        assert torch.equal(tensor, checkpoint[key]), key


# --- errors: a message that names the key (and shapes), and the module keeps every value ---


def refused(
    kind: str,
    options: dict,
    checkpoint: Dict[str, object],
    match: str,
    error: type = RuntimeError,
    prefix: str = "",
) -> None:
    module = build(kind, **options)
    before = snapshot(module)
    with pytest.raises(error, match=match):
        load_separate_projections(module, checkpoint, prefix=prefix)
    assert_state_equal(module, before)


@pytest.mark.parametrize("kind", MODULES)
@pytest.mark.parametrize("name", ["q_proj", "k_proj", "v_proj", "o_proj"])
def test_missing_weight_is_named(kind: str, name: str) -> None:
    checkpoint = linear_checkpoint(2, prefix="attn.")
    del checkpoint[f"attn.{name}.weight"]
    refused(kind, {"num_kv_heads": 2}, checkpoint, rf"no `attn\.{name}\.weight`", prefix="attn.")


@pytest.mark.parametrize("kind", MODULES)
@pytest.mark.parametrize("name", ["k_proj", "v_proj"])
def test_key_value_heads_that_do_not_fit_num_kv_heads(kind: str, name: str) -> None:
    """A checkpoint with 4 key/value heads into a module with 2: names key, expected, given."""
    checkpoint = linear_checkpoint(4)
    partner = {"k_proj": "v_proj", "v_proj": "k_proj"}[name]
    checkpoint[f"{partner}.weight"] = torch.randn(2 * HEAD_DIM, EMBED_DIM, **FLOAT64)
    refused(
        kind,
        {"num_kv_heads": 2},
        checkpoint,
        rf"`{name}\.weight` has shape \[16, 16\], but the module expects \[8, 16\] "
        r"\(num_kv_heads=2 \* head_dim=4 = 8 rows, 16 input features\)",
    )


@pytest.mark.parametrize("kind", MODULES)
@pytest.mark.parametrize(
    "key, shape, match",
    [
        (
            "q_proj.weight",
            (16, 8),
            r"`q_proj\.weight` has shape \[16, 8\], but the module expects \[16, 16\]",
        ),
        (
            "o_proj.weight",
            (8, 16),
            r"`o_proj\.weight` has shape \[8, 16\], but the module expects \[16, 16\]",
        ),
        ("k_proj.bias", (16,), r"`k_proj\.bias` has shape \[16\], .* expects \[8\]"),
        ("o_proj.bias", (8,), r"`o_proj\.bias` has shape \[8\], .* expects \[16\]"),
    ],
)
def test_misshapen_tensor_is_named(kind: str, key: str, shape: tuple, match: str) -> None:
    checkpoint = dict(
        linear_checkpoint(2, True, True, True, True), **{key: torch.randn(shape, **FLOAT64)}
    )
    refused(kind, {"num_kv_heads": 2}, checkpoint, match)


@pytest.mark.parametrize("kind", MODULES)
def test_biases_into_a_module_without_biases(kind: str) -> None:
    refused(
        kind,
        {"num_kv_heads": 2, "bias": False},
        linear_checkpoint(2, True, True, True, False),
        r"`q_proj\.bias`, `k_proj\.bias`, `v_proj\.bias`, but the module was built with "
        r"bias=False",
    )


@pytest.mark.parametrize("kind", MODULES)
def test_unknown_key_under_the_prefix(kind: str) -> None:
    """Qwen3's q_norm is part of its attention block: dropping it would change the results."""
    checkpoint = linear_checkpoint(2, prefix="attn.")
    checkpoint["attn.q_norm.weight"] = torch.ones(HEAD_DIM, **FLOAT64)
    refused(
        kind,
        {"num_kv_heads": 2},
        checkpoint,
        r"unexpected key\(s\) `attn\.q_norm\.weight`",
        prefix="attn.",
    )


@pytest.mark.parametrize("kind", MODULES)
def test_add_bias_kv_needs_its_biases(kind: str) -> None:
    refused(
        kind,
        {"num_kv_heads": 2, "add_bias_kv": True},
        linear_checkpoint(2),
        r"no `bias_k`, `bias_v`",
    )


def test_value_that_is_not_a_tensor() -> None:
    checkpoint: Dict[str, object] = dict(linear_checkpoint(2))
    checkpoint["k_proj.weight"] = [[0.0]]
    refused(
        "python",
        {"num_kv_heads": 2},
        checkpoint,
        r"`k_proj\.weight` must be a tensor",
        error=TypeError,
    )


def test_module_that_is_not_torchmha() -> None:
    with pytest.raises(TypeError, match=r"`module` must be a torchmha"):
        load_separate_projections(nn.Linear(4, 4), linear_checkpoint(2))


def test_exported_from_the_package() -> None:
    assert "load_separate_projections" in torchmha.__all__
    assert "separate_projections_state_dict" in torchmha.__all__
