"""Every argument of ``torch.nn.MultiheadAttention``, crossed, against PyTorch with copied weights.

The matrix has 18 axes (``AXES``): head layout ``(embed_dim, num_heads)`` (head_dim 1 to 128,
odd head counts 3, 5, 7), key/value heads (``num_kv_heads`` all, grouped or one), rotary
embeddings (none, whole heads, partial, interleaved), rotary ``positions`` (default or given per
batch entry), ``kdim``/``vdim``, ``bias``, ``add_bias_kv``, ``add_zero_attn``,
batched or unbatched 2-D inputs, ``batch_first``, self/key-is-value/cross attention, contiguous,
strided (transposed and sliced views) or expanded (stride-0) inputs, ``attn_mask`` (none, bool
or float, 2-D or 3-D), ``key_padding_mask`` (none, bool, float), ``is_causal``, ``need_weights``,
``average_attn_weights`` and the dtype (float64, float32). Their full cross product has tens of
millions of valid configurations, so the matrix samples it in two parts, both drawn once from
fixed seeds and identical on every run:

- a *pairwise covering design* (``PAIRWISE``, about 50 rows): ``pairwise_design`` builds rows
  greedily (AETG: each candidate row starts from an uncovered pair of values and fills the other
  axes with the value covering most uncovered pairs; the best of a few candidates is kept; ties
  broken by ``random.Random(DESIGN_SEED)``) and stops only when every pair of values of every two
  axes that the constraints allow together appears in some row. Hence every value of every
  argument appears, and every two-argument interaction (bias_kv with a 3-D float mask, unbatched
  with is_causal, strided inputs with key_padding_mask, ...) is exercised;
  ``test_design_covers_every_pair`` re-checks that claim on the generated rows;
- ``RANDOM_ROWS`` rows drawn uniformly from the valid cross product (``SAMPLED``), which reach
  interactions of three and more arguments that a pairwise design may miss.

Each row runs on ``torchmha.MultiHeadAttention`` and on ``torchmha.cpp.MultiHeadAttention``;
outputs, weights and the gradients of the inputs (through their views) and of every parameter must
equal PyTorch's at the per-dtype tolerances of ``conftest.TOLERANCES``: ``nn.MultiheadAttention``'s
where the row has neither grouped heads nor rotary embeddings, else those of
``grouped_rotary_reference.GroupedRotaryAttention`` (PyTorch's ``multi_head_attention_forward``
after test-side projection, rotation and key/value head repetition). Where a GPU is present the
same rows run again on CUDA (both modules and PyTorch's there); without one those are skipped.

``is_causal=True`` follows PyTorch's rule for the hint: with ``attn_mask`` given, both modules
get the true causal mask in that mask's form (bool/float, 2-D/3-D); with no mask (PyTorch raises)
torchmha's causal attention is compared with PyTorch given the explicit causal mask. Targeted
tests below cover the hint's rule exhaustively, a wrong hint, appended keys under the hint,
float masks as differentiable inputs, a key expanded along the sequence and empty dimensions.
"""

import itertools
import random
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

import pytest
import torch
from conftest import assert_close, grads_by_name
from grouped_rotary_reference import GroupedRotaryAttention
from torch import Tensor, nn

import torchmha

BATCH, TARGET_LEN, SOURCE_LEN = 2, 3, 4
DESIGN_SEED = 20240603
RANDOM_ROWS = 100
GROUPED_RANDOM_ROWS = 40
DTYPES = {"float64": torch.float64, "float32": torch.float32}

# Each argument's values; dims are (embed_dim, num_heads): head_dim 1, 1, 1, 2, 3, 2, 8, 32, 128.
AXES: Dict[str, List[Any]] = {
    "dims": [
        (1, 1),
        (3, 3),
        (5, 5),
        (6, 3),
        (15, 5),
        (14, 7),
        (24, 3),
        (64, 2),
        (128, 1),
        (256, 2),
    ],
    "kv_dims": ["embed_dim", "kdim_vdim", "kdim_eq_vdim"],
    "bias": [True, False],
    "add_bias_kv": [False, True],
    "add_zero_attn": [False, True],
    "batched": [True, False],
    "batch_first": [False, True],
    "kind": ["self", "key_is_value", "cross"],
    "layout": ["contiguous", "strided", "expanded"],
    "attn_mask": ["none", "bool_2d", "bool_3d", "float_2d", "float_3d"],
    "key_padding_mask": ["none", "bool", "float"],
    "is_causal": [False, True],
    "need_weights": [True, False],
    "average_attn_weights": [True, False],
    "dtype": ["float64", "float32"],
}
# The defaults of the axes that torch.nn.MultiheadAttention does not have.
BEYOND_PYTORCH_DEFAULTS: Dict[str, Any] = {
    "kv_heads": "all",
    "rotary": "none",
    "positions": "default",
}
# The same axes and three more, with head layouts of 4 and 6 heads for grouping (head_dim 4, 8).
GROUPED_ROTARY_AXES: Dict[str, List[Any]] = {
    **AXES,
    "dims": AXES["dims"] + [(16, 4), (48, 6)],
    # num_kv_heads: num_heads, num_heads // 2 (for 4 and 6 heads) or 1 (multi-query attention).
    "kv_heads": ["all", "grouped", "one"],
    # rope_theta with rotary_dim = head_dim, head_dim // 2 (head_dim >= 4), or interleaved pairs.
    "rotary": ["none", "full", "partial", "interleaved"],
    # Rotary positions given per batch entry (self-attention), or 0, 1, 2, ...
    "positions": ["default", "given"],
}

Row = Dict[str, Any]
Pair = Tuple[Tuple[str, Any], Tuple[str, Any]]


def is_valid(row: Row) -> bool:
    """Constraints on a (partial) row: self-attention needs kdim = vdim = embed_dim, and a key
    that is also the value needs kdim = vdim; grouped heads need 4 or 6 heads; rotary embeddings
    need an even head_dim (partial ones at least 4); given positions need rotary embeddings and
    self-attention (the keys share the queries' positions)."""
    if row.get("kind") == "self" and row.get("kv_dims", "embed_dim") != "embed_dim":
        return False
    if row.get("kind") == "key_is_value" and row.get("kv_dims") == "kdim_vdim":
        return False
    if "dims" in row:
        embed_dim, num_heads = row["dims"]
        head_dim = embed_dim // num_heads
        if row.get("kv_heads") == "grouped" and num_heads not in (4, 6):
            return False
        rotary = row.get("rotary", "none")
        if rotary != "none" and head_dim % 2 != 0:
            return False
        if rotary == "partial" and head_dim < 4:
            return False
    if row.get("positions") == "given":
        # Implied too: self-attention's kdim = vdim = embed_dim, rotary's even head_dim.
        if row.get("rotary") == "none" or row.get("kind", "self") != "self":
            return False
        if row.get("kv_dims", "embed_dim") != "embed_dim":
            return False
        if "dims" in row and (row["dims"][0] // row["dims"][1]) % 2 != 0:
            return False
    return True


def pairs_of(row: Row, names: Sequence[str]) -> Set[Pair]:
    """Every pair of (axis, value) settings that ``row`` contains."""
    present = [name for name in names if name in row]
    return {((a, row[a]), (b, row[b])) for a, b in itertools.combinations(present, 2)}


def valid_pairs(axes: Dict[str, List[Any]]) -> Set[Pair]:
    """Every pair of values of two axes that the constraints allow together."""
    return {
        ((a, va), (b, vb))
        for a, b in itertools.combinations(list(axes), 2)
        for va in axes[a]
        for vb in axes[b]
        if is_valid({a: va, b: vb})
    }


def pairwise_design(axes: Dict[str, List[Any]], seed: int, candidates: int = 10) -> List[Row]:
    """Greedy (AETG) pairwise covering design: rows until every valid pair of values is covered."""
    rng = random.Random(seed)
    names = list(axes)
    uncovered = valid_pairs(axes)
    rows: List[Row] = []
    while uncovered:
        best: Row = {}
        best_gain = -1
        for _ in range(candidates):
            (a, va), (b, vb) = rng.choice(sorted(uncovered, key=repr))
            row: Row = {a: va, b: vb}
            rest = [name for name in names if name not in row]
            rng.shuffle(rest)
            for name in rest:
                # The value that covers most still-uncovered pairs with the settled axes.
                scored = []
                for value in axes[name]:
                    if not is_valid(dict(row, **{name: value})):
                        continue
                    trial = pairs_of({**row, name: value}, names) - pairs_of(row, names)
                    scored.append((len(trial & uncovered), rng.random(), value))
                row[name] = max(scored, key=lambda entry: entry[:2])[2]
            gain = len(pairs_of(row, names) & uncovered)
            if gain > best_gain:
                best, best_gain = row, gain
        rows.append({name: best[name] for name in names})
        uncovered -= pairs_of(best, names)
    return rows


def random_rows(axes: Dict[str, List[Any]], seed: int, count: int) -> List[Row]:
    """``count`` valid rows drawn uniformly (by rejection) from the full cross product."""
    rng = random.Random(seed)
    rows: List[Row] = []
    while len(rows) < count:
        row = {name: rng.choice(values) for name, values in axes.items()}
        if is_valid(row):
            rows.append(row)
    return rows


PAIRWISE = [dict(row, **BEYOND_PYTORCH_DEFAULTS) for row in pairwise_design(AXES, DESIGN_SEED)]
# Random rows on top reach interactions of three and more arguments, drawn once (fixed seed).
SAMPLED = [
    dict(row, **BEYOND_PYTORCH_DEFAULTS) for row in random_rows(AXES, DESIGN_SEED + 1, RANDOM_ROWS)
]
DESIGN = PAIRWISE + SAMPLED
# Grouped heads and rotary embeddings crossed with every argument: a design of their own, so the
# rows above stay torch.nn.MultiheadAttention's.
GROUPED_ROTARY_PAIRWISE = pairwise_design(GROUPED_ROTARY_AXES, DESIGN_SEED + 2)
GROUPED_ROTARY_SAMPLED = random_rows(GROUPED_ROTARY_AXES, DESIGN_SEED + 3, GROUPED_RANDOM_ROWS)


def case_id(row: Row) -> str:
    """A readable test id listing the settings that differ from the defaults."""
    embed_dim, num_heads = row["dims"]
    parts = [f"E{embed_dim}H{num_heads}", row["dtype"], row["kind"], row["layout"]]
    parts += [] if row["kv_heads"] == "all" else [f"kv-{row['kv_heads']}"]
    parts += [] if row["rotary"] == "none" else [f"rope-{row['rotary']}"]
    parts += [] if row["positions"] == "default" else ["positions"]
    parts += [] if row["kv_dims"] == "embed_dim" else [row["kv_dims"]]
    parts += [] if row["bias"] else ["nobias"]
    parts += ["bias_kv"] if row["add_bias_kv"] else []
    parts += ["zero_attn"] if row["add_zero_attn"] else []
    parts += ["batch_first" if row["batch_first"] else "seq_first"]
    parts += [] if row["batched"] else ["unbatched"]
    parts += [f"attn-{row['attn_mask']}", f"kpm-{row['key_padding_mask']}"]
    parts += ["causal"] if row["is_causal"] else []
    parts += [] if row["need_weights"] else ["noweights"]
    parts += [] if row["average_attn_weights"] else ["perhead"]
    return "-".join(parts)


def design_params(
    pairwise: Sequence[Row] = PAIRWISE, sampled: Sequence[Row] = SAMPLED
) -> List[Any]:
    """A design's rows as pytest params."""
    params = []
    for index, row in enumerate(list(pairwise) + list(sampled)):
        origin = "pairwise" if index < len(pairwise) else "sampled"
        params.append(pytest.param(row, id=f"{origin}{index}-{case_id(row)}"))
    return params


def randomize_scaled(module: nn.Module) -> None:
    """Random weights with std 1/sqrt(fan_in) (biases 0.5): keeps scores O(1) even at E = 256,
    so float32 is compared on well-conditioned numbers."""
    with torch.no_grad():
        for parameter in module.parameters():
            if parameter.dim() == 2:
                parameter.copy_(torch.randn_like(parameter) / parameter.size(-1) ** 0.5)
            else:
                parameter.copy_(torch.randn_like(parameter) * 0.5)


def kv_dims(row: Row) -> Tuple[int, int]:
    """(kdim, vdim) for the row's ``kv_dims`` setting."""
    embed_dim = row["dims"][0]
    return {
        "embed_dim": (embed_dim, embed_dim),
        "kdim_vdim": (embed_dim + 2, embed_dim // 2 + 1),
        "kdim_eq_vdim": (embed_dim + 1, embed_dim + 1),
    }[row["kv_dims"]]


def grouped_rotary_options(row: Row) -> Dict[str, Any]:
    """The row's num_kv_heads and rotary keywords; empty at the defaults."""
    embed_dim, num_heads = row["dims"]
    head_dim = embed_dim // num_heads
    options: Dict[str, Any] = {}
    if row["kv_heads"] != "all":
        options["num_kv_heads"] = num_heads // 2 if row["kv_heads"] == "grouped" else 1
    if row["rotary"] != "none":
        options["rope_theta"] = 10000.0 if row["rotary"] == "full" else 50.0
        if row["rotary"] == "partial":
            options["rotary_dim"] = head_dim // 4 * 2
        options["rotary_interleaved"] = row["rotary"] == "interleaved"
    return options


def make_modules(row: Row, impl: str) -> Tuple[nn.Module, nn.Module]:
    """The reference module with random weights (PyTorch's, or GroupedRotaryAttention for grouped
    heads or rotary embeddings) and the torchmha module (``impl``) loaded from it."""
    embed_dim, num_heads = row["dims"]
    kdim, vdim = kv_dims(row)
    dtype = DTYPES[row["dtype"]]
    options = {
        "bias": row["bias"],
        "add_bias_kv": row["add_bias_kv"],
        "add_zero_attn": row["add_zero_attn"],
        "kdim": kdim,
        "vdim": vdim,
        "batch_first": row["batch_first"],
    }
    extra = grouped_rotary_options(row)
    reference: nn.Module
    if extra:
        reference = GroupedRotaryAttention(embed_dim, num_heads, dtype=dtype, **options, **extra)
    else:
        reference = nn.MultiheadAttention(embed_dim, num_heads, dtype=dtype, **options)
    options.update(extra)
    randomize_scaled(reference)
    if impl == "python":
        candidate: nn.Module = torchmha.MultiHeadAttention(
            embed_dim, num_heads, dtype=dtype, **options
        )
    else:
        # Made by C++ on the CPU; moved to where the reference is (CUDA in the CUDA tests).
        candidate = torchmha.cpp.MultiHeadAttention(embed_dim, num_heads, **options)
        candidate = candidate.to(device=reference.out_proj.weight.device, dtype=dtype)
    candidate.load_state_dict(reference.state_dict(), strict=True)
    return reference, candidate


def input_shape(row: Row, length: int, features: int) -> Tuple[int, ...]:
    """``(L, F)`` unbatched, ``(N, L, F)`` batch-first, else ``(L, N, F)``."""
    if not row["batched"]:
        return (length, features)
    return (BATCH, length, features) if row["batch_first"] else (length, BATCH, features)


def make_leaf(row: Row, shape: Tuple[int, ...]) -> Tuple[Tensor, Callable[[Tensor], Tensor]]:
    """A random leaf and the view of it that the module receives, in the row's memory layout."""
    dtype = DTYPES[row["dtype"]]
    if row["layout"] == "contiguous":
        return torch.randn(shape, dtype=dtype), lambda leaf: leaf
    if row["layout"] == "strided":
        # Every other feature of a wider tensor, with the two leading dims transposed if batched.
        if len(shape) == 3:
            wide = torch.randn(shape[1], shape[0], 2 * shape[2], dtype=dtype)
            return wide, lambda leaf: leaf.transpose(0, 1)[..., ::2]
        return torch.randn(shape[0], 2 * shape[1], dtype=dtype), lambda leaf: leaf[..., ::2]
    # Expanded (stride 0): one sequence shared by the batch, or one position shared by all.
    repeated_dim = 0 if len(shape) == 2 else (0 if row["batch_first"] else 1)
    base_shape = list(shape)
    base_shape[repeated_dim] = 1
    return torch.randn(base_shape, dtype=dtype), lambda leaf: leaf.expand(shape)


def make_inputs(
    row: Row,
) -> Tuple[List[Tensor], Callable[[Sequence[Tensor]], Tuple[Tensor, Tensor, Tensor]]]:
    """Leaves and a function from (fresh copies of) the leaves to (query, key, value).

    Self-attention passes one tensor three times and key-is-value one tensor twice, as PyTorch's
    callers do; the views are built once per call so that ``query is key`` holds.
    """
    embed_dim = row["dims"][0]
    kdim, vdim = kv_dims(row)
    source_len = TARGET_LEN if row["kind"] == "self" else SOURCE_LEN
    query, query_view = make_leaf(row, input_shape(row, TARGET_LEN, embed_dim))
    if row["kind"] == "self":
        return [query], lambda ls: (query_view(ls[0]),) * 3  # type: ignore[return-value]
    key, key_view = make_leaf(row, input_shape(row, source_len, kdim))
    if row["kind"] == "key_is_value":

        def key_is_value(ls: Sequence[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
            shared = key_view(ls[1])
            return query_view(ls[0]), shared, shared

        return [query, key], key_is_value
    value, value_view = make_leaf(row, input_shape(row, source_len, vdim))
    return [query, key, value], lambda ls: (query_view(ls[0]), key_view(ls[1]), value_view(ls[2]))


def causal_mask(target_len: int, source_len: int) -> Tensor:
    """PyTorch's causal mask: True above the diagonal (not allowed)."""
    return torch.ones(target_len, source_len, dtype=torch.bool).triu(1)


def random_mask(shape: Tuple[int, ...]) -> Tensor:
    """A bool mask (True = masked) with key 0 always visible, so no row is fully masked even when
    combined with other masks or a causal one (query 0 sees key 0 only)."""
    mask = torch.rand(shape) < 0.3
    mask[..., 0] = False
    return mask


def in_form(mask: Tensor, form: str, dtype: torch.dtype, random_values: bool) -> Tensor:
    """``mask`` as bool, or as a float mask (``-inf`` where masked, else random or zero)."""
    if form == "bool":
        return mask
    values = (
        torch.randn(mask.shape, dtype=dtype) * 0.5
        if random_values
        else torch.zeros(mask.shape, dtype=dtype)
    )
    return values.masked_fill(mask, float("-inf"))


def make_masks(row: Row) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """Keyword arguments (masks, ``is_causal``) for PyTorch and for torchmha."""
    num_heads = row["dims"][1]
    dtype = DTYPES[row["dtype"]]
    source_len = TARGET_LEN if row["kind"] == "self" else SOURCE_LEN
    batch = BATCH if row["batched"] else 1
    kwargs: Dict[str, Any] = {}
    if row["key_padding_mask"] != "none":
        shape = (BATCH, source_len) if row["batched"] else (source_len,)
        kwargs["key_padding_mask"] = in_form(
            random_mask(shape), row["key_padding_mask"], dtype, random_values=True
        )
    if row["attn_mask"] != "none":
        form, rank = row["attn_mask"].split("_")
        shape = (TARGET_LEN, source_len)
        if rank == "3d":
            shape = (batch * num_heads, *shape)
        if row["is_causal"]:
            # The hint promises a causal mask, so the mask must be exactly causal.
            mask = causal_mask(TARGET_LEN, source_len).expand(shape).clone()
        else:
            mask = random_mask(shape)
        kwargs["attn_mask"] = in_form(mask, form, dtype, random_values=not row["is_causal"])
    reference_kwargs = dict(kwargs)
    candidate_kwargs = dict(kwargs)
    if row["is_causal"]:
        candidate_kwargs["is_causal"] = True
        if row["attn_mask"] == "none":
            # PyTorch demands a mask; torchmha's causal attention must equal the explicit one.
            reference_kwargs["attn_mask"] = causal_mask(TARGET_LEN, source_len)
        else:
            reference_kwargs["is_causal"] = True
    if row["positions"] == "given":
        # Left-padded batches start later: each entry at its own random offset.
        shape = (BATCH, TARGET_LEN) if row["batched"] else (TARGET_LEN,)
        offsets = torch.randint(0, 100, shape[:-1] + (1,))
        positions = offsets + torch.arange(TARGET_LEN)
        reference_kwargs["positions"] = candidate_kwargs["positions"] = positions
    for options in (reference_kwargs, candidate_kwargs):
        options["need_weights"] = row["need_weights"]
        options["average_attn_weights"] = row["average_attn_weights"]
    return reference_kwargs, candidate_kwargs


Results = Tuple[Tensor, Optional[Tensor], List[Optional[Tensor]], Dict[str, Optional[Tensor]]]


def run(
    module: nn.Module,
    leaves: Sequence[Tensor],
    views: Callable[[Sequence[Tensor]], Tuple[Tensor, Tensor, Tensor]],
    cotangents: Optional[Tuple[Tensor, Optional[Tensor]]],
    kwargs: Dict[str, Any],
) -> Tuple[Results, Tuple[Tensor, Optional[Tensor]]]:
    """Forward on views of fresh leaves and backward of a random projection of the results.

    Gradients flow through the views to the leaves, so strided and expanded inputs are checked
    where their gradients accumulate. Without ``cotangents``, random ones are drawn here.
    """
    module.zero_grad(set_to_none=True)
    fresh = [leaf.detach().clone().requires_grad_(True) for leaf in leaves]
    output, weights = module(*views(fresh), **kwargs)
    if cotangents is None:
        cotangents = (
            torch.randn_like(output),
            None if weights is None else torch.randn_like(weights),
        )
    loss = (output * cotangents[0]).sum()
    if cotangents[1] is not None:
        assert weights is not None
        loss = loss + (weights * cotangents[1]).sum()
    loss.backward()
    return (output, weights, [t.grad for t in fresh], grads_by_name(module)), cotangents


def assert_same_results(actual: Results, expected: Results, need_weights: bool) -> None:
    """Outputs, weights, input gradients and every parameter gradient agree."""
    assert_close(actual[0], expected[0], msg=lambda m: f"output: {m}")
    if need_weights:
        assert_close(actual[1], expected[1], msg=lambda m: f"weights: {m}")
    else:
        assert actual[1] is None and expected[1] is None
    for index, (mine, theirs) in enumerate(zip(actual[2], expected[2])):
        assert_close(mine, theirs, msg=lambda m, i=index: f"input {i} gradient: {m}")
    assert actual[3].keys() == expected[3].keys()
    for name, theirs in expected[3].items():
        assert theirs is not None, name
        assert_close(actual[3][name], theirs, msg=lambda m, n=name: f"{n}.grad: {m}")


def check_row(row: Row, impl: str) -> None:
    """One design row on one implementation against PyTorch."""
    reference, candidate = make_modules(row, impl)
    leaves, views = make_inputs(row)
    if row["layout"] != "contiguous":
        # Guards against a vacuous layout axis: the module really gets a non-contiguous tensor.
        assert not views(leaves)[0].is_contiguous()
    reference_kwargs, candidate_kwargs = make_masks(row)
    expected, cotangents = run(reference, leaves, views, None, reference_kwargs)
    actual, _ = run(candidate, leaves, views, cotangents, candidate_kwargs)
    assert_same_results(actual, expected, row["need_weights"])


@pytest.mark.parametrize(
    "axes, pairwise, sampled",
    [
        pytest.param(AXES, PAIRWISE, SAMPLED, id="pytorch"),
        pytest.param(
            GROUPED_ROTARY_AXES,
            GROUPED_ROTARY_PAIRWISE,
            GROUPED_ROTARY_SAMPLED,
            id="grouped_rotary",
        ),
    ],
)
def test_design_covers_every_pair(
    axes: Dict[str, List[Any]], pairwise: List[Row], sampled: List[Row]
) -> None:
    """A design is valid and covers every allowed pair of values of every two arguments."""
    names = list(axes)
    every_axis = set(axes) | set(BEYOND_PYTORCH_DEFAULTS)
    covered: Set[Pair] = set()
    for row in pairwise:
        assert row.keys() == every_axis and is_valid(row), row
        covered |= pairs_of(row, names)
    missing = valid_pairs(axes) - covered
    assert not missing, sorted(missing, key=repr)[:5]
    # Every value of every argument, in particular, appears.
    for name, values in axes.items():
        assert {row[name] for row in pairwise} == set(values), name
    assert all(row.keys() == every_axis and is_valid(row) for row in sampled)


@pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask")
@pytest.mark.parametrize("impl", ["python", "cpp"])
@pytest.mark.parametrize("row", design_params())
def test_design_row_matches_pytorch(row: Row, impl: str) -> None:
    """A row of the pairwise design: outputs, weights and all gradients equal PyTorch's."""
    check_row(row, impl)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask")
@pytest.mark.parametrize("impl", ["python", "cpp"])
@pytest.mark.parametrize("row", design_params())
def test_design_row_matches_pytorch_on_cuda(row: Row, impl: str) -> None:
    """The same rows on CUDA: modules, inputs and masks are made there, PyTorch runs there too."""
    with torch.device("cuda"):
        check_row(row, impl)


GROUPED_ROTARY_ROWS = design_params(GROUPED_ROTARY_PAIRWISE, GROUPED_ROTARY_SAMPLED)


@pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask")
@pytest.mark.parametrize("impl", ["python", "cpp"])
@pytest.mark.parametrize("row", GROUPED_ROTARY_ROWS)
def test_grouped_rotary_row_matches_reference(row: Row, impl: str) -> None:
    """A row of the grouped-heads and rotary design against GroupedRotaryAttention (or PyTorch's
    module where the row has neither): outputs, weights and all gradients."""
    check_row(row, impl)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask")
@pytest.mark.parametrize("impl", ["python", "cpp"])
@pytest.mark.parametrize("row", GROUPED_ROTARY_ROWS)
def test_grouped_rotary_row_matches_reference_on_cuda(row: Row, impl: str) -> None:
    """The grouped-heads and rotary rows on CUDA."""
    with torch.device("cuda"):
        check_row(row, impl)


# A fixed, small configuration for the targeted tests below.
TARGETED: Row = {
    **BEYOND_PYTORCH_DEFAULTS,
    "dims": (6, 3),
    "kv_dims": "embed_dim",
    "bias": True,
    "add_bias_kv": False,
    "add_zero_attn": False,
    "batched": True,
    "batch_first": False,
    "kind": "self",
    "layout": "contiguous",
    "attn_mask": "none",
    "key_padding_mask": "none",
    "is_causal": True,
    "need_weights": True,
    "average_attn_weights": True,
    "dtype": "float64",
}


@pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask")
@pytest.mark.parametrize("impl", ["python", "cpp"])
@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("key_padding_mask", ["none", "bool", "float"])
@pytest.mark.parametrize("attn_mask", ["none", "bool_2d", "bool_3d", "float_2d", "float_3d"])
@pytest.mark.parametrize("kind", ["self", "cross"])
def test_is_causal_every_mask_combination(
    kind: str, attn_mask: str, key_padding_mask: str, need_weights: bool, impl: str
) -> None:
    """``is_causal=True`` with each form of the true causal mask (PyTorch's hint: the mask is
    replaced by SDPA's causal flag only with need_weights=False and no padding mask), and with
    no mask at all (torchmha: causal attention; compared with PyTorch's explicit causal mask)."""
    row = dict(
        TARGETED,
        kind=kind,
        attn_mask=attn_mask,
        key_padding_mask=key_padding_mask,
        need_weights=need_weights,
    )
    check_row(row, impl)


@pytest.mark.parametrize("impl", ["python", "cpp"])
@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("appended", ["add_bias_kv", "add_zero_attn"])
def test_is_causal_hint_with_appended_keys(appended: str, need_weights: bool, impl: str) -> None:
    """The hint with bias_k/zero key appended: PyTorch's SDPA flag covers the appended key too
    (so the hint changes PyTorch's result); torchmha follows the same rule."""
    check_row(
        dict(TARGETED, attn_mask="bool_2d", need_weights=need_weights, **{appended: True}), impl
    )


@pytest.mark.parametrize("impl", ["python", "cpp"])
@pytest.mark.parametrize(
    "need_weights",
    [
        False,
        True,
    ],
)
@pytest.mark.parametrize("appended", ["add_bias_kv", "add_zero_attn"])
def test_is_causal_without_mask_with_appended_keys(
    appended: str, need_weights: bool, impl: str
) -> None:
    """Causal attention without a mask equals PyTorch with the explicit causal mask (appended
    keys visible, as with any mask), whatever ``need_weights`` is."""
    check_row(dict(TARGETED, need_weights=need_weights, **{appended: True}), impl)


def test_pytorch_demands_a_mask_for_is_causal() -> None:
    """Why ``is_causal`` without a mask is compared with an explicit mask: PyTorch refuses it."""
    reference, _ = make_modules(TARGETED, "python")
    query = torch.randn(TARGET_LEN, BATCH, 6, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="Need attn_mask"):
        reference(query, query, query, is_causal=True)


@pytest.mark.parametrize("impl", ["python", "cpp"])
@pytest.mark.parametrize("key_padding", [False, True])
@pytest.mark.parametrize("need_weights", [True, False])
def test_wrong_causal_hint_follows_pytorch(
    need_weights: bool, key_padding: bool, impl: str
) -> None:
    """A non-causal mask with ``is_causal=True``: PyTorch then uses SDPA's causal flag (no
    weights, no padding) or the mask (otherwise); torchmha does exactly the same."""
    reference, candidate = make_modules(TARGETED, impl)
    query = torch.randn(TARGET_LEN, BATCH, 6, dtype=torch.float64)
    mask = random_mask((TARGET_LEN, TARGET_LEN))
    mask[0, 2] = True  # Not causal-shaped: the two readings of the call differ.
    kwargs: Dict[str, Any] = {"attn_mask": mask, "is_causal": True, "need_weights": need_weights}
    if key_padding:
        kwargs["key_padding_mask"] = random_mask((BATCH, TARGET_LEN))
    leaves, views = [query], lambda ls: (ls[0],) * 3
    expected, cotangents = run(reference, leaves, views, None, kwargs)
    actual, _ = run(candidate, leaves, views, cotangents, kwargs)
    assert_same_results(actual, expected, need_weights)


@pytest.mark.parametrize("impl", ["python", "cpp"])
@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("attn_rank", [2, 3])
def test_float_masks_gradients_match_pytorch(attn_rank: int, need_weights: bool, impl: str) -> None:
    """Float ``attn_mask`` and ``key_padding_mask`` as differentiable inputs: their gradients
    (and everything else) equal PyTorch's."""
    row = dict(TARGETED, kind="cross", is_causal=False, need_weights=need_weights)
    reference, candidate = make_modules(row, impl)
    leaves, views = make_inputs(row)
    groups = BATCH * 3
    attn_shape = (TARGET_LEN, SOURCE_LEN) if attn_rank == 2 else (groups, TARGET_LEN, SOURCE_LEN)
    attn_mask = torch.randn(attn_shape, dtype=torch.float64)
    key_padding_mask = torch.randn(BATCH, SOURCE_LEN, dtype=torch.float64)

    def with_masks(ls: Sequence[Tensor]) -> Tuple[Tensor, ...]:
        return views(ls[:3])

    results = []
    cotangents = None
    for module in (reference, candidate):
        module.zero_grad(set_to_none=True)
        fresh = [t.detach().clone().requires_grad_(True) for t in (*leaves, attn_mask)]
        padding = key_padding_mask.clone().requires_grad_(True)
        output, weights = module(
            *with_masks(fresh),
            attn_mask=fresh[-1],
            key_padding_mask=padding,
            need_weights=need_weights,
        )
        if cotangents is None:
            cotangents = (
                torch.randn_like(output),
                None if weights is None else torch.randn_like(weights),
            )
        loss = (output * cotangents[0]).sum()
        if cotangents[1] is not None:
            loss = loss + (weights * cotangents[1]).sum()
        loss.backward()
        results.append((output, fresh[-1].grad, padding.grad))
    (expected_output, expected_attn_grad, expected_padding_grad) = results[0]
    (output, attn_grad, padding_grad) = results[1]
    assert_close(output, expected_output)
    assert expected_attn_grad is not None and expected_attn_grad.abs().sum() > 0
    assert_close(attn_grad, expected_attn_grad)
    assert_close(padding_grad, expected_padding_grad)


@pytest.mark.parametrize("impl", ["python", "cpp"])
@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("key_is_value", [True, False])
def test_key_expanded_along_the_sequence(key_is_value: bool, need_weights: bool, impl: str) -> None:
    """``key = x[:1].expand(S, N, E)``: every key is one position of the query (stride 0 along the
    sequence); the gradient of ``x`` collects the query's and all the keys' contributions."""
    reference, candidate = make_modules(dict(TARGETED, is_causal=False), impl)
    x = torch.randn(TARGET_LEN, BATCH, 6, dtype=torch.float64)
    other = torch.randn(SOURCE_LEN, BATCH, 6, dtype=torch.float64)

    def views(ls: Sequence[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
        key = ls[0][:1].expand(SOURCE_LEN, BATCH, 6)
        return ls[0], key, key if key_is_value else ls[1]

    leaves = [x] if key_is_value else [x, other]
    kwargs = {"need_weights": need_weights}
    expected, cotangents = run(reference, leaves, views, None, kwargs)
    actual, _ = run(candidate, leaves, views, cotangents, kwargs)
    assert_same_results(actual, expected, need_weights)


EMPTY_SIZES = {"source_len_0": (3, 0, 2), "target_len_0": (0, 4, 2), "batch_0": (3, 4, 0)}


@pytest.mark.parametrize("impl", ["python", "cpp"])
@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("sizes", EMPTY_SIZES.values(), ids=EMPTY_SIZES.keys())
def test_empty_dimensions_match_pytorch(
    sizes: Tuple[int, int, int], need_weights: bool, impl: str
) -> None:
    """Zero keys, zero queries or an empty batch: PyTorch's shapes and values (an empty source
    gives ``out_proj.bias`` rows), and the same (zero) gradients."""
    target_len, source_len, batch = sizes
    reference, candidate = make_modules(dict(TARGETED, is_causal=False), impl)
    query = torch.randn(target_len, batch, 6, dtype=torch.float64)
    key = torch.randn(source_len, batch, 6, dtype=torch.float64)

    def views(ls: Sequence[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
        return ls[0], ls[1], ls[1]

    kwargs = {"need_weights": need_weights}
    expected, cotangents = run(reference, [query, key], views, None, kwargs)
    actual, _ = run(candidate, [query, key], views, cotangents, kwargs)
    assert actual[0].shape == expected[0].shape
    if need_weights:
        assert actual[1] is not None and expected[1] is not None
        assert actual[1].shape == expected[1].shape
    assert_same_results(actual, expected, need_weights)
