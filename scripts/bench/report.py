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
    cases = sorted(
        {(r["dtype"], r["shape"]) for r in rows}, key=lambda c: (c[0], c[1][1] * c[1][2])
    )
    measure = {
        "x_torch": _x_torch_goal,
        "x_libtorch": _x_libtorch_goal,
        "gemm_fraction": _gemm_fraction_goal,
        "cpp_below_python": _cpp_below_python_goal,
        "x_fastest_peer": _x_fastest_peer_goal,
        "peak_below_peers": _peak_below_peers_goal,
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
            "speed vs fastest peer (x)"
            if ratio_key == "x_fastest_peer"
            else "speed vs torch.nn.MHA (x)"
        )
        axis.set_title(f"{dtype}, {mode}")
    axes[0, 0].legend(fontsize=7, ncol=3)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    return True
