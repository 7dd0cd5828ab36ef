"""The bound C++ modules (``torchmha.cpp``) under Python's and PyTorch's other entry points.

``copy.deepcopy``, ``pickle``, ``torch.save(module)``, ``.to("meta")``, ``.to_empty()`` and
``load_state_dict(..., assign=True)`` behave as they do on ``torch.nn.MultiheadAttention``: each
is run on PyTorch's module and on the C++ one and the results compared.
"""

import copy
import io
import pickle
from pathlib import Path
from typing import Any, Callable, Dict, Tuple

import pytest
import torch
from conftest import assert_close, assert_parity, randomize_parameters, sequence_first
from torch import Tensor, nn

import torchmha

EMBED_DIM, NUM_HEADS, BATCH = 8, 2, 3

# Every constructor option away from its default, so a copy that lost one shows.
OPTIONS: Dict[str, Any] = {
    "dropout": 0.25,
    "bias": False,
    "add_bias_kv": True,
    "add_zero_attn": True,
    "kdim": 5,
    "vdim": 6,
    "batch_first": True,
}


def make_pair(**options: Any) -> Tuple[nn.MultiheadAttention, torchmha.cpp.MultiHeadAttention]:
    """A random float64 PyTorch module and the C++ module loaded from it."""
    reference = nn.MultiheadAttention(EMBED_DIM, NUM_HEADS, dtype=torch.float64, **options)
    randomize_parameters(reference)
    candidate = torchmha.cpp.MultiHeadAttention(EMBED_DIM, NUM_HEADS, **options)
    candidate.to(torch.float64)
    candidate.load_state_dict(reference.state_dict(), strict=True)
    return reference, candidate


def inputs(**options: Any) -> Tuple[Tensor, Tensor, Tensor]:
    batch_first = options.get("batch_first", False)
    query = sequence_first(BATCH, 4, EMBED_DIM, batch_first, torch.float64)
    key = sequence_first(BATCH, 6, options.get("kdim", EMBED_DIM), batch_first, torch.float64)
    value = sequence_first(BATCH, 6, options.get("vdim", EMBED_DIM), batch_first, torch.float64)
    return query, key, value


def parameter(module: nn.Module, name: str) -> Tensor:
    """A parameter by its state-dict name (the C++ tensors are not ``nn.Parameter``s, which
    ``get_parameter`` insists on)."""
    return dict(module.named_parameters())[name]


def pickled(module: nn.Module) -> nn.Module:
    return pickle.loads(pickle.dumps(module))


def torch_saved(module: nn.Module) -> nn.Module:
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    # A whole module is a pickled object, for PyTorch's modules too: weights_only cannot load it.
    return torch.load(buffer, weights_only=False)


COPIES: Dict[str, Callable[[nn.Module], nn.Module]] = {
    "deepcopy": copy.deepcopy,
    "pickle": pickled,
    "torch_save": torch_saved,
}


def assert_same_state(actual: nn.Module, expected: nn.Module) -> None:
    """Equal state dicts (names, values, dtypes), training flags and ``requires_grad`` flags."""
    expected_state = expected.state_dict()
    assert list(actual.state_dict().keys()) == list(expected_state.keys())
    for name, tensor in actual.state_dict().items():
        assert tensor.dtype == expected_state[name].dtype, name
        assert torch.equal(tensor, expected_state[name]), name
    assert actual.training == expected.training
    flags = {name: p.requires_grad for name, p in expected.named_parameters()}
    assert {name: p.requires_grad for name, p in actual.named_parameters()} == flags


@pytest.mark.parametrize("how", sorted(COPIES))
def test_copy_is_an_equal_independent_module(how: str) -> None:
    """A copy has the options, weights, dtype, training flag and frozen parameters of the
    original, computes PyTorch's numbers, and shares no tensor with the original."""
    reference, candidate = make_pair(**OPTIONS)
    candidate.eval()
    parameter(candidate, "bias_k").requires_grad_(False)
    copied = COPIES[how](candidate)

    assert type(copied) is torchmha.cpp.MultiHeadAttention
    assert copied.cpp_module is not candidate.cpp_module
    assert repr(copied) == repr(candidate)
    assert_same_state(copied, candidate)
    assert (copied.embed_dim, copied.num_heads, copied.batch_first) == (EMBED_DIM, NUM_HEADS, True)
    # The wrapper reads the new C++ module's tensors, and they are not the original's.
    copied_tensors = dict(copied.cpp_module.named_parameters())
    for name, tensor in copied.named_parameters():
        assert (
            tensor is copied_tensors[name] or tensor.data_ptr() == copied_tensors[name].data_ptr()
        )
        assert tensor.data_ptr() != parameter(candidate, name).data_ptr(), name
    with torch.no_grad():
        parameter(copied, "out_proj.weight").add_(1.0)
    assert not torch.equal(
        parameter(candidate, "out_proj.weight"), parameter(copied, "out_proj.weight")
    )

    reference.eval()
    copied.load_state_dict(reference.state_dict())
    parameter(copied, "bias_k").requires_grad_(True)  # assert_parity compares every gradient.
    assert_parity(reference, copied, inputs(**OPTIONS))


@pytest.mark.parametrize("how", sorted(COPIES))
def test_copy_keeps_no_gradients_as_pytorch(how: str) -> None:
    """As for PyTorch's parameters, a copy starts without gradients."""
    reference, candidate = make_pair()
    for module in (reference, candidate):
        module(*inputs())[0].sum().backward()
    expected = {name: p.grad for name, p in COPIES[how](reference).named_parameters()}
    actual = {name: p.grad for name, p in COPIES[how](candidate).named_parameters()}
    assert actual == expected == {name: None for name in expected}


def test_deepcopy_of_a_model_holding_the_module() -> None:
    """``copy.deepcopy`` of a container copies the C++ module once, with the container."""
    reference, candidate = make_pair()
    model = nn.ModuleDict({"attention": candidate, "norm": nn.LayerNorm(EMBED_DIM)})
    copied = copy.deepcopy(model)
    assert copied["attention"] is not candidate
    assert_same_state(copied["attention"], candidate)
    assert_parity(reference, copied["attention"], inputs())


def test_deepcopy_leaves_the_random_stream_alone() -> None:
    """Rebuilding the C++ module draws initial weights; the caller's random stream is kept."""
    _, candidate = make_pair()
    torch.manual_seed(1)
    expected = torch.rand(4)
    torch.manual_seed(1)
    copy.deepcopy(candidate)
    assert torch.equal(torch.rand(4), expected)


def test_deepcopy_of_a_module_on_meta() -> None:
    """A module moved to the meta device copies to the meta device."""
    _, candidate = make_pair()
    copied = copy.deepcopy(candidate.to("meta"))
    assert all(tensor.is_meta for tensor in copied.parameters())
    assert all(tensor.dtype == torch.float64 for tensor in copied.parameters())


def test_torch_save_file_round_trip(tmp_path: Path) -> None:
    """``torch.save(module, path)`` and ``torch.load(path, weights_only=False)``."""
    reference, candidate = make_pair(**OPTIONS)
    torch.save(candidate, tmp_path / "module.pt")
    loaded = torch.load(tmp_path / "module.pt", weights_only=False)
    assert_same_state(loaded, candidate)
    reference.train()
    assert_parity(reference.eval(), loaded.eval(), inputs(**OPTIONS))


@pytest.mark.parametrize("how", sorted(COPIES))
def test_textbook_copy_is_an_equal_independent_module(how: str) -> None:
    """The bound textbook module copies too, with its weights and training flag."""
    candidate = torchmha.cpp.TextbookMultiHeadAttention(NUM_HEADS, EMBED_DIM, dropout=0.3)
    candidate.to(torch.float64).eval()
    randomize_parameters(candidate)
    copied = COPIES[how](candidate)
    assert type(copied) is torchmha.cpp.TextbookMultiHeadAttention
    assert repr(copied) == repr(candidate)
    assert_same_state(copied, candidate)
    query = torch.randn(BATCH, 4, EMBED_DIM, dtype=torch.float64)
    mask = torch.ones(BATCH, 1, 4, 4, dtype=torch.int64).tril()
    assert_close(copied(query, query, query, mask=mask), candidate(query, query, query, mask=mask))
    assert parameter(copied, "output_linear.weight").data_ptr() != (
        parameter(candidate, "output_linear.weight").data_ptr()
    )


def test_to_meta_then_forward_gives_pytorchs_shapes() -> None:
    """``.to("meta")`` moves the C++ tensors themselves; forward on meta inputs then gives the
    shapes PyTorch's module gives."""
    reference, candidate = make_pair(**OPTIONS)
    for module in (reference, candidate):
        assert module.to("meta") is module
    assert all(tensor.is_meta for tensor in candidate.parameters())
    assert all(tensor.is_meta for tensor in candidate.cpp_module.parameters())
    meta_inputs = [tensor.to("meta") for tensor in inputs(**OPTIONS)]
    expected = reference(*meta_inputs, average_attn_weights=False)
    actual = candidate(*meta_inputs, average_attn_weights=False)
    for actual_tensor, expected_tensor in zip(actual, expected):
        assert actual_tensor.is_meta
        assert actual_tensor.shape == expected_tensor.shape
        assert actual_tensor.dtype == expected_tensor.dtype


@pytest.mark.parametrize("assign", [False, True])
def test_meta_to_empty_then_load_matches_pytorch(assign: bool) -> None:
    """Deferred initialisation: to meta, ``to_empty(device="cpu")`` (or ``assign=True``
    straight from meta), then a state dict; the module then computes PyTorch's numbers."""
    reference, candidate = make_pair(**OPTIONS)
    candidate.to("meta")
    if not assign:
        assert candidate.to_empty(device="cpu") is candidate
        assert all(tensor.device.type == "cpu" for tensor in candidate.parameters())
    candidate.load_state_dict(reference.state_dict(), assign=assign)
    assert all(tensor.device.type == "cpu" for tensor in candidate.cpp_module.parameters())
    assert_parity(reference.eval(), candidate.eval(), inputs(**OPTIONS))


def test_to_empty_keeps_shapes_dtypes_and_flags() -> None:
    """``to_empty`` from the CPU, as on PyTorch's module: new storage, same metadata."""
    reference, candidate = make_pair()
    parameter(candidate, "in_proj_bias").requires_grad_(False)
    before = {name: p.data_ptr() for name, p in candidate.named_parameters()}
    candidate.to_empty(device="cpu")
    for name, tensor in candidate.named_parameters():
        assert tensor.shape == parameter(reference, name).shape, name
        assert tensor.dtype == torch.float64 and tensor.data_ptr() != before[name], name
    assert not parameter(candidate, "in_proj_bias").requires_grad


def test_to_meta_moves_gradients_too() -> None:
    """Gradients follow their parameters to the meta device, as ``nn.Module._apply`` moves them."""
    reference, candidate = make_pair()
    for module in (reference, candidate):
        module(*inputs())[0].sum().backward()
        module.to("meta")
    for name, tensor in candidate.named_parameters():
        assert tensor.grad is not None and tensor.grad.is_meta, name
        assert tensor.grad.shape == parameter(reference, name).grad.shape, name


def test_load_state_dict_assign_takes_the_tensors() -> None:
    """``assign=True`` gives each C++ parameter the state dict's tensor: its storage and dtype,
    while ``requires_grad`` stays the module's, as in PyTorch."""
    reference = nn.MultiheadAttention(EMBED_DIM, NUM_HEADS, dtype=torch.float64)
    randomize_parameters(reference)
    candidate = torchmha.cpp.MultiHeadAttention(EMBED_DIM, NUM_HEADS)  # float32
    parameter(candidate, "in_proj_bias").requires_grad_(False)
    state = reference.state_dict()
    result = candidate.load_state_dict(state, assign=True)
    assert result.missing_keys == [] and result.unexpected_keys == []
    for name, tensor in candidate.cpp_module.named_parameters().items():
        assert tensor.dtype == torch.float64, name
        assert tensor.data_ptr() == state[name].data_ptr(), name
        assert tensor.requires_grad == (name != "in_proj_bias"), name
    parameter(candidate, "in_proj_bias").requires_grad_(True)  # Every gradient compared.
    assert_parity(reference, candidate, inputs())


def test_load_state_dict_assign_reports_missing_and_misshapen_keys() -> None:
    """``assign=True`` still reports a missing or misshapen key as PyTorch's module does."""
    state = nn.MultiheadAttention(EMBED_DIM, NUM_HEADS).state_dict()
    del state["in_proj_bias"]
    candidate = torchmha.cpp.MultiHeadAttention(EMBED_DIM, NUM_HEADS)
    with pytest.raises(RuntimeError, match='Missing key.*"in_proj_bias"'):
        candidate.load_state_dict(state, assign=True)
    state["in_proj_bias"] = torch.zeros(5)
    with pytest.raises(RuntimeError, match=r"size mismatch for in_proj_bias.*\[5\]"):
        candidate.load_state_dict(state, assign=True)


def test_assigning_none_to_a_parameter_is_refused() -> None:
    """The C++ module cannot drop a parameter: assigning ``None`` says so, by name."""
    candidate = torchmha.cpp.MultiHeadAttention(EMBED_DIM, NUM_HEADS)
    with pytest.raises(ValueError, match="`in_proj_bias`.*bias=False"):
        candidate.in_proj_bias = None
    assert parameter(candidate, "in_proj_bias").shape == (3 * EMBED_DIM,)


def test_assigning_a_tensor_of_another_shape_or_layout_is_refused() -> None:
    """A parameter keeps its shape, and a sparse tensor cannot become a C++ module's data."""
    candidate = torchmha.cpp.MultiHeadAttention(EMBED_DIM, NUM_HEADS)
    with pytest.raises(ValueError, match=r"`in_proj_bias` has shape \[24\].*shape \[5\]"):
        candidate.in_proj_bias = torch.zeros(5)
    with pytest.raises(ValueError, match="Sparse.*only plain strided tensors"):
        candidate.in_proj_bias = torch.zeros(3 * EMBED_DIM).to_sparse()
    with pytest.raises(TypeError, match="cannot assign int to the parameter `in_proj_bias`"):
        candidate.in_proj_bias = 3
    assert parameter(candidate, "in_proj_bias").layout == torch.strided


def unpickle_state(state: Tuple[Any, ...]) -> Any:
    """``torchmha._C.MultiHeadAttention`` rebuilt from ``state``, as pickle rebuilds it."""
    module = torchmha._C.MultiHeadAttention.__new__(torchmha._C.MultiHeadAttention)
    module.__setstate__(state)
    return module


def test_unpickling_a_damaged_state_is_refused_by_name() -> None:
    """A pickled state whose tensors do not fit its options is refused, naming the parameter."""
    bound = torchmha.cpp.MultiHeadAttention(EMBED_DIM, NUM_HEADS).cpp_module
    version, options, training, parameters = bound.__getstate__()
    assert unpickle_state((version, options, training, parameters)).embed_dim == EMBED_DIM
    misshapen = [(name, torch.zeros(2), flag) for name, _, flag in parameters]
    with pytest.raises(ValueError, match=r"parameter `in_proj_weight` has shape \[2\]"):
        unpickle_state((version, options, training, misshapen))
    renamed = [("renamed", tensor, flag) for _, tensor, flag in parameters]
    with pytest.raises(ValueError, match="parameter `renamed`"):
        unpickle_state((version, options, training, renamed))
    count = len(parameters)
    with pytest.raises(ValueError, match=f"has {count - 1} parameters, but .* options has {count}"):
        unpickle_state((version, options, training, parameters[:-1]))
    with pytest.raises(ValueError, match="expected format 1"):
        unpickle_state((version + 1, options, training, parameters))
