"""Bad state dicts and bad files: a clear error, and the module keeps every weight it had.

``module.load_state_dict`` of each torchmha module is all-or-nothing (``nn.Module``'s copies
the keys that fit before raising). ``torchmha._C.load_state_dict`` (the C++
``torchmha::load_state_dict``) also refuses truncated and corrupted files, checking the CRC-32
that ``torch.save`` writes and ``torch.load`` ignores.
"""

import zipfile
from pathlib import Path
from typing import Callable, Dict

import pytest
import torch
from torch import Tensor, nn

import torchmha

MODULES: Dict[str, Callable[..., nn.Module]] = {
    "python": torchmha.MultiHeadAttention,
    "cpp": torchmha.cpp.MultiHeadAttention,
}


def values(module: nn.Module) -> Dict[str, Tensor]:
    return {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}


def assert_values(module: nn.Module, expected: Dict[str, Tensor]) -> None:
    actual = module.state_dict()
    assert actual.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(actual[name], tensor), name


def random_state(**kwargs) -> Dict[str, Tensor]:
    """A state dict of ``torch.nn.MultiheadAttention(8, 2, **kwargs)`` with random values."""
    return {
        name: torch.randn_like(t)
        for name, t in nn.MultiheadAttention(8, 2, **kwargs).state_dict().items()
    }


def missing_key() -> Dict[str, Tensor]:
    state = random_state()
    del state["in_proj_bias"]
    return state


def wrong_shape() -> Dict[str, Tensor]:
    return dict(random_state(), **{"out_proj.weight": torch.randn(8, 9)})


BAD_STATES = {
    "missing": (missing_key, r'Missing key\(s\).*"in_proj_bias"'),
    "extra": (lambda: random_state(add_bias_kv=True), r'Unexpected key\(s\).*"bias_k"'),
    "wrong_shape": (
        wrong_shape,
        r"size mismatch for out_proj.weight.*\[8, 9\].*\[8, 8\]",
    ),
}


@pytest.mark.parametrize("bad", sorted(BAD_STATES))
@pytest.mark.parametrize("kind", sorted(MODULES))
def test_bad_state_dict_names_the_key_and_changes_nothing(kind: str, bad: str) -> None:
    """Every other key is valid and would load: none of them may be left half loaded."""
    module = MODULES[kind](8, 2)
    before = values(module)
    make_state, pattern = BAD_STATES[bad]
    with pytest.raises(RuntimeError, match=pattern):
        module.load_state_dict(make_state())
    assert_values(module, before)


def test_textbook_module_loads_all_or_nothing() -> None:
    module = torchmha.TextbookMultiHeadAttention(2, 8)
    before = values(module)
    state = {name: torch.randn_like(t) for name, t in module.state_dict().items()}
    state["output_linear.weight"] = torch.randn(8, 9)
    with pytest.raises(RuntimeError, match="size mismatch for output_linear.weight"):
        module.load_state_dict(state)
    assert_values(module, before)


def test_non_strict_loading_still_raises_on_shape_and_changes_nothing() -> None:
    module = torchmha.MultiHeadAttention(8, 2)
    before = values(module)
    with pytest.raises(RuntimeError, match="size mismatch"):
        module.load_state_dict(wrong_shape(), strict=False)
    assert_values(module, before)


def test_valid_state_dict_still_loads_every_key() -> None:
    """The control: all-or-nothing loading loads a good state dict completely."""
    module = torchmha.MultiHeadAttention(8, 2)
    state = random_state()
    module.load_state_dict(state)
    assert_values(module, state)


@pytest.fixture
def saved(tmp_path: Path) -> Dict[str, object]:
    """A file saved by ``torchmha.save_state_dict`` and the values it holds."""
    source = torchmha.MultiHeadAttention(8, 2)
    with torch.no_grad():
        for parameter in source.parameters():
            parameter.normal_()
    path = tmp_path / "saved.pt"
    torchmha.save_state_dict(source, path)
    return {"path": path, "bytes": path.read_bytes(), "values": values(source)}


def load_cpp(path: Path) -> nn.Module:
    module = torchmha.cpp.MultiHeadAttention(8, 2)
    torchmha._C.load_state_dict(module.cpp_module, str(path))
    return module


def test_intact_file_loads_in_cpp(saved: Dict[str, object]) -> None:
    assert_values(load_cpp(saved["path"]), saved["values"])


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.5, 0.9, 0.999])
def test_truncated_file_is_an_error(
    saved: Dict[str, object], tmp_path: Path, fraction: float
) -> None:
    """Both readers refuse a truncated file; the C++ module keeps its weights."""
    data = saved["bytes"]
    path = tmp_path / "truncated.pt"
    path.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises((RuntimeError, EOFError)):  # EOFError: torch.load of an empty file
        torch.load(path)
    module = torchmha.cpp.MultiHeadAttention(8, 2)
    before = values(module)
    with pytest.raises(RuntimeError, match="not an intact torch.save.. zip archive"):
        torchmha._C.load_state_dict(module.cpp_module, str(path))
    assert_values(module, before)


def test_corrupted_tensor_data_is_an_error_in_cpp(saved: Dict[str, object], tmp_path: Path) -> None:
    """A flipped bit in a tensor: torch.load returns a wrong weight, torchmha's loader refuses."""
    path = tmp_path / "corrupted.pt"
    data = bytearray(saved["bytes"])
    with zipfile.ZipFile(saved["path"]) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith("data/0"))
    # The data starts after the 30-byte local header, the name and the extra field.
    name_length = int.from_bytes(data[info.header_offset + 26 : info.header_offset + 28], "little")
    extra_length = int.from_bytes(data[info.header_offset + 28 : info.header_offset + 30], "little")
    data[info.header_offset + 30 + name_length + extra_length + 3] ^= 0x10
    path.write_bytes(bytes(data))
    loaded = torch.load(path)
    assert not all(torch.equal(loaded[k], v) for k, v in saved["values"].items())
    with pytest.raises(RuntimeError, match="data/0 fails its CRC-32 check"):
        load_cpp(path)


def test_file_without_checksums_still_loads_in_cpp(tmp_path: Path) -> None:
    """``torch.serialization.set_crc32_options(False)`` files have no CRC to check."""
    source = torchmha.MultiHeadAttention(8, 2)
    path = tmp_path / "no_crc.pt"
    torch.serialization.set_crc32_options(False)
    try:
        torchmha.save_state_dict(source, path)
    finally:
        torch.serialization.set_crc32_options(True)
    assert_values(load_cpp(path), values(source))


@pytest.mark.parametrize(
    "content, pattern",
    [
        ([torch.zeros(1)], "does not hold a dict"),
        ({"in_proj_weight": 3}, "not name -> tensor"),
    ],
)
def test_file_of_something_else_is_an_error_in_cpp(
    tmp_path: Path, content: object, pattern: str
) -> None:
    path = tmp_path / "other.pt"
    torch.save(content, path)
    module = torchmha.cpp.MultiHeadAttention(8, 2)
    before = values(module)
    with pytest.raises(RuntimeError, match=pattern):
        torchmha._C.load_state_dict(module.cpp_module, str(path))
    assert_values(module, before)
