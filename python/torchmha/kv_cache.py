"""``torchmha.KVCache``: the keys and values of earlier tokens, for incremental decoding."""

from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn


class CacheSizes:
    """The sizes of a cache, read from its ``key`` buffer of shape
    ``(batch_size, num_kv_heads, max_seq_len, head_dim)``: shared by ``torchmha.KVCache`` and the
    bound C++ cache ``torchmha.cpp.KVCache``."""

    key: Tensor

    @property
    def batch_size(self) -> int:
        return self.key.shape[0]

    @property
    def num_kv_heads(self) -> int:
        return self.key.shape[1]

    @property
    def max_seq_len(self) -> int:
        return self.key.shape[2]

    @property
    def head_dim(self) -> int:
        return self.key.shape[3]


class KVCache(CacheSizes, nn.Module):
    """Preallocated keys and values of a batch of sequences, and each entry's length.

    ``key`` and ``value`` are ``(batch_size, num_kv_heads, max_seq_len, head_dim)`` (keys after
    their rotary embedding), ``seq_lens`` is int64 ``(batch_size,)``. All three are buffers (not
    saved in the state dict), so the cache moves with ``.to()`` and ``torch.export`` sees it.
    ``torchmha.MultiHeadAttention.forward(..., kv_cache=cache)`` writes each step's keys and values
    at each entry's own length and advances it. Positions beyond an entry's length are never
    attended to; they start as zeros and hold only finite values the op wrote.

    Args:
        batch_size: sequences decoded side by side.
        num_kv_heads: key/value heads of the attention that uses the cache.
        max_seq_len: positions per sequence (prompt and generated tokens).
        head_dim: features per head.
        dtype: of the keys and values (the attention's dtype; default: PyTorch's default dtype).
        device: of every tensor of the cache.
    """

    key: Tensor
    value: Tensor
    seq_lens: Tensor

    def __init__(
        self,
        batch_size: int,
        num_kv_heads: int,
        max_seq_len: int,
        head_dim: int,
        dtype: Optional[torch.dtype] = None,
        device: Optional[Union[torch.device, str]] = None,
    ) -> None:
        sizes = {
            "batch_size": batch_size,
            "num_kv_heads": num_kv_heads,
            "max_seq_len": max_seq_len,
            "head_dim": head_dim,
        }
        for name, size in sizes.items():
            if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
                raise ValueError(f"KVCache: {name} must be a positive int, got {size!r}")
        super().__init__()
        shape = (batch_size, num_kv_heads, max_seq_len, head_dim)
        # Zeros, not empty: masked positions must hold finite numbers (0 * NaN would be NaN).
        self.register_buffer("key", torch.zeros(shape, dtype=dtype, device=device), False)
        self.register_buffer("value", torch.zeros(shape, dtype=dtype, device=device), False)
        self.register_buffer(
            "seq_lens", torch.zeros(batch_size, dtype=torch.int64, device=device), False
        )

    @torch.no_grad()
    def reset(self) -> None:
        """Empties every entry (lengths 0, keys and values zero), in place."""
        self.key.zero_()
        self.value.zero_()
        self.seq_lens.zero_()

    @torch.no_grad()
    def reorder(self, indices: Union[Tensor, Sequence[int]]) -> None:
        """Entry ``b`` becomes what entry ``indices[b]`` was (beam search: select and repeat
        entries), in place; ``indices`` has one index per entry."""
        indices = torch.as_tensor(indices, device=self.seq_lens.device)
        if indices.dtype not in (torch.int32, torch.int64) or indices.shape != (self.batch_size,):
            raise RuntimeError(
                f"KVCache.reorder: expected integer `indices` of shape [batch_size] = "
                f"[{self.batch_size}], but got {indices.dtype} of shape {list(indices.shape)}"
            )
        if not torch.compiler.is_compiling() and indices.numel() > 0:
            low, high = int(indices.min()), int(indices.max())
            if low < 0 or high >= self.batch_size:
                raise RuntimeError(
                    f"KVCache.reorder: `indices` must be in [0, {self.batch_size}), but got "
                    f"{low if low < 0 else high}"
                )
        # index_select copies first, so entries that move into each other's places stay intact.
        for buffer in (self.key, self.value, self.seq_lens):
            buffer.copy_(buffer.index_select(0, indices))

    def extra_repr(self) -> str:
        return (
            f"batch_size={self.batch_size}, num_kv_heads={self.num_kv_heads}, "
            f"max_seq_len={self.max_seq_len}, head_dim={self.head_dim}, dtype={self.key.dtype}"
        )
