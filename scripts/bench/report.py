"""Turns benchmark measurements into ratios, a Markdown table, the goals as measured, and a plot."""

import json
import os
from typing import Dict, List, Optional

TORCH_BEST = "torch_mha"
TORCH_WEIGHTS = "torch_mha_weights"


def forward_flops(batch: int, seq: int, embed: int) -> int:
    """Self-attention forward: four (seq x embed x embed) projections and two (seq x seq x embed)
    attention products per batch entry, two FLOPs per multiply-add."""
    return 8 * batch * seq * embed * embed + 4 * batch * seq * seq * embed


def gqa_forward_flops(batch: int, seq: int, embed: int, heads: int, kv_heads: int) -> int:
    """Causal grouped-query self-attention forward: the q and output projections (embed x embed),
    the key and value projections (embed x kv_dim), and half of the two attention products (the
    causal half that has to be computed), two FLOPs per multiply-add."""
    kv_dim = kv_heads * (embed // heads)
    return (
        2 * batch * seq * (2 * embed * embed + 2 * embed * kv_dim) + 2 * batch * seq * seq * embed
    )


def add_gqa_ratios(rows: List[dict], peers: tuple, gemm_peak_tflops: float) -> None:
    """Adds, per row of the grouped-query suite: the fastest peer's median time over the row's
    (``x_fastest_peer``, with the same ratio round by round against that peer), the name of that
    peer, and the achieved fraction of the GEMM peak (training counts three forwards' FLOPs). Rows
    of torchmha also get their peak memory over the lowest peer's (``peak_vs_lowest_peer``)."""
    by_case: Dict[tuple, Dict[str, dict]] = {}
    for row in rows:
        by_case.setdefault(row["case"], {})[row["candidate"]] = row
    for case in by_case.values():
        timed_peers = [case[name] for name in peers if name in case]
        fastest = min(timed_peers, key=lambda r: r["median_ms"]) if timed_peers else None
        # Tiny shapes read 0 (their tensors fit in memory already resident): no ratio then.
        measured_peaks = [r["peak_bytes"] for r in timed_peers if r.get("peak_bytes")]
        for row in case.values():
            row["fastest_peer"] = fastest["candidate"] if fastest else None
            row["x_fastest_peer"] = fastest["median_ms"] / row["median_ms"] if fastest else None
            row["x_fastest_peer_rounds"] = (
                _round_ratios(fastest["samples_ms"], row["samples_ms"]) if fastest else None
            )
            ours = row.get("peak_bytes")
            row["peak_vs_lowest_peer"] = (
                ours / min(measured_peaks)
                if row["candidate"] == "torchmha" and ours and measured_peaks
                else None
            )
            shape = (row["batch"], row["seq"], row["embed"], row["heads"], row["kv_heads"])
            flops = gqa_forward_flops(*shape) * (3 if row["mode"] == "training" else 1)
            row["tflops"] = flops / row["median_ms"] / 1e9
            row["fraction_of_gemm_peak"] = row["tflops"] / gemm_peak_tflops


def add_ratios(rows: List[dict], weights_candidates: set, gemm_peak_tflops: float) -> None:
    """Adds, per row: the ratio to torch.nn.MultiheadAttention (its faster setting, or its
    need_weights=True path for candidates that return weights), to the chapter's module, and the
    achieved fraction of the GEMM peak (training counts three forwards' FLOPs)."""
    by_case: Dict[tuple, Dict[str, dict]] = {}
    for row in rows:
        by_case.setdefault(row["case"], {})[row["candidate"]] = row
    for case in by_case.values():
        settings = [case[name] for name in (TORCH_BEST, TORCH_WEIGHTS) if name in case]
        faster = min(settings, key=lambda setting: setting["median_ms"]) if settings else {}
        for row in case.values():
            weights = row["candidate"] in weights_candidates
            reference_row = case.get(TORCH_WEIGHTS, {}) if weights else faster
            reference = reference_row.get("median_ms")
            reference_rounds = reference_row.get("samples_ms")
            chapter = case.get("chapter", {}).get("median_ms")
            row["x_torch"] = reference / row["median_ms"] if reference else None
            paired = row.get("timed_in_rounds", True)
            row["x_torch_rounds"] = (
                _round_ratios(reference_rounds, row["samples_ms"]) if paired else None
            )
            row["x_chapter"] = chapter / row["median_ms"] if chapter else None
            flops = forward_flops(row["batch"], row["seq"], row["embed"])
            flops *= 3 if row["mode"] == "training" else 1
            row["tflops"] = flops / row["median_ms"] / 1e9
            row["fraction_of_gemm_peak"] = row["tflops"] / gemm_peak_tflops


def _round_ratios(reference_ms: Optional[List[float]], samples_ms: List[float]):
    """Round by round, the reference's time over the candidate's, where both ran in every round
    (their medians' ratio lies between the smallest and the largest of these)."""
    if not reference_ms or len(reference_ms) != len(samples_ms):
        return None
    return [reference / ours for reference, ours in zip(reference_ms, samples_ms)]


def _fmt(value: Optional[float], spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown_table(rows: List[dict]) -> str:
    lines = [
        "| dtype | shape (B, L, E, H) | mode | candidate | median ms | x torch | x chapter "
        "| % GEMM peak | peak MiB |",
        "|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        peak = row.get("peak_bytes")
        lines.append(
            f"| {row['dtype']} | {row['batch']}, {row['seq']}, {row['embed']}, {row['heads']} "
            f"| {row['mode']} | {row['candidate']} | {row['median_ms']:.3f} "
            f"| {_fmt(row.get('x_torch'), '.2f')} | {_fmt(row.get('x_chapter'), '.2f')} "
            f"| {100 * row['fraction_of_gemm_peak']:.1f} "
            f"| {_fmt(None if peak is None else peak / 2**20, '.1f')} |"
        )
    return "\n".join(lines)


def _mib(value: Optional[int]) -> str:
    return "-" if value is None else f"{value / 2**20:.1f}"


def gqa_markdown_table(rows: List[dict]) -> str:
    lines = [
        "| dtype | shape (B, L, E, H, KV) | mode | candidate | median ms | x fastest peer "
        "| % GEMM peak | peak MiB | max diff |",
        "|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        shape = ", ".join(str(v) for v in row["shape"])
        lines.append(
            f"| {row['dtype']} | {shape} | {row['mode']} | {row['candidate']} "
            f"| {row['median_ms']:.3f} | {_fmt(row.get('x_fastest_peer'), '.2f')} "
            f"| {100 * row['fraction_of_gemm_peak']:.1f} | {_mib(row.get('peak_bytes'))} "
            f"| {_fmt(row.get('max_abs_diff_vs_torchmha'), '.1e')} |"
        )
    return "\n".join(lines)


GQA_SUMMARY_PEERS = ("sdpa_gqa", "llama_eager", "llama_sdpa")


def gqa_summary_table(rows: List[dict]) -> str:
    """One line per (dtype, shape, mode): every candidate's median time and peak memory, and
    torchmha's ratios to the fastest peer and to the lowest peer memory."""
    names = ("torchmha",) + GQA_SUMMARY_PEERS
    lines = [
        "| dtype | (B, L, E, H, KV) | mode | "
        + " | ".join(f"{name} ms" for name in names)
        + " | x fastest peer | "
        + " | ".join(f"{name} MiB" for name in names)
        + " | memory vs lowest peer |",
        "|---|---|---|" + "---:|" * (2 * len(names) + 2),
    ]
    for case in dict.fromkeys(r["case"] for r in rows):
        dtype, shape, mode = case
        by_name = {r["candidate"]: r for r in rows if r["case"] == case}
        ours = by_name.get("torchmha", {})
        times = [_fmt(by_name.get(n, {}).get("median_ms"), ".1f") for n in names]
        peaks = [_mib(by_name.get(n, {}).get("peak_bytes")) for n in names]
        ratio = ours.get("x_fastest_peer")
        fastest = f" ({ours['fastest_peer']})" if ratio is not None else ""
        lines.append(
            f"| {dtype} | {', '.join(map(str, shape))} | {mode} | "
            + " | ".join(times)
            + f" | {_fmt(ratio, '.2f')}{fastest} | "
            + " | ".join(peaks)
            + f" | {_fmt(ours.get('peak_vs_lowest_peer'), '.2f')} |"
        )
    return "\n".join(lines)


DECODE_REFERENCE = "torchmha"
DECODE_COLUMNS = (
    "torchmha",
    "torchmha_compiled",
    "torch_mha_recompute",
    "sdpa_cache",
    "sdpa_cache_compiled",
    "llama_static",
    "torchmha_cpp",
    "torchmha_cpp_graph",
)


def add_decode_ratios(rows: List[dict], gemm_peak_tflops: float, bandwidth: float) -> None:
    """Adds, per row of the decoding suite: the candidate's median time over torchmha's
    (``torchmha_speedup``, with the same ratio round by round), the bytes a step reads over its
    time (``bytes_per_s``) and as a fraction of the measured copy ``bandwidth``, whether those bytes
    at that bandwidth take longer than the step's FLOPs at the GEMM peak (``bytes_dominate``), and
    the achieved fraction of the GEMM peak."""
    by_case: Dict[tuple, Dict[str, dict]] = {}
    for row in rows:
        by_case.setdefault(row["case"], {})[row["candidate"]] = row
    for case in by_case.values():
        ours = case.get(DECODE_REFERENCE)
        for row in case.values():
            seconds = row["median_ms"] / 1e3
            step_bytes = row["step_cache_bytes"] + row["step_weight_bytes"]
            row["torchmha_speedup"] = row["median_ms"] / ours["median_ms"] if ours else None
            # Round by round only where both ran in the same rounds (not a separate process).
            paired = ours and row.get("timed_in_rounds", True) and ours.get("timed_in_rounds", True)
            row["torchmha_speedup_rounds"] = (
                _round_ratios(row["samples_ms"], ours["samples_ms"]) if paired else None
            )
            row["bytes_per_s"] = step_bytes / seconds
            row["fraction_of_bandwidth"] = row["bytes_per_s"] / bandwidth
            row["bytes_dominate"] = step_bytes / bandwidth > row["step_flops"] / (
                gemm_peak_tflops * 1e12
            )
            row["tflops"] = row["step_flops"] / seconds / 1e12
            row["fraction_of_gemm_peak"] = row["tflops"] / gemm_peak_tflops


def _shape_text(row: dict) -> str:
    return ", ".join(str(v) for v in row["shape"])


def decode_markdown_table(rows: List[dict]) -> str:
    lines = [
        "| (B, prompt, E, H, KV) | max_seq_len | candidate | median ms | speedup of torchmha "
        "| GB/s | % bw | % GEMM peak | peak KiB | max diff |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        peak = row.get("peak_bytes")
        lines.append(
            f"| {_shape_text(row)} | {row['max_seq_len']} | {row['candidate']} "
            f"| {row['median_ms']:.3f} | {_fmt(row.get('torchmha_speedup'), '.2f')} "
            f"| {row['bytes_per_s'] / 1e9:.2f} | {100 * row['fraction_of_bandwidth']:.1f} "
            f"| {100 * row['fraction_of_gemm_peak']:.1f} "
            f"| {_fmt(None if peak is None else peak / 1024, '.0f')} "
            f"| {_fmt(row.get('max_abs_diff_vs_torchmha'), '.1e')} |"
        )
    return "\n".join(lines)


def decode_summary_table(rows: List[dict]) -> str:
    """One line per shape: every candidate's median ms per generated token, torchmha's speedups
    over the peers, its bandwidth fraction, the bytes a step reads, and memory: the cache, one
    step's activations and torchmha's step peak."""
    lines = [
        "| (B, prompt, E, H, KV) | "
        + " | ".join(f"{name} ms" for name in DECODE_COLUMNS)
        + " | x nn.MHA | x eager | x compiled | x Llama | compiled x compiled "
        "| C++ graph x compiled | bytes/step MiB | torchmha GB/s (% bw) | bytes dominate "
        "| cache MiB | activations KiB | torchmha peak KiB |",
        "|---|" + "---:|" * (len(DECODE_COLUMNS) + 12),
    ]
    for case in dict.fromkeys(r["case"] for r in rows):
        by_name = {r["candidate"]: r for r in rows if r["case"] == case}
        ours = by_name.get(DECODE_REFERENCE)
        if ours is None:
            continue
        times = [_fmt(by_name.get(n, {}).get("median_ms"), ".3f") for n in DECODE_COLUMNS]
        speedups = [
            _fmt(by_name.get(n, {}).get("torchmha_speedup"), ".2f")
            for n in ("torch_mha_recompute", "sdpa_cache", "sdpa_cache_compiled", "llama_static")
        ]
        # torchmha's compiled step and its C++ graph replay against the compiled Python cache.
        speedups += [
            _fmt(_time_ratio(by_name.get("sdpa_cache_compiled"), by_name.get(n)), ".2f")
            for n in ("torchmha_compiled", "torchmha_cpp_graph")
        ]
        step_bytes = ours["step_cache_bytes"] + ours["step_weight_bytes"]
        peak = ours.get("peak_bytes")
        lines.append(
            f"| {_shape_text(ours)} | "
            + " | ".join(times)
            + " | "
            + " | ".join(speedups)
            + f" | {step_bytes / 2**20:.1f} | {ours['bytes_per_s'] / 1e9:.2f} "
            f"({100 * ours['fraction_of_bandwidth']:.0f} %) "
            f"| {'yes' if ours['bytes_dominate'] else 'no'} "
            f"| {ours['step_cache_bytes'] / 2**20:.1f} "
            f"| {ours['step_activation_bytes'] / 1024:.0f} "
            f"| {_fmt(None if peak is None else peak / 1024, '.0f')} |"
        )
    return "\n".join(lines)


def _time_ratio(reference: Optional[dict], row: Optional[dict]) -> Optional[float]:
    """The reference's median time over the row's (None where either is missing)."""
    if not reference or not row:
        return None
    return reference["median_ms"] / row["median_ms"]


def decode_breakdown_table(rows: List[dict]) -> str:
    """Where each profiled step goes: self CPU ms per step of its ATen ops, by part."""
    parts = ("attention", "projections", "cache writes", "rest", "total")
    lines = [
        "| (B, prompt, E, H, KV) | candidate | " + " | ".join(f"{p} ms" for p in parts) + " |",
        "|---|---|" + "---:|" * len(parts),
    ]
    for row in rows:
        profiled = row.get("profile_ms_per_step")
        if profiled:
            lines.append(
                f"| {_shape_text(row)} | {row['candidate']} | "
                + " | ".join(f"{profiled[p]:.3f}" for p in parts)
                + " |"
            )
    return "\n".join(lines) if len(lines) > 2 else ""


def _find(rows, candidate, mode, shape, dtype):
    for row in rows:
        if (row["candidate"], row["mode"], row["shape"], row["dtype"]) == (
            candidate,
            mode,
            shape,
            dtype,
        ):
            return row
    return None


def peak_bound(ratio: float, row: dict) -> float:
    """The ratio ``row``'s candidate would reach at 100 % of the measured GEMM peak: the
    reference's time over the time the case's FLOPs take at that peak. Above it, a goal needs the
    same arithmetic done faster than the machine's measured GEMM rate."""
    return ratio / row["fraction_of_gemm_peak"]


GOALS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "goals.json")


def load_goals(path: str = GOALS_FILE) -> List[dict]:
    """The performance goals: one entry each, ``kind`` says how it is measured (goals.json)."""
    with open(path, encoding="utf-8") as file:
        return json.load(file)


def _workload(shape: tuple) -> int:
    batch, seq, embed = shape[:3]
    return batch * seq * seq * embed


def goals(
    rows: List[dict], device: str, table: Optional[List[dict]] = None, suite: str = "mha"
) -> List[str]:
    """The performance goals of ``table`` (goals.json when None) that apply to ``device`` and to
    the benchmark ``suite`` (a goal's ``suite``, "mha" when absent), each stated with what was
    measured (never asserted), and with the ratio's bound at the GEMM peak (``peak_bound``)."""
    # The shape last: cases of equal size come in one order however the rows were gathered.
    cases = sorted(
        {(r["dtype"], r["shape"]) for r in rows}, key=lambda c: (c[0], c[1][1] * c[1][2], c[1])
    )
    measure = {
        "x_torch": _x_torch_goal,
        "x_libtorch": _x_libtorch_goal,
        "gemm_fraction": _gemm_fraction_goal,
        "cpp_below_python": _cpp_below_python_goal,
        "x_fastest_peer": _x_fastest_peer_goal,
        "peak_below_peers": _peak_below_peers_goal,
        "decode_speedup": _decode_speedup_goal,
        "decode_bandwidth": _decode_bandwidth_goal,
        "decode_peak_memory": _decode_peak_memory_goal,
    }
    lines = []
    for goal in load_goals() if table is None else table:
        if device in goal.get("devices", [device]) and goal.get("suite", "mha") == suite:
            lines.extend(measure[goal["kind"]](goal, rows, cases, device))
    return lines


def _x_torch_goal(goal: dict, rows: List[dict], cases: list, device: str) -> List[str]:
    measured = []
    for dtype, shape in cases:
        row = _find(rows, goal["candidate"], goal["mode"], shape, dtype)
        if shape[1] >= goal.get("min_seq", 0) and row and row.get("x_torch") is not None:
            spread = row.get("x_torch_rounds")
            rounds = f"rounds {min(spread):.2f}-{max(spread):.2f}; " if spread else ""
            bound = peak_bound(row["x_torch"], row)
            text = f"{dtype} {shape}: {row['x_torch']:.2f}x ({rounds}bound {bound:.2f}x)"
            measured.append((text, row["x_torch"]))
    if not measured:
        return []
    met = all(ratio >= goal["at_least"] for _, ratio in measured)
    return [
        f"- {goal['title']} (goal >= {goal['at_least']}x): {'met' if met else 'NOT met'}; "
        + ", ".join(text for text, _ in measured)
    ]


def _x_fastest_peer_goal(goal: dict, rows: List[dict], cases: list, device: str) -> List[str]:
    measured = []
    for dtype, shape in cases:
        row = _find(rows, goal["candidate"], goal["mode"], shape, dtype)
        if row and row.get("x_fastest_peer") is not None:
            spread = row.get("x_fastest_peer_rounds")
            rounds = f"rounds {min(spread):.2f}-{max(spread):.2f}; " if spread else ""
            bound = peak_bound(row["x_fastest_peer"], row)
            text = (
                f"{dtype} {shape}: {row['x_fastest_peer']:.2f}x vs {row['fastest_peer']} "
                f"({rounds}bound {bound:.2f}x)"
            )
            measured.append((text, row["x_fastest_peer"]))
    if not measured:
        return []
    met = all(ratio >= goal["at_least"] for _, ratio in measured)
    return [
        f"- {goal['title']} (goal >= {goal['at_least']}x): {'met' if met else 'NOT met'}; "
        + ", ".join(text for text, _ in measured)
    ]


def _peak_below_peers_goal(goal: dict, rows: List[dict], cases: list, device: str) -> List[str]:
    measured = []
    for dtype, shape in cases:
        for mode in goal["modes"]:
            row = _find(rows, goal["candidate"], mode, shape, dtype)
            if row and row.get("peak_vs_lowest_peer") is not None:
                text = f"{dtype} {shape} {mode}: {row['peak_vs_lowest_peer']:.2f}x"
                measured.append((text, row["peak_vs_lowest_peer"]))
    if not measured:
        return []
    met = all(ratio < goal["below"] for _, ratio in measured)
    return [
        f"- {goal['title']} (goal < {goal['below']}x the lowest peer's): "
        f"{'met' if met else 'NOT met'}; " + ", ".join(text for text, _ in measured)
    ]


def _decode_speedup_goal(goal: dict, rows: List[dict], cases: list, device: str) -> List[str]:
    """A torchmha candidate (``candidate``, torchmha by default) against one peer: the peer's
    median time over the candidate's, at least ``at_least``, at prompts of ``min_prompt`` or
    more; with the same ratio round by round where both ran in the rounds."""
    measured = []
    for dtype, shape in cases:
        peer = _find(rows, goal["peer"], "inference", shape, dtype)
        ours = _find(rows, goal.get("candidate", DECODE_REFERENCE), "inference", shape, dtype)
        if shape[1] >= goal.get("min_prompt", 0) and peer and ours:
            ratio = peer["median_ms"] / ours["median_ms"]
            in_rounds = peer.get("timed_in_rounds", True) and ours.get("timed_in_rounds", True)
            spread = _round_ratios(peer["samples_ms"], ours["samples_ms"]) if in_rounds else None
            rounds = f" (rounds {min(spread):.2f}-{max(spread):.2f})" if spread else ""
            text = f"{shape}: {ratio:.2f}x{rounds}"
            measured.append((text, ratio))
    if not measured:
        return []
    # "within" a fraction of the peer's time: torchmha's time <= (1 + within) x the peer's.
    within = goal.get("within")
    least = 1 / (1 + within) if within is not None else goal["at_least"]
    stated = (
        f"goal: within {within:.0%} of its time, >= {least:.2f}x"
        if within
        else (f"goal >= {least}x")
    )
    met = all(ratio >= least for _, ratio in measured)
    return [
        f"- {goal['title']} ({stated}): {'met' if met else 'NOT met'}; "
        + ", ".join(text for text, _ in measured)
    ]


def _decode_bandwidth_goal(goal: dict, rows: List[dict], cases: list, device: str) -> List[str]:
    """A torchmha step (``candidate``, torchmha by default), at prompts of ``min_prompt`` or more:
    the bytes it reads over its time, as a fraction of the measured copy bandwidth, where those
    bytes dominate the step (the others are listed, not judged)."""
    judged, listed = [], []
    candidate = goal.get("candidate", DECODE_REFERENCE)
    for dtype, shape in cases:
        row = _find(rows, candidate, "inference", shape, dtype)
        if shape[1] < goal.get("min_prompt", 0):
            continue
        if row and row.get("fraction_of_bandwidth") is not None:
            text = f"{shape}: {row['fraction_of_bandwidth']:.0%}"
            (judged if row["bytes_dominate"] else listed).append((text, row))
    if not judged and not listed:
        return []
    met = all(row["fraction_of_bandwidth"] >= goal["at_least"] for _, row in judged)
    line = f"- {goal['title']} (goal >= {goal['at_least']:.0%} where bytes dominate): " + (
        f"{'met' if met else 'NOT met'}; " + ", ".join(text for text, _ in judged)
        if judged
        else "no case where bytes dominate"
    )
    if listed:
        line += "; FLOPs dominate (not judged): " + ", ".join(text for text, _ in listed)
    return [line]


def _decode_peak_memory_goal(goal: dict, rows: List[dict], cases: list, device: str) -> List[str]:
    """torchmha's step peak above what was held before it (the cache among it) against one
    step's activations: cache + peak <= cache + activations."""
    measured = []
    for dtype, shape in cases:
        row = _find(rows, "torchmha", "inference", shape, dtype)
        if row and row.get("peak_bytes") is not None:
            cache = row["step_cache_bytes"] / 2**20
            text = (
                f"{shape}: cache {cache:.1f} MiB + step {row['peak_bytes'] / 1024:.0f} KiB "
                f"(activations {row['step_activation_bytes'] / 1024:.0f} KiB)"
            )
            measured.append((text, row["peak_bytes"] <= row["step_activation_bytes"]))
    if not measured:
        return []
    met = all(ok for _, ok in measured)
    return [
        f"- {goal['title']} (goal: cache + step peak <= cache + one step's activations): "
        f"{'met' if met else 'NOT met'}; " + ", ".join(text for text, _ in measured)
    ]


def _x_libtorch_goal(goal: dict, rows: List[dict], cases: list, device: str) -> List[str]:
    mode = goal["mode"]
    largest = sorted({c[1] for c in cases}, key=_workload)[-goal["largest_shapes"] :]
    measured = []
    for dtype, shape in cases:
        ours = _find(rows, "torchmha", mode, shape, dtype)
        theirs = _find(rows, "libtorch_mha", mode, shape, dtype)
        if shape in largest and ours and theirs:
            ratio = theirs["median_ms"] / ours["median_ms"]
            measured.append((dtype, shape, ratio, peak_bound(ratio, ours)))
    if not measured:
        return []
    met = all(m[2] >= goal["at_least"] for m in measured)
    return [
        f"- vs LibTorch's torch::nn::MultiheadAttention, {mode}, two largest shapes "
        f"(goal >= {goal['at_least']:g}x): {'met' if met else 'NOT met'}; "
        + ", ".join(f"{d} {s}: {r:.2f}x (bound {b:.2f}x)" for d, s, r, b in measured)
    ]


def _gemm_fraction_goal(goal: dict, rows: List[dict], cases: list, device: str) -> List[str]:
    dtype = goal["dtype"]
    big = [c for c in cases if c[0] == dtype]
    if not big:
        return []
    shape = max((c[1] for c in big), key=_workload)
    row = _find(rows, "torchmha", "inference", shape, dtype)
    if not row:
        return []
    fraction = row["fraction_of_gemm_peak"]
    rate = (
        f"{row['tflops']:.0f} TFLOP/s" if device == "cuda" else f"{row['tflops'] * 1e3:.1f} GFLOP/s"
    )
    met = fraction >= goal["at_least"]
    return [
        f"- {dtype} {shape} inference at >= {goal['at_least']:.0%} of the measured GEMM peak: "
        f"{'met' if met else 'NOT met'}; {fraction:.1%} ({rate})"
    ]


def _cpp_below_python_goal(goal: dict, rows: List[dict], cases: list, device: str) -> List[str]:
    smallest = min({c[1] for c in cases}, key=_workload)
    lines = []
    for dtype, shape in cases:
        cpp = _find(rows, "torchmha_cpp_loop", "inference", shape, dtype)
        python = _find(rows, "torchmha", "inference", shape, dtype)
        if shape == smallest and cpp and python:
            lines.append(
                f"- Pure C++ call at {dtype} {shape}, inference: {cpp['median_ms'] * 1e3:.1f} us "
                f"vs {python['median_ms'] * 1e3:.1f} us from the Python module "
                f"({'below' if cpp['median_ms'] < python['median_ms'] else 'NOT below'})"
            )
    return lines


def plot(rows: List[dict], path: str, title: str, ratio_key: str = "x_torch") -> bool:
    """Bar chart of each candidate's speed relative to torch.nn.MultiheadAttention (``x_torch``)
    or to the fastest grouped-query peer (``x_fastest_peer``); False when matplotlib is not
    installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    panels = sorted({(r["dtype"], r["mode"]) for r in rows})
    figure, axes = plt.subplots(len(panels), 1, figsize=(11, 3.6 * len(panels)), squeeze=False)
    for axis, (dtype, mode) in zip(axes[:, 0], panels):
        selected = [r for r in rows if (r["dtype"], r["mode"]) == (dtype, mode)]
        shapes = sorted({r["shape"] for r in selected}, key=lambda s: s[0] * s[1] * s[1] * s[2])
        candidates = list(dict.fromkeys(r["candidate"] for r in selected))
        width = 0.8 / len(candidates)
        for i, candidate in enumerate(candidates):
            values = []
            for shape in shapes:
                row = _find(selected, candidate, mode, shape, dtype)
                values.append(row[ratio_key] if row and row.get(ratio_key) else 0.0)
            positions = [j + i * width for j in range(len(shapes))]
            axis.bar(positions, values, width, label=candidate)
        axis.axhline(1.0, color="black", linewidth=0.8)
        axis.set_xticks([j + 0.4 - width / 2 for j in range(len(shapes))])
        axis.set_xticklabels([str(s) for s in shapes])
        axis.set_ylabel(
            {
                "x_fastest_peer": "speed vs fastest peer (x)",
                "torchmha_speedup": "time / torchmha's time (x)",
            }.get(ratio_key, "speed vs torch.nn.MHA (x)")
        )
        if ratio_key == "torchmha_speedup":
            axis.set_yscale("log")  # nn.MultiheadAttention's recomputation is 10-100x slower
        axis.set_title(f"{dtype}, {mode}")
    axes[0, 0].legend(fontsize=7, ncol=3)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    return True
