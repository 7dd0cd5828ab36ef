"""Weights across C++ and Python: files written by one side load exactly on the other."""

from pathlib import Path
from typing import Any, Dict

import pytest
import torch
from conftest import randomize_parameters
from torch import nn

import torchmha

CONFIGS: Dict[str, Dict[str, Any]] = {
    "default": {},
    "no_bias": {"bias": False},
    "bias_kv": {"add_bias_kv": True},
    "kdim_vdim": {"kdim": 5, "vdim": 6},
}


def assert_same_parameters(actual: nn.Module, expected: nn.Module) -> None:
    """Same names and bitwise-equal values."""
    actual_state, expected_state = actual.state_dict(), expected.state_dict()
    assert actual_state.keys() == expected_state.keys()
    for name, value in expected_state.items():
        assert torch.equal(actual_state[name], value), name


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_cpp_saved_weights_load_into_both_python_modules(tmp_path: Path, config: dict) -> None:
    """torchmha::save_state_dict's file is read by plain torch.load (weights_only)."""
    cpp_module = torchmha.cpp.MultiHeadAttention(8, 2, **config)
    randomize_parameters(cpp_module)
    path = tmp_path / "from_cpp.pt"
    torchmha._C.save_state_dict(cpp_module.cpp_module, str(path))
    state_dict = torch.load(path, weights_only=True)
    for module in (
        torchmha.MultiHeadAttention(8, 2, **config),
        nn.MultiheadAttention(8, 2, **config),
    ):
        module.load_state_dict(state_dict, strict=True)
        assert_same_parameters(module, cpp_module)


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_pytorch_weights_load_into_the_cpp_module(tmp_path: Path, config: dict) -> None:
    """torchmha.save_state_dict's file is read by torchmha::load_state_dict; same outputs."""
    reference = nn.MultiheadAttention(8, 2, **config).eval()
    randomize_parameters(reference)
    path = tmp_path / "from_python.pt"
    torchmha.save_state_dict(reference, path)
    cpp_module = torchmha.cpp.MultiHeadAttention(8, 2, **config).eval()
    torchmha._C.load_state_dict(cpp_module.cpp_module, str(path))
    assert_same_parameters(cpp_module, reference)
    query = torch.randn(4, 3, 8)
    key = torch.randn(5, 3, config.get("kdim", 8))
    value = torch.randn(5, 3, config.get("vdim", 8))
    torch.testing.assert_close(cpp_module(query, key, value)[0], reference(query, key, value)[0])


def test_round_trip_through_cpp_and_python_is_exact(tmp_path: Path) -> None:
    """Python -> C++ -> Python leaves every parameter bitwise equal."""
    original = torchmha.MultiHeadAttention(8, 2, add_bias_kv=True)
    randomize_parameters(original)
    torchmha.save_state_dict(original, tmp_path / "a.pt")
    cpp_module = torchmha.cpp.MultiHeadAttention(8, 2, add_bias_kv=True)
    torchmha._C.load_state_dict(cpp_module.cpp_module, str(tmp_path / "a.pt"))
    torchmha._C.save_state_dict(cpp_module.cpp_module, str(tmp_path / "b.pt"))
    restored = torchmha.MultiHeadAttention(8, 2, add_bias_kv=True)
    restored.load_state_dict(torch.load(tmp_path / "b.pt"))
    assert_same_parameters(restored, original)


def test_ordered_dict_file_gets_a_clear_error_in_cpp(tmp_path: Path) -> None:
    """torch.save(module.state_dict()) keeps an OrderedDict, which LibTorch cannot read."""
    path = tmp_path / "ordered.pt"
    torch.save(nn.MultiheadAttention(8, 2).state_dict(), path)
    cpp_module = torchmha.cpp.MultiHeadAttention(8, 2)
    before = {name: value.clone() for name, value in cpp_module.state_dict().items()}
    with pytest.raises(RuntimeError, match="torchmha.save_state_dict"):
        torchmha._C.load_state_dict(cpp_module.cpp_module, str(path))
    for name, value in cpp_module.state_dict().items():
        assert torch.equal(value, before[name]), name
