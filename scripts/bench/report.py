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
    batch, seq, embed, _ = shape
    return batch * seq * seq * embed


def goals(rows: List[dict], device: str, table: Optional[List[dict]] = None) -> List[str]:
    """The performance goals of ``table`` (goals.json when None) that apply to ``device``, each
    stated with what was measured (never asserted), and with the ratio's bound at the GEMM peak
    (``peak_bound``)."""
    cases = sorted(
        {(r["dtype"], r["shape"]) for r in rows}, key=lambda c: (c[0], c[1][1] * c[1][2])
    )
    measure = {
        "x_torch": _x_torch_goal,
        "x_libtorch": _x_libtorch_goal,
        "gemm_fraction": _gemm_fraction_goal,
        "cpp_below_python": _cpp_below_python_goal,
    }
    lines = []
    for goal in load_goals() if table is None else table:
        if device in goal.get("devices", [device]):
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


def plot(rows: List[dict], path: str, title: str) -> bool:
    """Bar chart of each candidate's speed relative to torch.nn.MultiheadAttention; False when
    matplotlib is not installed."""
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
                values.append(row["x_torch"] if row and row.get("x_torch") else 0.0)
            positions = [j + i * width for j in range(len(shapes))]
            axis.bar(positions, values, width, label=candidate)
        axis.axhline(1.0, color="black", linewidth=0.8)
        axis.set_xticks([j + 0.4 - width / 2 for j in range(len(shapes))])
        axis.set_xticklabels([str(s) for s in shapes])
        axis.set_ylabel("speed vs torch.nn.MHA (x)")
        axis.set_title(f"{dtype}, {mode}")
    axes[0, 0].legend(fontsize=7, ncol=3)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    return True
