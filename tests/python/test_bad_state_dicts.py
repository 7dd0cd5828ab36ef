"""Bad state dicts and bad files: a clear error, and the module keeps every weight it had.

``module.load_state_dict`` of each torchmha module is all-or-nothing (``nn.Module``'s copies
the keys that fit before raising). ``torchmha._C.load_state_dict`` (the C++
``torchmha::load_state_dict``) also refuses truncated and corrupted files, checking the CRC-32
that ``torch.save`` writes and ``torch.load`` ignores, and files crafted to make it read past
a record, with the messages that tests/cpp/test_crafted_state_dict_files.cpp checks in C++.
"""

import io
import os
import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

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


def record_data_offset(path: Path, record: str) -> int:
    """Where the (stored or compressed) data of ``record`` starts in the zip file at ``path``."""
    data = path.read_bytes()
    with zipfile.ZipFile(path) as archive:
        header = next(i for i in archive.infolist() if i.filename.endswith(record)).header_offset
    # The data starts after the 30-byte local header, the name and the extra field.
    name_length = int.from_bytes(data[header + 26 : header + 28], "little")
    extra_length = int.from_bytes(data[header + 28 : header + 30], "little")
    return header + 30 + name_length + extra_length


def test_corrupted_tensor_data_is_an_error_in_cpp(saved: Dict[str, object], tmp_path: Path) -> None:
    """A flipped bit in a tensor: torch.load returns a wrong weight, torchmha's loader refuses."""
    path = tmp_path / "corrupted.pt"
    data = bytearray(saved["bytes"])
    data[record_data_offset(saved["path"], "data/0") + 3] ^= 0x10
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
        ({"in_proj_weight": 3}, '"in_proj_weight" in .* is a int, not a tensor'),
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


def load_cpp_refused(path: Path, pattern: str) -> str:
    """``torchmha._C.load_state_dict`` raises a RuntimeError matching ``pattern`` that names
    ``path``, and the module keeps its weights; returns the message."""
    module = torchmha.cpp.MultiHeadAttention(8, 2)
    before = values(module)
    with pytest.raises(RuntimeError, match=pattern) as error:
        torchmha._C.load_state_dict(module.cpp_module, str(path))
    assert str(path) in str(error.value)
    assert_values(module, before)
    return str(error.value)


# Crafted files: a torch.save file whose pickle is rewritten (every CRC-32 right, the zip
# rewritten) so that one tensor declares another storage size or view than its record holds.


class _StorageRef:
    """A storage's persistent id: ('storage', storage type, key, location, element count)."""

    def __init__(self, pid: Tuple[Any, ...]) -> None:
        self.pid = list(pid)


class _TensorArgs:
    """The arguments of ``torch._utils._rebuild_tensor_v2``, pickled back as they were."""

    def __init__(self, storage: _StorageRef, offset: int, size: Any, stride: Any, *rest: Any):
        self.storage, self.offset, self.rest = storage, offset, rest
        self.size, self.stride = tuple(size), tuple(stride)

    def __reduce__(self) -> Tuple[Any, ...]:
        args = (self.storage, self.offset, self.size, self.stride, *self.rest)
        return (torch._utils._rebuild_tensor_v2, args)


class _PickleReader(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _TensorArgs
        return super().find_class(module, name)

    def persistent_load(self, pid: Any) -> _StorageRef:
        return _StorageRef(pid)


class _PickleWriter(pickle.Pickler):
    def persistent_id(self, obj: Any) -> Any:
        return tuple(obj.pid) if isinstance(obj, _StorageRef) else None


def rewrite_archive(
    source: Path,
    target: Path,
    edit_state: Callable[[Dict[str, _TensorArgs]], None] = lambda state: None,
    compression: int = zipfile.ZIP_STORED,
) -> None:
    """Copies ``source`` to ``target`` with ``edit_state`` applied to its pickled tensors."""
    with zipfile.ZipFile(source) as archive:
        entries = [(info.filename, archive.read(info)) for info in archive.infolist()]
    with zipfile.ZipFile(target, "w", compression) as archive:
        for name, data in entries:
            if name.endswith("/data.pkl"):
                state = _PickleReader(io.BytesIO(data)).load()
                edit_state(state)
                buffer = io.BytesIO()
                _PickleWriter(buffer, protocol=2).dump(state)
                data = buffer.getvalue()
            archive.writestr(name, data)


def _declare(numel: int, offset: int = 0, stride: Tuple[int, int] = (8, 1)) -> Callable:
    def edit(state: Dict[str, _TensorArgs]) -> None:
        tensor = state["out_proj.weight"]
        tensor.storage.pid[4], tensor.offset, tensor.stride = numel, offset, stride

    return edit


MISFITS = {
    "storage_one_element_past_record": _declare(65),
    # Python pickles these as 8-byte LONG1s, the only length LibTorch's unpickler reads.
    "storage_far_past_record": _declare(1 << 56, offset=1 << 55),
    "offset_past_storage": _declare(64, offset=57),
    "stride_past_storage": _declare(64, stride=(16, 1)),
    "negative_stride": _declare(64, offset=56, stride=(-8, 1)),
}


@pytest.mark.parametrize("misfit", sorted(MISFITS))
def test_tensor_past_its_record_is_refused_in_cpp(
    saved: Dict[str, object], tmp_path: Path, misfit: str
) -> None:
    """torch.load refuses these files too; the C++ loader used to read past the record."""
    path = tmp_path / "misfit.pt"
    rewrite_archive(saved["path"], path, MISFITS[misfit])
    with pytest.raises(RuntimeError):
        torch.load(path)
    load_cpp_refused(path, '"out_proj.weight" in .*the file is corrupted or crafted')


def test_rewritten_archive_without_edits_loads_in_cpp(saved: Dict[str, object], tmp_path: Path):
    """The control for the crafted files: rewriting alone keeps the file loadable."""
    path = tmp_path / "rewritten.pt"
    rewrite_archive(saved["path"], path)
    assert_values(load_cpp(path), saved["values"])


def test_tensors_saved_on_a_gpu_load_on_the_cpu(saved: Dict[str, object], tmp_path: Path):
    """Storages stay on the CPU until checked: LibTorch's unpickler moved each to the device it
    was saved from (reading it, whatever its record held), and failed without CUDA."""
    path = tmp_path / "from_gpu.pt"

    def saved_on_gpu(state: Dict[str, _TensorArgs]) -> None:
        for tensor in state.values():
            tensor.storage.pid[3] = "cuda:0"

    rewrite_archive(saved["path"], path, saved_on_gpu)
    assert_values(load_cpp(path), saved["values"])


def test_compressed_archive_is_refused_in_cpp(saved: Dict[str, object], tmp_path: Path) -> None:
    """LibTorch inflates without checking CRC-32: a flipped bit loaded a wrong weight."""
    path = tmp_path / "deflated.pt"
    rewrite_archive(saved["path"], path, compression=zipfile.ZIP_DEFLATED)
    loaded = torch.load(path)  # a valid archive: torch.load reads it
    assert all(torch.equal(loaded[k], v) for k, v in saved["values"].items())
    load_cpp_refused(path, r"the record .* is compressed .*torch.save\(\) never compresses")
    data = bytearray(path.read_bytes())
    data[record_data_offset(path, "data/0") + 4] ^= 0x01
    path.write_bytes(bytes(data))
    load_cpp_refused(path, "is compressed")


def _oversized_file(tmp_path: Path) -> Path:
    """One byte over torchmha::kMaxStateDictFileBytes (64 GiB)."""
    path = tmp_path / "oversized.pt"
    with open(path, "wb") as file:
        file.truncate((1 << 36) + 1)  # sparse: nothing is written
    return path


def _named_pipe(tmp_path: Path) -> Path:
    """A pipe with no writer: opening it to read would block forever."""
    path = tmp_path / "pipe"
    os.mkfifo(path)
    return path


NOT_REGULAR = {
    "device": (lambda tmp_path: Path("/dev/zero"), "is a character device, not a regular file"),
    "directory": (lambda tmp_path: tmp_path, "is a directory, not a regular file"),
    "named_pipe": (_named_pipe, "is a named pipe, not a regular file"),
    "oversized": (_oversized_file, r"more than the 68719476736 bytes \(64 GiB\)"),
}


@pytest.mark.parametrize("kind", sorted(NOT_REGULAR))
def test_path_that_is_no_state_dict_file_is_refused_unread(tmp_path: Path, kind: str) -> None:
    make_path, pattern = NOT_REGULAR[kind]
    load_cpp_refused(make_path(tmp_path), pattern)


def test_ordered_dict_gets_its_hint_and_nothing_else_does(tmp_path: Path) -> None:
    path = tmp_path / "ordered.pt"
    torch.save(nn.MultiheadAttention(8, 2).state_dict(), path)
    load_cpp_refused(path, "holds an OrderedDict .*torchmha.save_state_dict")
    others: List[Tuple[Callable[[Path], None], str]] = [
        (lambda p: torch.save(nn.Linear(2, 2), p), "holds torch.nn.modules.linear.Linear"),
        (lambda p: torch.save(random_state(), p, pickle_protocol=4), "protocol 4"),
    ]
    for save, pattern in others:
        save(path)
        assert "OrderedDict" not in load_cpp_refused(path, pattern)


def _quantized(per_channel: bool) -> Tensor:
    weight = torch.randn(8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantized tensors are deprecated
        if per_channel:
            scales, zero_points = torch.rand(8) + 0.1, torch.zeros(8, dtype=torch.long)
            return torch.quantize_per_channel(weight, scales, zero_points, 0, torch.qint8)
        return torch.quantize_per_tensor(weight, 0.1, 0, torch.qint8)


@pytest.mark.parametrize(
    "make, pattern",
    [
        (lambda: _quantized(per_channel=False), "is a quantized tensor.*dequantize"),
        (lambda: _quantized(per_channel=True), "is a quantized tensor.*dequantize"),
        (lambda: torch.randn(8, 8).to_sparse(), "is a sparse tensor.*to_dense"),
        (lambda: nn.Parameter(torch.randn(8, 8)), "is an nn.Parameter"),
    ],
    ids=["quantized_per_tensor", "quantized_per_channel", "sparse", "parameter"],
)
def test_tensor_of_another_kind_is_refused_by_key_in_cpp(
    tmp_path: Path, make: Callable[[], Tensor], pattern: str
) -> None:
    path = tmp_path / "other_kind.pt"
    torch.save(dict(random_state(), **{"out_proj.weight": make()}), path)
    load_cpp_refused(path, '"out_proj.weight" in .*' + pattern)
