"""Tensor parallelism by heads for torchmha's attention modules (Megatron-style).

``HeadParallel()`` is a ``ParallelStyle`` for
``torch.distributed.tensor.parallel.parallelize_module`` that splits a
``torchmha.MultiHeadAttention`` or a ``torchmha.TextbookMultiHeadAttention`` in place: on a 1-D
device mesh of ``tp`` ranks, rank ``r`` keeps the query heads
``[r * num_heads / tp, (r + 1) * num_heads / tp)`` whole and the key/value heads they use.
The packed ``in_proj_weight``/``in_proj_bias`` (or ``q/k/v_proj_weight``) are sharded per q, k
and v block, ``out_proj`` is row-parallel: each rank projects its heads' part, the parts are
summed across the mesh and ``out_proj.bias`` is added once after the sum. Inputs and outputs are
replicated (every rank passes the same ``query``, ``key`` and ``value`` and gets the whole
output).

Grouped-query attention: with ``num_kv_heads % tp == 0`` the key/value heads are split with
their query heads; with ``tp % num_kv_heads == 0`` (fewer key/value heads than ranks) every rank
keeps all key/value projections (replicated) and uses the one its query heads share; their
gradients are summed across the mesh in backward, so the replicas stay equal.

Parameters are plain local tensors (same names, local shapes) and the layout is recorded on the
module; ``full_state_dict`` and ``load_full_state_dict`` move state dicts between the
single-process layout and this one (also under FSDP2). Each rank's op runs with its local head
counts; ``need_weights`` returns the whole model's weights on every rank (gathered).
"""

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel.style import ParallelStyle

from torchmha.modules import MultiHeadAttention
from torchmha.ops import multi_head_attention
from torchmha.textbook import TextbookMultiHeadAttention

__all__ = ["HeadParallel", "full_state_dict", "load_full_state_dict"]


@dataclass(frozen=True)
class HeadLayout:
    """Which heads a rank holds; everything a shard's forward and the state-dict routes need."""

    group: dist.ProcessGroup
    world_size: int
    rank: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    kv_replicated: bool

    def __deepcopy__(self, memo: dict) -> "HeadLayout":
        # Immutable, and a process group cannot be copied: a copied module shares the layout.
        return self

    @property
    def local_heads(self) -> int:
        return self.num_heads // self.world_size

    @property
    def local_kv_heads(self) -> int:
        return 1 if self.kv_replicated else self.num_kv_heads // self.world_size

    @property
    def local_embed_dim(self) -> int:
        return self.local_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def stored_kv_dim(self) -> int:
        """Key/value rows a rank stores: all of them when replicated."""
        return self.kv_dim if self.kv_replicated else self.local_kv_heads * self.head_dim

    def q_rows(self) -> slice:
        start = self.rank * self.local_embed_dim
        return slice(start, start + self.local_embed_dim)

    def stored_kv_rows(self) -> slice:
        if self.kv_replicated:
            return slice(0, self.kv_dim)
        start = self.rank * self.stored_kv_dim
        return slice(start, start + self.stored_kv_dim)

    def used_kv_rows(self) -> slice:
        """Rows of the stored key/value projection that this rank's query heads use."""
        if not self.kv_replicated:
            return slice(0, self.stored_kv_dim)
        group_size = self.num_heads // self.num_kv_heads
        kv_head = self.rank * self.local_heads // group_size
        return slice(kv_head * self.head_dim, (kv_head + 1) * self.head_dim)


class _CopyToHeads(torch.autograd.Function):
    """Identity forward; backward sums the gradient across the mesh (a replicated input)."""

    @staticmethod
    def forward(ctx, tensor: Tensor, group: dist.ProcessGroup) -> Tensor:
        ctx.group = group
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromHeads(torch.autograd.Function):
    """Sums partial results across the mesh; the gradient of a replicated sum is the identity."""

    @staticmethod
    def forward(ctx, tensor: Tensor, group: dist.ProcessGroup) -> Tensor:
        total = tensor.contiguous().clone()
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


class _GatherHeads(torch.autograd.Function):
    """Concatenates every rank's heads along ``dim``; backward keeps this rank's part."""

    @staticmethod
    def forward(ctx, tensor: Tensor, dim: int, group: dist.ProcessGroup) -> Tensor:
        ctx.dim, ctx.rank, ctx.size = dim, dist.get_rank(group), tensor.size(dim)
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, tensor.contiguous(), group=group)
        return torch.cat(parts, dim=dim)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad.narrow(ctx.dim, ctx.rank * ctx.size, ctx.size), None, None


class HeadParallelMultiHeadAttention(MultiHeadAttention):
    """A ``torchmha.MultiHeadAttention`` after ``HeadParallel``: holds and runs its rank's heads.

    ``num_heads``, ``num_kv_heads`` and ``embed_dim`` stay the whole model's; the op runs with
    the local counts in ``head_layout``. ``need_weights=True`` returns the whole model's weights
    on every rank (averaged over all heads, or all heads gathered in head order).
    """

    head_layout: HeadLayout

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Optional[Tensor] = None,
        need_weights: bool = True,
        attn_mask: Optional[Tensor] = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
        positions: Optional[Tensor] = None,
    ) -> Tuple[Tensor, Optional[Tensor]]:
        layout = self.head_layout
        q_weight, k_weight, v_weight = self._projection_shards()
        q_bias, kv_bias = self._bias_shards()
        output, weights = _attend_local_heads(
            layout,
            (query, key, value),
            (q_weight, q_bias, k_weight, v_weight, kv_bias),
            (self.out_proj.weight, self.out_proj.bias),
            bias_k=self._used_kv(self.bias_k),
            bias_v=self._used_kv(self.bias_v),
            add_zero_attn=self.add_zero_attn,
            dropout_p=self.dropout,
            training=self.training,
            key_padding_mask=key_padding_mask,
            attn_mask=_local_heads_mask(attn_mask, layout),
            need_weights=need_weights,
            average_attn_weights=average_attn_weights,
            is_causal=is_causal,
            batch_first=self.batch_first,
            num_kv_heads=layout.local_kv_heads,
            rope_theta=self.rope_theta,
            rotary_dim=self.rotary_dim,
            rotary_interleaved=self.rotary_interleaved,
            positions=positions,
        )
        if weights is not None:
            weights = _whole_weights(weights, average_attn_weights, layout)
        return output, weights

    def _projection_shards(self) -> Tuple[Tensor, Tensor, Tensor]:
        layout = self.head_layout
        if self.in_proj_weight is not None:
            q_weight, k_weight, v_weight = self.in_proj_weight.split(
                [layout.local_embed_dim, layout.stored_kv_dim, layout.stored_kv_dim]
            )
        else:
            q_weight, k_weight, v_weight = (
                self.q_proj_weight,
                self.k_proj_weight,
                self.v_proj_weight,
            )
        return q_weight, self._used_kv(k_weight, dim=0), self._used_kv(v_weight, dim=0)

    def _bias_shards(self) -> Tuple[Optional[Tensor], Optional[Tensor]]:
        if self.in_proj_bias is None:
            return None, None
        layout = self.head_layout
        q_bias, k_bias, v_bias = self.in_proj_bias.split(
            [layout.local_embed_dim, layout.stored_kv_dim, layout.stored_kv_dim]
        )
        return q_bias, torch.cat([self._used_kv(k_bias, dim=0), self._used_kv(v_bias, dim=0)])

    def _used_kv(self, tensor: Optional[Tensor], dim: int = -1) -> Optional[Tensor]:
        """The key/value rows this rank's heads use; replicated ones sum gradients in backward."""
        if tensor is None:
            return None
        layout = self.head_layout
        if layout.kv_replicated:
            tensor = _CopyToHeads.apply(tensor, layout.group)
        rows = layout.used_kv_rows()
        return tensor.narrow(dim, rows.start, rows.stop - rows.start)

    def extra_repr(self) -> str:
        layout = self.head_layout
        return (
            super().extra_repr() + f", head_parallel=(rank {layout.rank} of {layout.world_size}, "
            f"{layout.local_heads} query heads, {layout.local_kv_heads} key/value heads"
            + (", key/value replicated)" if layout.kv_replicated else ")")
        )


class HeadParallelTextbookMultiHeadAttention(TextbookMultiHeadAttention):
    """A ``TextbookMultiHeadAttention`` after ``HeadParallel``: holds and runs its rank's heads.

    ``attn`` keeps every head's probabilities (gathered from all ranks), as before.
    """

    head_layout: HeadLayout

    def forward(
        self, query: Tensor, key: Tensor, value: Tensor, mask: Optional[Tensor] = None
    ) -> Tensor:
        layout = self.head_layout
        if query.dim() != 3 or key.dim() != 3 or value.dim() != 3:
            raise RuntimeError(
                "torchmha.TextbookMultiHeadAttention: expected batch-first 3-D `query`, `key` "
                f"and `value` (B, L, d_model), but got {list(query.shape)}, {list(key.shape)} "
                f"and {list(value.shape)}"
            )
        attn_mask = None
        if mask is not None:
            # Nonzero = may attend, as the adapter reads it; this rank's heads only.
            batch, target_len, source_len = query.size(0), query.size(1), key.size(1)
            full = (mask == 0).expand(batch, self.h, target_len, source_len)
            attn_mask = _local_heads_mask(
                full.reshape(batch * self.h, target_len, source_len), layout
            )
        q_proj, k_proj, v_proj = self.linear_layers[0], self.linear_layers[1], self.linear_layers[2]
        output, weights = _attend_local_heads(
            layout,
            (query, key, value),
            (
                q_proj.weight,
                q_proj.bias,
                k_proj.weight,
                v_proj.weight,
                torch.cat([k_proj.bias, v_proj.bias]),
            ),
            (self.output_linear.weight, self.output_linear.bias),
            dropout_p=self.dropout_p,
            training=self.training,
            attn_mask=attn_mask,
            need_weights=True,
            average_attn_weights=False,
            batch_first=True,
        )
        self.attn = _whole_weights(weights, False, layout)
        return output


def _attend_local_heads(
    layout: HeadLayout,
    inputs: Tuple[Tensor, Tensor, Tensor],
    projections: Tuple[Tensor, Optional[Tensor], Tensor, Tensor, Optional[Tensor]],
    out_projection: Tuple[Tensor, Optional[Tensor]],
    **options,
) -> Tuple[Tensor, Optional[Tensor]]:
    """The op on this rank's heads, then the row-parallel output projection summed over ranks.

    Returns the whole output and this rank's attention weights (None unless asked for).
    """
    query, key, value = _copy_inputs(*inputs, layout.group)
    q_weight, q_bias, k_weight, v_weight, kv_bias = projections
    # The op's query projection is square: the query heads are projected here, and the op
    # gets an identity (exact) in its place and in place of out_proj.
    projected = nn.functional.linear(query, q_weight, q_bias)
    identity = torch.eye(layout.local_embed_dim, dtype=projected.dtype, device=projected.device)
    q_zeros = projected.new_zeros(layout.local_embed_dim)
    attended, weights = multi_head_attention(
        projected,
        key,
        value,
        layout.local_heads,
        in_proj_bias=None if kv_bias is None else torch.cat([q_zeros, kv_bias]),
        out_proj_weight=identity,
        q_proj_weight=identity,
        k_proj_weight=k_weight,
        v_proj_weight=v_weight,
        **options,
    )
    out_weight, out_bias = out_projection
    output = _ReduceFromHeads.apply(nn.functional.linear(attended, out_weight), layout.group)
    if out_bias is not None:
        output = output + out_bias
    return output, weights


def _local_heads_mask(attn_mask: Optional[Tensor], layout: HeadLayout) -> Optional[Tensor]:
    """A per-head ``(N * num_heads, L, S)`` mask keeps this rank's heads; others broadcast."""
    if attn_mask is None or attn_mask.dim() != 3:
        return attn_mask
    per_head = attn_mask.unflatten(0, (-1, layout.num_heads))
    first_head = layout.rank * layout.local_heads
    return per_head.narrow(1, first_head, layout.local_heads).flatten(0, 1)


def _whole_weights(weights: Tensor, average_attn_weights: bool, layout: HeadLayout) -> Tensor:
    """Every rank's weights: the mean over all heads, or all heads in order."""
    if average_attn_weights:
        share = layout.local_heads / layout.num_heads
        return _ReduceFromHeads.apply(weights * share, layout.group)
    return _GatherHeads.apply(weights, weights.dim() - 3, layout.group)


def _copy_inputs(
    query: Tensor, key: Tensor, value: Tensor, group: dist.ProcessGroup
) -> Tuple[Tensor, Tensor, Tensor]:
    """Marks replicated inputs, once per distinct tensor (self-attention passes one three times)."""
    copied_query = _CopyToHeads.apply(query, group)
    copied_key = copied_query if key is query else _CopyToHeads.apply(key, group)
    if value is query:
        copied_value = copied_query
    elif value is key:
        copied_value = copied_key
    else:
        copied_value = _CopyToHeads.apply(value, group)
    return copied_query, copied_key, copied_value


class HeadParallel(ParallelStyle):
    """Shards a ``torchmha.MultiHeadAttention`` or ``TextbookMultiHeadAttention`` by heads over a
    1-D device mesh, in place (the module's class becomes its head-parallel subclass).

    Every rank must pass the same inputs; the outputs (and attention weights, if asked for) are
    the whole model's on every rank. The full weights are taken from mesh rank
    ``src_data_rank`` (``None``: each rank's own, which must then be equal).
    Dropout draws on each rank's generator, so only ``dropout=0`` equals one process exactly.
    """

    def __init__(self, src_data_rank: Optional[int] = 0) -> None:
        super().__init__()
        self.src_data_rank = src_data_rank

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        layout = _check_and_lay_out(module, device_mesh)
        full = {name: tensor.detach() for name, tensor in _sharded_tensors(module).items()}
        if self.src_data_rank is not None:
            source = dist.get_global_rank(layout.group, self.src_data_rank)
            for tensor in full.values():
                dist.broadcast(tensor, src=source, group=layout.group)
        output_projection = _output_projection(module)
        module.__class__ = _PARALLEL_CLASSES[type(module)]
        module.head_layout = layout
        _assign_local(module, {name: _shard(name, t, layout) for name, t in full.items()})
        output_projection.in_features = layout.local_embed_dim
        return module


_PARALLEL_CLASSES = {
    MultiHeadAttention: HeadParallelMultiHeadAttention,
    TextbookMultiHeadAttention: HeadParallelTextbookMultiHeadAttention,
}


def _output_projection(module: nn.Module) -> nn.Linear:
    return (
        module.output_linear if isinstance(module, TextbookMultiHeadAttention) else module.out_proj
    )


def _check_and_lay_out(module: nn.Module, device_mesh: DeviceMesh) -> HeadLayout:
    """Refuses what cannot be split, with the same message on every rank before any collective."""
    if type(module) not in _PARALLEL_CLASSES:
        raise ValueError(
            "HeadParallel applies to torchmha.MultiHeadAttention and "
            "torchmha.TextbookMultiHeadAttention modules, "
            f"but got {type(module).__module__}.{type(module).__qualname__}"
        )
    if device_mesh.ndim != 1:
        raise ValueError(
            f"HeadParallel needs a 1-D device mesh, but got one with {device_mesh.ndim} "
            f"dimensions {tuple(device_mesh.shape)}: pass the tensor-parallel dimension, "
            'e.g. mesh["tp"]'
        )
    world_size = device_mesh.size()
    if isinstance(module, TextbookMultiHeadAttention):
        num_heads, num_kv_heads, head_dim = module.h, module.h, module.d_k
    else:
        num_heads, num_kv_heads, head_dim = module.num_heads, module.num_kv_heads, module.head_dim
    if num_heads % world_size != 0:
        raise ValueError(
            f"HeadParallel: num_heads {num_heads} is not divisible by the mesh size {world_size}"
        )
    if num_kv_heads % world_size != 0 and world_size % num_kv_heads != 0:
        raise ValueError(
            f"HeadParallel: num_kv_heads {num_kv_heads} and the mesh size {world_size} must "
            "divide one another (key/value heads split, or replicated when fewer than ranks)"
        )
    return HeadLayout(
        group=device_mesh.get_group(),
        world_size=world_size,
        rank=device_mesh.get_local_rank(),
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        kv_replicated=num_kv_heads < world_size,
    )


_SHARDED = (
    "in_proj_weight",
    "in_proj_bias",
    "q_proj_weight",
    "k_proj_weight",
    "v_proj_weight",
    "bias_k",
    "bias_v",
    "out_proj.weight",
)


_TEXTBOOK_SHARDED = (
    "linear_layers.0.weight",
    "linear_layers.0.bias",
    "linear_layers.1.weight",
    "linear_layers.1.bias",
    "linear_layers.2.weight",
    "linear_layers.2.bias",
    "output_linear.weight",
)


def _sharded_tensors(module: nn.Module) -> Dict[str, Tensor]:
    if isinstance(module, TextbookMultiHeadAttention):
        return {name: module.get_parameter(name) for name in _TEXTBOOK_SHARDED}
    tensors = {name: module.get_parameter(name) for name in _SHARDED[:-1] if _has(module, name)}
    tensors["out_proj.weight"] = module.out_proj.weight
    return tensors


def _has(module: nn.Module, name: str) -> bool:
    return getattr(module, name, None) is not None


def _blocks(name: str, tensor: Tensor, layout: HeadLayout, local: bool) -> List[Tuple[str, Tensor]]:
    """A tensor's q / kv / out blocks, each tagged with its kind, along the sharded dim."""
    if name in ("in_proj_weight", "in_proj_bias"):
        q_dim = layout.local_embed_dim if local else layout.num_heads * layout.head_dim
        kv_dim = layout.stored_kv_dim if local else layout.kv_dim
        q, k, v = tensor.split([q_dim, kv_dim, kv_dim])
        return [("q", q), ("kv", k), ("kv", v)]
    if name == "q_proj_weight" or name.startswith("linear_layers.0."):
        return [("q", tensor)]
    if name in ("k_proj_weight", "v_proj_weight") or name.startswith("linear_layers."):
        return [("kv", tensor)]
    if name in ("bias_k", "bias_v"):
        return [("kv_last", tensor)]
    return [("out", tensor)]


def _shard(name: str, full: Tensor, layout: HeadLayout) -> Tensor:
    """This rank's part of a full tensor."""
    parts = []
    for kind, block in _blocks(name, full, layout, local=False):
        if kind == "q":
            parts.append(block[layout.q_rows()])
        elif kind == "kv":
            parts.append(block[layout.stored_kv_rows()])
        elif kind == "kv_last":
            parts.append(block[..., layout.stored_kv_rows()])
        else:
            parts.append(block[:, layout.q_rows()])
    return torch.cat(parts).clone() if len(parts) > 1 else parts[0].clone()


def _gather(name: str, local: Tensor, layout: HeadLayout) -> Tensor:
    """The full tensor from every rank's part (a collective)."""
    parts = []
    for kind, block in _blocks(name, local, layout, local=True):
        if kind in ("kv", "kv_last") and layout.kv_replicated:
            parts.append(block.clone())
            continue
        dim = {"q": 0, "kv": 0, "kv_last": block.dim() - 1, "out": 1}[kind]
        pieces = [torch.empty_like(block) for _ in range(layout.world_size)]
        dist.all_gather(pieces, block.contiguous(), group=layout.group)
        parts.append(torch.cat(pieces, dim=dim))
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def _assign_local(module: nn.Module, local: Dict[str, Tensor]) -> None:
    for name, tensor in local.items():
        owner, _, attribute = name.rpartition(".")
        target = module.get_submodule(owner)
        old = getattr(target, attribute)
        target.register_parameter(attribute, nn.Parameter(tensor, requires_grad=old.requires_grad))


def _head_parallel_modules(model: nn.Module) -> Dict[str, nn.Module]:
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, tuple(_PARALLEL_CLASSES.values()))
    }


def full_state_dict(model: nn.Module) -> Dict[str, Tensor]:
    """The single-process state dict of a model with ``HeadParallel`` modules, on every rank.

    Parameters that FSDP2 (``fully_shard``) sharded are gathered too. A collective: every rank
    of the model's meshes must call it.
    """
    state = {name: _whole_tensor(tensor) for name, tensor in model.state_dict().items()}
    for prefix, module in _head_parallel_modules(model).items():
        for name in _sharded_tensors(module):
            key = f"{prefix}.{name}" if prefix else name
            state[key] = _gather(name, state[key], module.head_layout)
    return state


def _whole_tensor(tensor: Tensor) -> Tensor:
    """A tensor, with a DTensor's shards (FSDP2's) gathered: this rank's head shard, whole."""
    if isinstance(tensor, DTensor):
        return tensor.full_tensor().detach()
    return tensor.detach()


def load_full_state_dict(model: nn.Module, state_dict: Dict[str, Tensor]) -> None:
    """Loads a single-process state dict into a model with ``HeadParallel`` modules.

    Each rank keeps its part; no communication. Load before ``fully_shard`` (FSDP2 shards what
    it finds).
    """
    local = dict(state_dict)
    for prefix, module in _head_parallel_modules(model).items():
        for name in _sharded_tensors(module):
            key = f"{prefix}.{name}" if prefix else name
            if key in local:
                local[key] = _shard(name, local[key], module.head_layout)
    model.load_state_dict(local)
