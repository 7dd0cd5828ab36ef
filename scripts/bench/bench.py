"""Benchmark: torchmha against every peer, measured side by side in one run.

Candidates (same weights, same input, self-attention, batch-first): torchmha from Python (with and
without weights), its C++ module through pybind11, a pure C++ loop, the textbook adapter,
torch.nn.MultiheadAttention (need_weights False and True), the chapter's module and LibTorch's
torch::nn::MultiheadAttention. Modes: inference (eval, inference_mode) and training
(forward + backward). Candidates take turns round by round, so drifting load hits all alike; each
figure is the median over rounds of the mean of back-to-back calls (CUDA events on a GPU).

The grouped-query suite (--suite gqa) times torchmha with num_kv_heads and rope_theta (causal
self-attention, need_weights=False) against the same block written in Python on SDPA with
enable_gqa and against transformers' LlamaAttention (eager and SDPA), on the same weights.

The decoding suite (--suite decode) times one generated token of that attention with a key/value
cache: torchmha with torchmha.KVCache against nn.MultiheadAttention recomputing the whole prefix,
a static cache in Python on SDPA (eager and compiled) and LlamaAttention with StaticCache, and
torchmha's step from the C++ loop (on a GPU also captured into a CUDA graph); it measures the
device's copy bandwidth in the same run. On CUDA it runs in bfloat16 over caches of 1k to 32k
slots, the compiled candidates with CUDA graphs (mode="reduce-overhead").

Usage:
  scripts/bench/bench.py                 # CPU, float32, the CPU shapes
  scripts/bench/bench.py --device cuda   # GPU, bfloat16 and float32, the GPU shapes
  scripts/bench/bench.py --quick         # a tiny smoke run
  scripts/bench/bench.py --suite gqa     # grouped-query attention with rotary embeddings
  scripts/bench/bench.py --suite decode  # one decoding step with a key/value cache
  scripts/bench/bench.py --suite decode --device cuda  # the same on a GPU, bfloat16
Writes <out>/<name>.json, .md and .png (the plot needs matplotlib).
"""

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile

import decode_peers  # this folder is on sys.path when the script runs
import peers
import report
import timing
import torch

import torchmha

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))

CPU_SHAPES = [(1, 16, 256, 4), (32, 128, 512, 8), (8, 512, 512, 8), (2, 2048, 1024, 16)]
GPU_SHAPES = [(1, 16, 256, 4), (32, 128, 512, 8), (8, 1024, 1024, 16), (4, 4096, 2048, 16)]
QUICK_SHAPES = [(2, 8, 32, 4)]
# Grouped-query shapes: (batch, seq, embed, heads, kv_heads).
GQA_CPU_SHAPES = [(8, 512, 1024, 16, 4), (1, 2048, 2048, 32, 8)]
GQA_GPU_SHAPES = GQA_CPU_SHAPES + [(4, 4096, 2048, 16, 4), (2, 8192, 4096, 32, 8)]
GQA_QUICK_SHAPES = [(2, 8, 32, 4, 2)]
# Decoding shapes: (batch, prompt = cache length at the step, embed, heads, kv_heads).
DECODE_CPU_SHAPES = [(1, 512, 1024, 16, 4), (8, 512, 1024, 16, 4)]
DECODE_CPU_SHAPES += [(1, 2048, 1024, 16, 4), (8, 2048, 1024, 16, 4)]
DECODE_CPU_SHAPES += [(1, 512, 2048, 16, 4), (1, 2048, 2048, 16, 4)]
# On a GPU: a Llama-3-8B layer's attention (4096 wide, 32 heads, 8 key/value heads), batch 1, 8
# and 32, caches of 1k to 32k tokens.
DECODE_GPU_SHAPES = [
    (batch, prompt, 4096, 32, 8)
    for batch in (1, 8, 32)
    for prompt in (1024, 4096, 8192, 16384, 32768)
]
DECODE_QUICK_SHAPES = [(2, 16, 32, 4, 2)]
DECODE_CPP_CANDIDATES = ("torchmha_cpp", "torchmha_cpp_graph")
CPP_CANDIDATES = ("torchmha_cpp_loop", "libtorch_mha")
# glibc: serve every allocation above 64 KiB by its own mapping, returned on free.
MEMORY_PROBE_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument(
        "--suite",
        default="mha",
        choices=["mha", "gqa", "decode"],
        help="mha: torchmha against nn.MultiheadAttention and the other MHA peers; gqa: "
        "grouped-query attention with rotary embeddings against its Python and Llama peers; "
        "decode: one generated token with a key/value cache",
    )
    parser.add_argument(
        "--decode-room",
        type=int,
        default=128,
        help="decode suite: cache slots beyond the prompt (max_seq_len = prompt + this)",
    )
    parser.add_argument(
        "--rope-theta", type=float, default=10000.0, help="rotary base of the gqa and decode suites"
    )
    parser.add_argument(
        "--dtypes", help="comma-separated (default: float32 on CPU, bfloat16,float32 on CUDA)"
    )
    parser.add_argument(
        "--shapes",
        nargs="*",
        help="B,L,E,H each, B,L,E,H,KV in the gqa suite, B,PROMPT,E,H,KV in the decode suite "
        "(default: the device's)",
    )
    parser.add_argument("--modes", default="inference,training")
    parser.add_argument("--candidates", help="comma-separated subset (default: all)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument(
        "--target-ms",
        type=float,
        default=150.0,
        help="time each candidate runs back to back per round",
    )
    parser.add_argument("--quick", action="store_true", help="tiny shape, two rounds")
    parser.add_argument(
        "--cpp-bench",
        default=os.path.join(ROOT, "build", "torchmha_bench"),
        help="the C++ timing program (CMake target torchmha_bench)",
    )
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    parser.add_argument("--name", help="file name stem (default: cpu or the GPU's name)")
    parser.add_argument("--plot-from", metavar="JSON", help="only draw the plot of a results file")
    parser.add_argument(
        "--report-from",
        metavar="JSON",
        help="only rewrite a results file's report from its timings",
    )
    parser.add_argument("--memory-probe", metavar="DTYPE,B,L,E,H[,KV],MODE", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        quick = {"gqa": GQA_QUICK_SHAPES, "decode": DECODE_QUICK_SHAPES}.get(
            args.suite, QUICK_SHAPES
        )
        args.shapes = args.shapes or [",".join(map(str, s)) for s in quick]
        args.rounds, args.target_ms = 2, 5.0
    return args


def machine_description(device: torch.device) -> dict:
    description = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "torchmha": torchmha.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu": _cpu_model(),
    }
    try:
        import transformers

        description["transformers"] = transformers.__version__
    except ImportError:
        pass
    try:
        # A copy of the tree (a GPU machine's) may carry a stale .git: the caller then says which.
        description["commit"] = (
            os.environ.get("TORCHMHA_COMMIT")
            or subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"],
                cwd=ROOT,
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
        )
    except (OSError, subprocess.CalledProcessError):
        description["commit"] = "unknown"
    if device.type == "cuda":
        description["gpu"] = torch.cuda.get_device_name(device)
        description["cuda"] = torch.version.cuda
    return description


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def probe_cpu_memory(
    dtype_name, shape, mode, wanted, suite="mha", rope_theta=10000.0, decode_room=128
):
    """Peak memory of one call of each Python candidate, from a fresh process in which every
    allocation above 64 KiB is its own mapping, so the resident set follows what is allocated."""
    probe = ",".join([dtype_name, *map(str, shape), mode])
    command = [sys.executable, os.path.abspath(__file__), "--memory-probe", probe]
    command += ["--candidates", ",".join(wanted), "--threads", str(torch.get_num_threads())]
    command += ["--suite", suite, "--rope-theta", str(rope_theta)]
    command += ["--decode-room", str(decode_room)]
    result = subprocess.run(command, capture_output=True, text=True, env=MEMORY_PROBE_ENV)
    if result.returncode != 0:
        raise RuntimeError(f"memory probe failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.splitlines()[-1])


def probe_gqa_cpu_memory(dtype_name, shape, mode, wanted, rope_theta, apart):
    """``probe_cpu_memory`` for the grouped-query suite: with ``apart``, a fresh process per
    candidate, so none meets the heap another left; else one process for all (quick runs)."""
    if not apart:
        return probe_cpu_memory(dtype_name, shape, mode, sorted(wanted), "gqa", rope_theta)
    peaks = {}
    for name in sorted(wanted):
        peaks.update(probe_cpu_memory(dtype_name, shape, mode, [name], "gqa", rope_theta))
    return peaks


def run_cpp(binary, case_files, heads, device, dtype, mode, threads, rounds, calls, env=None):
    """The C++ candidates in a fresh process: {name: ([ms per round], peak_bytes)}."""
    command = [binary, *case_files, str(heads), device.type, dtype, mode]
    command += [str(threads), str(rounds), str(calls)]
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
    measured = {}
    for line in result.stdout.splitlines():
        entry = json.loads(line)
        measured[entry["candidate"]] = (entry["ms"], entry["peak_bytes"])
    return measured


def run_rounds(args, device, steps, calls, samples, grad_context, after_round=None):
    """``args.rounds`` rounds in which every step takes its turn: appends one mean time per round
    to ``samples[name]``; ``after_round`` runs at the end of each round."""
    order = list(steps)
    for round_index in range(args.rounds):
        # A different candidate goes first each round.
        first = round_index % max(len(order), 1)
        with grad_context():
            for name in order[first:] + order[:first]:
                # One untimed call first: the timed ones then find the memory this candidate
                # frees, not what the one before it left (fresh pages cost 30-60 % at some CPU
                # shapes, scripts/bench/NOTES.md).
                steps[name]()
                samples[name].append(timing.milliseconds_per_call(steps[name], device, calls[name]))
        if after_round is not None:
            after_round()


def prepare_steps(candidates, training, device, target_ms, label):
    """Step functions, each warmed up, and how many calls fill ``target_ms``; a candidate that
    fails (out of memory, say) is reported and left out. Returns (steps, calls, peaks): peaks
    holds the allocator's peak per call on a GPU."""
    for candidate in candidates.values():
        for module in candidate.modules:
            module.train(training)
    steps = {name: peers.step_function(c, training) for name, c in candidates.items()}
    peaks, calls = {}, {}
    grad_context = torch.enable_grad if training else torch.inference_mode
    with grad_context():
        for name, step in list(steps.items()):
            try:
                step()  # warm-up
                if device.type == "cuda":
                    peaks[name] = timing.peak_memory_bytes(step, device)
                calls[name] = timing.calls_for(step, device, target_ms)
            except RuntimeError as error:  # out of memory, say: report it, go on without it
                print(f"bench: {name} left out of {label}: {error}"[:500])
                del steps[name]
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    return steps, calls, peaks


def bench_case(args, device, dtype_name, shape, mode, wanted, workdir):
    """Every candidate on one (dtype, shape, mode): a list of result rows."""
    batch, seq, embed, heads = shape
    dtype = getattr(torch, dtype_name)
    training = mode == "training"
    torch.manual_seed(0)
    state = torch.nn.MultiheadAttention(embed, heads).state_dict()
    x_cpu = torch.randn(batch, seq, embed)
    x = x_cpu.to(device, dtype).requires_grad_(training)
    candidates = {
        name: c
        for name, c in peers.python_candidates(embed, heads, state, x).items()
        if name in wanted
    }
    label = f"{dtype_name} {shape} {mode}"
    steps, calls, peaks = prepare_steps(candidates, training, device, args.target_ms, label)
    samples = {name: [] for name in steps}
    grad_context = torch.enable_grad if training else torch.inference_mode
    if args.memory_probe:
        with grad_context():
            return {name: timing.peak_memory_bytes(step, device) for name, step in steps.items()}
    if device.type == "cpu":
        peaks.update(probe_cpu_memory(dtype_name, shape, mode, wanted))

    use_cpp = any(name in wanted for name in CPP_CANDIDATES) and os.path.exists(args.cpp_bench)
    if use_cpp:
        state_path = os.path.join(workdir, "state_dict.pt")
        input_path = os.path.join(workdir, "input.pt")
        torch.save(dict(state), state_path)  # a plain dict, which LibTorch reads
        torch.save(x_cpu, input_path)
        cpp_calls = calls.get("torchmha", max(calls.values(), default=1))
        for name in CPP_CANDIDATES:
            samples[name] = []
        case_files = (state_path, input_path)
        cpp_args = (args.cpp_bench, case_files, heads, device, dtype_name, mode, args.threads)
        try:
            if device.type == "cpu":
                measured = run_cpp(*cpp_args, 1, 1, env=MEMORY_PROBE_ENV)
                peaks.update({name: peak for name, (_, peak) in measured.items()})
        except RuntimeError as error:
            print(f"bench: the C++ candidates are left out of {shape} {mode}: {error}"[:1500])
            use_cpp = False

    def cpp_round():
        # On the CPU a fresh process every round, so it shares the round's machine load.
        for name, (ms, _) in run_cpp(*cpp_args, 1, cpp_calls).items():
            samples[name].extend(ms)

    cpu_cpp = use_cpp and device.type == "cpu"
    run_rounds(args, device, steps, calls, samples, grad_context, cpp_round if cpu_cpp else None)
    if use_cpp and device.type == "cuda":
        try:
            for name, (ms, _) in run_cpp(*cpp_args, args.rounds, cpp_calls).items():
                samples[name].extend(ms)
        except RuntimeError as error:
            print(f"bench: the C++ candidates are left out of {shape} {mode}: {error}"[:1500])

    rows = []
    for name, values in samples.items():
        if name not in wanted or not values:
            continue
        rows.append(
            {
                "dtype": dtype_name,
                "batch": batch,
                "seq": seq,
                "embed": embed,
                "heads": heads,
                "shape": shape,
                "case": (dtype_name, shape, mode),
                "mode": mode,
                "candidate": name,
                "description": peers.DESCRIPTIONS[name],
                "median_ms": timing.median(values),
                "samples_ms": values,
                # On a GPU the C++ program runs after the rounds, not in turn within them.
                "timed_in_rounds": not (device.type == "cuda" and name in CPP_CANDIDATES),
                "peak_bytes": peaks.get(name),
            }
        )
    return rows


def bench_gqa_case(args, device, dtype_name, shape, mode, wanted):
    """torchmha and its grouped-query peers on one (dtype, shape, mode): a list of result rows.
    Each row also records how far the candidate's output lies from torchmha's (same weights)."""
    batch, seq, embed, heads, kv_heads = shape
    training = mode == "training"
    torch.manual_seed(0)
    x = torch.randn(batch, seq, embed).to(device, getattr(torch, dtype_name))
    x.requires_grad_(training)
    candidates = {
        name: c
        for name, c in peers.gqa_candidates(embed, heads, kv_heads, args.rope_theta, x).items()
        if name in wanted
    }
    label = f"{dtype_name} {shape} {mode}"
    steps, calls, peaks = prepare_steps(candidates, training, device, args.target_ms, label)
    grad_context = torch.enable_grad if training else torch.inference_mode
    if args.memory_probe:
        with grad_context():
            return {name: timing.peak_memory_bytes(step, device) for name, step in steps.items()}
    if device.type == "cpu":
        apart = not args.quick  # a process per candidate costs seconds of imports each
        peaks.update(probe_gqa_cpu_memory(dtype_name, shape, mode, steps, args.rope_theta, apart))
    differences = output_differences(candidates, steps)

    samples = {name: [] for name in steps}
    run_rounds(args, device, steps, calls, samples, grad_context)
    return [
        {
            "dtype": dtype_name,
            "batch": batch,
            "seq": seq,
            "embed": embed,
            "heads": heads,
            "kv_heads": kv_heads,
            "shape": shape,
            "case": (dtype_name, shape, mode),
            "mode": mode,
            "candidate": name,
            "description": peers.GQA_DESCRIPTIONS[name],
            "median_ms": timing.median(values),
            "samples_ms": values,
            "timed_in_rounds": True,
            "peak_bytes": peaks.get(name),
            "max_abs_diff_vs_torchmha": differences.get(name),
        }
        for name, values in samples.items()
    ]


def bench_decode_case(args, device, dtype_name, shape, wanted, workdir):
    """One decoding step of every candidate on one (batch, prompt, embed, heads, kv_heads), in
    inference: a list of result rows. Each row also records how far the candidate's output lies
    from torchmha's (same weights, same cache), the bytes a step reads and its FLOPs, and the
    cache's size."""
    batch, prompt, embed, heads, kv_heads = shape
    dtype = getattr(torch, dtype_name)
    torch.manual_seed(0)
    # The weights first: every case of the same sizes gets the same ones (and one file for C++).
    state = decode_peers.random_weights(embed, heads, kv_heads)
    case = decode_peers.new_decode_case(
        batch, prompt, embed, heads, kv_heads, args.decode_room, args.rope_theta, device, dtype
    )
    candidates = decode_peers.decode_candidates(case, wanted, state)
    label = f"{dtype_name} {shape} decode"
    steps, calls, peaks = prepare_steps(candidates, False, device, args.target_ms, label)
    if args.memory_probe:
        with torch.inference_mode():
            return {name: timing.peak_memory_bytes(step, device) for name, step in steps.items()}
    if device.type == "cpu" and args.quick:
        # In this process: a probe would pay the imports and the compilation again (seconds),
        # and a tiny step's peak reads 0 either way.
        with torch.inference_mode():
            peaks.update({name: timing.peak_memory_bytes(s, device) for name, s in steps.items()})
    elif device.type == "cpu":
        for name in sorted(steps):
            peaks.update(_probe_decode_memory(args, dtype_name, shape, [name]))
    differences = decode_differences(candidates, steps)
    skips = torch._dynamo.utils.counters["inductor"]["cudagraph_skips"]
    if device.type == "cuda" and skips:
        # Then a compiled candidate runs its kernels without CUDA graphs (inductor logs why).
        print(f"bench: CUDA graphs skipped {skips} times so far (at {label})")

    samples = {name: [] for name in steps}
    run_rounds(args, device, steps, calls, samples, torch.inference_mode)
    # Where the step goes, for torchmha and the eager Python cache (the same ATen ops by hand):
    # self CPU time, which says nothing of a GPU's kernels.
    breakdowns = {
        name: decode_peers.step_breakdown(steps[name])
        for name in ("torchmha", "sdpa_cache")
        if name in steps and device.type == "cpu"
    }
    timed_in_rounds = dict.fromkeys(samples, True)
    cpp = run_cpp_decode(args, case, state, steps, calls, wanted, workdir)
    for name, (ms, difference) in cpp.items():
        samples[name], differences[name], timed_in_rounds[name] = ms, difference, False
    traffic = decode_peers.step_bytes(case)
    return [
        {
            "dtype": dtype_name,
            "batch": batch,
            "prompt": prompt,
            "seq": prompt,
            "embed": embed,
            "heads": heads,
            "kv_heads": kv_heads,
            "max_seq_len": case.max_seq_len,
            "shape": shape,
            "case": (dtype_name, shape, "inference"),
            "mode": "inference",
            "candidate": name,
            "description": decode_peers.DECODE_DESCRIPTIONS[name],
            "median_ms": timing.median(values),
            "samples_ms": values,
            "timed_in_rounds": timed_in_rounds[name],
            "peak_bytes": peaks.get(name),
            "max_abs_diff_vs_torchmha": differences.get(name),
            "step_cache_bytes": traffic["cache"],
            "step_weight_bytes": traffic["weights"],
            "step_flops": decode_peers.step_flops(case),
            "step_activation_bytes": decode_peers.step_activation_bytes(case),
            "profile_ms_per_step": breakdowns.get(name),
        }
        for name, values in samples.items()
    ]


def run_cpp_decode(args, case, state, steps, calls, wanted, workdir):
    """torchmha's step from the C++ loop (and, on a GPU, its CUDA-graph replay), after the
    rounds, on the same weights, cache contents and token: {name: ([ms per round], max diff
    from Python's torchmha step)}; empty where the program is not built or torchmha's Python step
    (the reference) is not timed."""
    if not wanted & set(DECODE_CPP_CANDIDATES) or "torchmha" not in steps:
        return {}
    if not os.path.exists(args.cpp_bench):
        return {}
    files = {}
    sizes = f"{case.embed}-{case.heads}-{case.kv_heads}"
    files["state"] = os.path.join(workdir, f"decode_state_{sizes}.pt")
    if not os.path.exists(files["state"]):  # the same weights for every case of these sizes
        torch.save(decode_peers.torchmha_state_dict(case, state), files["state"])
    with torch.inference_mode():
        expected = steps["torchmha"]().float().cpu()
    tensors = {"key": case.key_block, "value": case.value_block, "token": case.new_token}
    for name, tensor in {**tensors, "expected": expected}.items():
        files[name] = os.path.join(workdir, f"decode_{name}.pt")
        torch.save(tensor, files[name])
    command = [args.cpp_bench, "decode", files["state"], files["key"], files["value"]]
    command += [files["token"], files["expected"], str(case.heads), str(case.kv_heads)]
    command += [str(args.rope_theta), str(case.prompt), str(case.max_seq_len)]
    command += [case.device.type, str(case.dtype).replace("torch.", ""), str(args.threads)]
    command += [str(args.rounds), str(calls["torchmha"])]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        print(
            f"bench: the C++ decoding step is left out of {case.batch, case.prompt}: "
            f"{' '.join(command)} failed:\n{result.stderr[-2000:]}"
        )
        return {}
    measured = {}
    for line in result.stdout.splitlines():
        entry = json.loads(line)
        if entry["candidate"] in wanted:
            measured[entry["candidate"]] = (entry["ms"], entry["max_abs_diff_vs_torchmha"])
        if entry.get("max_abs_diff_vs_eager"):
            # A replay computes what the eager step computes, with the same kernels.
            print(
                f"bench: {entry['candidate']} differs from the eager C++ step by "
                f"{entry['max_abs_diff_vs_eager']:.3g}"
            )
    return measured


def _probe_decode_memory(args, dtype_name, shape, names):
    return probe_cpu_memory(
        dtype_name, shape, "inference", names, "decode", args.rope_theta, args.decode_room
    )


def decode_differences(candidates, steps):
    """Largest absolute difference of each cached candidate's step output from torchmha's (the
    steps rewind their caches, so each computes the same token); None for nn.MultiheadAttention,
    which computes another function (every head its own keys, no rotation)."""
    if "torchmha" not in steps:
        return {}
    with torch.inference_mode():
        ours = steps["torchmha"]()
        return {
            name: (step() - ours).abs().max().item()
            for name, step in steps.items()
            if candidates[name].same_function
        }


def output_differences(candidates, steps):
    """Largest absolute difference of each candidate's output from torchmha's, one forward each:
    the peers compute the same function on the same weights, or the comparison means nothing."""
    if "torchmha" not in steps:
        return {}
    with torch.no_grad():
        ours = candidates["torchmha"].forward().float()
        return {
            name: (candidates[name].forward().float() - ours).abs().max().item() for name in steps
        }


def main() -> int:
    args = parse_args()
    if args.plot_from:
        return replot(args.plot_from)
    if args.report_from:
        return rereport(args.report_from)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    if args.memory_probe:
        dtype_name, *sizes, mode = args.memory_probe.split(",")
        wanted = set(args.candidates.split(",")) - set(CPP_CANDIDATES)
        args.target_ms = 1.0
        shape = tuple(map(int, sizes))
        if args.suite == "decode":
            decode_rows = bench_decode_case(args, device, dtype_name, shape, wanted, None)
            print(json.dumps(decode_rows))
            return 0
        if args.suite == "gqa":
            print(json.dumps(bench_gqa_case(args, device, dtype_name, shape, mode, wanted)))
            return 0
        with tempfile.TemporaryDirectory() as workdir:
            peaks = bench_case(args, device, dtype_name, shape, mode, wanted, workdir)
        print(json.dumps(peaks))
        return 0
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    gqa = args.suite == "gqa"
    decode = args.suite == "decode"
    default_dtypes = "bfloat16,float32" if device.type == "cuda" else "float32"
    if decode and device.type == "cuda":
        default_dtypes = "bfloat16"
    dtypes = (args.dtypes or default_dtypes).split(",")
    default_shapes = {
        ("mha", "cpu"): CPU_SHAPES,
        ("mha", "cuda"): GPU_SHAPES,
        ("gqa", "cpu"): GQA_CPU_SHAPES,
        ("gqa", "cuda"): GQA_GPU_SHAPES,
        ("decode", "cpu"): DECODE_CPU_SHAPES,
        ("decode", "cuda"): DECODE_GPU_SHAPES,
    }[args.suite, device.type]
    shapes = (
        [tuple(int(v) for v in s.split(",")) for s in args.shapes]
        if args.shapes
        else default_shapes
    )
    if any(len(shape) != (5 if gqa or decode else 4) for shape in shapes):
        form = {"gqa": "B,L,E,H,KV", "decode": "B,PROMPT,E,H,KV"}.get(args.suite, "B,L,E,H")
        print(f"bench: --shapes takes {form} each", file=sys.stderr)
        return 2
    if decode:
        args.modes = "inference"
    every = {
        "gqa": peers.GQA_DESCRIPTIONS,
        "decode": decode_peers.DECODE_DESCRIPTIONS,
    }.get(args.suite, peers.DESCRIPTIONS)
    wanted = set(args.candidates.split(",") if args.candidates else every)
    if decode and args.quick and not args.candidates:
        # One compilation fewer in the smoke run (seconds): torchmha's own compiled decoding is
        # tested on its own (tests/python/test_kv_cache.py).
        wanted.discard("torchmha_compiled")
    if decode and not args.candidates:
        if device.type == "cuda":
            # Not among the GPU's peers: its recomputation of a 32k-token prefix per token.
            wanted.discard("torch_mha_recompute")
        else:
            wanted.discard("torchmha_cpp_graph")  # CUDA graphs need a GPU
    if decode:
        # Every case compiles its own modules; dynamo's default limit would run them eager.
        limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else None
        setattr(torch._dynamo.config, limit or "cache_size_limit", 64)
    if not gqa and not os.path.exists(args.cpp_bench) and wanted & set(CPP_CANDIDATES):
        print(
            f"bench: {args.cpp_bench} not built; the C++ candidates are left out "
            "(scripts/build.sh builds it)"
        )

    machine = machine_description(device)
    # The decode suite's smoke run measures the machine on small tensors: seconds count there.
    small = decode and args.quick
    gemm = {"rounds": 2, "size": 512} if small else {}
    copy = {"rounds": 2, "megabytes": 16} if small else {}
    if decode and device.type == "cuda":
        copy = {"megabytes": 1024}  # far beyond the GPU's L2 cache
    copy["device"] = device
    peaks = {}
    for dtype_name in dtypes:
        peaks[dtype_name] = timing.gemm_peak_tflops(device, getattr(torch, dtype_name), **gemm)
    print(json.dumps(machine))
    print("GEMM peak (TFLOP/s): " + ", ".join(f"{d} {p:.3f}" for d, p in peaks.items()), flush=True)
    if decode:
        machine["copy_megabytes"] = copy.get("megabytes", 256)
        machine["memory_bandwidth_bytes_per_s"] = decode_peers.memory_bandwidth(**copy)
        print(
            f"copy bandwidth: {machine['memory_bandwidth_bytes_per_s'] / 1e9:.2f} GB/s", flush=True
        )

    suffix = {"gqa": "-gqa", "decode": "-decode"}.get(args.suite, "")
    name = args.name or ("quick" if args.quick else _default_name(device, machine)) + suffix
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for dtype_name in dtypes:
            for shape in shapes:
                for mode in args.modes.split(","):
                    if decode:
                        case_rows = bench_decode_case(
                            args, device, dtype_name, shape, wanted, workdir
                        )
                    elif gqa:
                        case_rows = bench_gqa_case(args, device, dtype_name, shape, mode, wanted)
                    else:
                        case_rows = bench_case(
                            args, device, dtype_name, shape, mode, wanted, workdir
                        )
                    _add_ratios(args.suite, case_rows, peaks[dtype_name], machine)
                    print(_table(args.suite, case_rows).split("\n", 2)[2], flush=True)
                    rows.extend(case_rows)
                    if decode and device.type == "cuda":
                        # An unattended run under a time limit keeps every case measured so far.
                        write_results(args.out, name, machine, peaks, args, rows, final=False)
    # The peak again at the end; the better of the two is the machine's.
    for dtype_name in dtypes:
        peaks[dtype_name] = max(
            peaks[dtype_name], timing.gemm_peak_tflops(device, getattr(torch, dtype_name), **gemm)
        )
    if decode:
        # The bandwidth again at the end; the better of the two is the machine's.
        machine["memory_bandwidth_bytes_per_s"] = max(
            machine["memory_bandwidth_bytes_per_s"], decode_peers.memory_bandwidth(**copy)
        )
    _add_ratios_per_dtype(args.suite, rows, peaks, machine)
    write_results(args.out, name, machine, peaks, args, rows)
    return 0


def write_results(
    out: str, name: str, machine: dict, peaks: dict, args, rows: list, final: bool = True
) -> None:
    """<name>.md (table and goals), <name>.json and <name>.png under ``out``; not ``final``: the
    cases so far, .md and .json only, nothing printed."""
    os.makedirs(out, exist_ok=True)
    suite = getattr(args, "suite", "mha")
    goal_lines = report.goals(rows, args.device, suite=suite)
    header = _header(machine, peaks, args)
    table = _table(suite, rows)
    if suite == "gqa":
        table = report.gqa_summary_table(rows) + "\n\nEvery candidate:\n\n" + table
    elif suite == "decode":
        table = report.decode_summary_table(rows) + "\n\nEvery candidate:\n\n" + table
        breakdown = report.decode_breakdown_table(rows)
        if breakdown:
            table += (
                "\n\nWhere a step goes (torch.profiler, self CPU time of its ATen ops per step, "
                "over 5 steps after the rounds; attention = the SDPA kernel, projections = the "
                "GEMMs, cache writes = scatter_ / index_copy_):\n\n" + breakdown
            )
    with open(os.path.join(out, name + ".md"), "w") as markdown:
        markdown.write(
            f"# Benchmark: {name}\n\n{header}\n\n{table}\n\n## Goals, as measured\n\n"
            + "\n".join(goal_lines)
            + "\n"
        )
    with open(os.path.join(out, name + ".json"), "w") as output:
        json.dump(
            {
                "machine": machine,
                "gemm_peak_tflops": peaks,
                "settings": vars(args),
                "rows": [{k: v for k, v in r.items() if k != "case"} for r in rows],
            },
            output,
            indent=1,
        )
    if not final:
        return
    plotted = report.plot(
        rows, os.path.join(out, name + ".png"), header.split("\n")[0], _ratio_key(suite)
    )
    print("\n" + header + "\n\n" + table + "\n\nGoals, as measured:\n" + "\n".join(goal_lines))
    print(
        f"bench: wrote {os.path.join(out, name)}.json, .md"
        + (", .png" if plotted else " (no plot: matplotlib is not installed)")
    )


def rereport(results_path: str) -> int:
    """Rewrites <results>.md, .json and .png from the timings in <results>.json: ratios and goals
    as the current report computes them, nothing measured again."""
    with open(results_path) as results:
        saved = json.load(results)
    # Files written before the grouped-query suite existed are of the mha suite.
    settings = argparse.Namespace(**{"suite": "mha", **saved["settings"]})
    rows = []
    for row in saved["rows"]:
        row = {**row, "shape": tuple(row["shape"])}
        row["case"] = (row["dtype"], row["shape"], row["mode"])
        # Files written before the flag existed: on a GPU the C++ program ran after the rounds.
        row.setdefault(
            "timed_in_rounds",
            not (settings.device == "cuda" and row["candidate"] in CPP_CANDIDATES),
        )
        rows.append(row)
    _add_ratios_per_dtype(settings.suite, rows, saved["gemm_peak_tflops"], saved["machine"])
    out, file_name = os.path.split(os.path.splitext(results_path)[0])
    write_results(out, file_name, saved["machine"], saved["gemm_peak_tflops"], settings, rows)
    return 0


def replot(results_path: str) -> int:
    """Draws <results>.png from <results>.json (for results measured where matplotlib is absent)."""
    with open(results_path) as results:
        saved = json.load(results)
    rows = [{**row, "shape": tuple(row["shape"])} for row in saved["rows"]]
    machine = saved["machine"]
    title = f"{machine.get('gpu') or machine['cpu']}, torch {machine['torch']}, {machine['commit']}"
    path = os.path.splitext(results_path)[0] + ".png"
    ratio_key = _ratio_key(saved["settings"].get("suite", "mha"))
    if not report.plot(rows, path, title, ratio_key):
        print("bench: matplotlib is not installed (scripts/bench.sh installs it)", file=sys.stderr)
        return 1
    print(f"bench: wrote {path}")
    return 0


def _add_ratios_per_dtype(suite: str, rows: list, peaks: dict, machine: dict) -> None:
    for dtype_name, peak in peaks.items():
        _add_ratios(suite, [r for r in rows if r["dtype"] == dtype_name], peak, machine)


def _add_ratios(suite: str, rows: list, gemm_peak_tflops: float, machine: dict) -> None:
    if suite == "decode":
        bandwidth = machine["memory_bandwidth_bytes_per_s"]
        report.add_decode_ratios(rows, gemm_peak_tflops, bandwidth)
    elif suite == "gqa":
        report.add_gqa_ratios(rows, peers.GQA_PEERS, gemm_peak_tflops)
    else:
        report.add_ratios(rows, _weights_candidates(), gemm_peak_tflops)


def _table(suite: str, rows: list) -> str:
    if suite == "decode":
        return report.decode_markdown_table(rows)
    return report.gqa_markdown_table(rows) if suite == "gqa" else report.markdown_table(rows)


def _ratio_key(suite: str) -> str:
    return {"gqa": "x_fastest_peer", "decode": "torchmha_speedup"}.get(suite, "x_torch")


def _weights_candidates() -> set:
    return {"torchmha_weights", "torchmha_textbook", "torch_mha_weights", "chapter"}


def _default_name(device: torch.device, machine: dict) -> str:
    if device.type == "cpu":
        return "cpu"
    return "cuda-" + machine["gpu"].lower().replace("nvidia ", "").replace(" ", "-")


def _header(machine: dict, peaks: dict, args) -> str:
    if getattr(args, "suite", "mha") == "gqa":
        return _gqa_header(machine, peaks, args)
    if getattr(args, "suite", "mha") == "decode":
        return _decode_header(machine, peaks, args)
    where = machine.get("gpu") or machine["cpu"]
    return (
        f"Machine: {where}; {machine['threads']} CPU threads; torch {machine['torch']}; "
        f"torchmha {machine['torchmha']} at {machine['commit']}; {machine['date']}.\n"
        "Measured GEMM peak: "
        + ", ".join(
            f"{d} {p * 1e3:.0f} GFLOP/s" if args.device == "cpu" else f"{d} {p:.0f} TFLOP/s"
            for d, p in peaks.items()
        )
        + f". Median of {args.rounds} rounds; x torch = torch.nn.MultiheadAttention's time "
        "(its faster setting; its need_weights=True path for candidates that return weights) "
        "divided by the candidate's; x chapter likewise for the chapter's module. In the goals, "
        "'rounds' gives the smallest and largest of the same ratio taken round by round, and "
        "'bound' the ratio at 100 % of the measured GEMM peak (the reference's time over the "
        "time the case's FLOPs take at that peak): above it, a goal needs the same arithmetic "
        "done faster than the measured GEMM rate."
    )


def _machine_line(machine: dict, peaks: dict, args) -> str:
    where = machine.get("gpu") or machine["cpu"]
    versions = f"torch {machine['torch']}"
    if machine.get("transformers"):
        versions += f", transformers {machine['transformers']}"
    return (
        f"Machine: {where}; {machine['threads']} CPU threads; {versions}; "
        f"torchmha {machine['torchmha']} at {machine['commit']}; {machine['date']}.\n"
        "Measured GEMM peak: "
        + ", ".join(
            f"{d} {p * 1e3:.0f} GFLOP/s" if args.device == "cpu" else f"{d} {p:.0f} TFLOP/s"
            for d, p in peaks.items()
        )
        + "."
    )


def _gqa_header(machine: dict, peaks: dict, args) -> str:
    memory = (
        "the allocator's peak above what was allocated before the call"
        if args.device == "cuda"
        else "the peak resident set above the resident size before the call, in a fresh process "
        "per case and candidate in which glibc serves every allocation above 64 KiB by its own "
        "mapping (MALLOC_MMAP_THRESHOLD_=65536), so the resident set follows what is allocated "
        "(peak reset through /proc/self/clear_refs)"
    )
    return (
        _machine_line(machine, peaks, args)
        + f" Median of {args.rounds} rounds. Grouped-query causal self-attention, rotary "
        f"embeddings (theta {args.rope_theta:g}, rotate-half), no biases, batch-first, on the "
        "same weights; torchmha with need_weights=False (the fused path). x fastest peer = "
        "the fastest peer's median time (among sdpa_gqa, llama_eager, llama_sdpa) divided by the "
        "candidate's; 'rounds' in the goals gives the same ratio taken round by round against "
        "that peer. Peak MiB: one call (a training step: forward and backward), "
        + memory
        + ". Max diff: the largest absolute difference of the candidate's output from "
        "torchmha's. % GEMM peak counts the four projections and half of the two attention "
        "products (causal)."
    )


def _decode_header(machine: dict, peaks: dict, args) -> str:
    bandwidth = machine["memory_bandwidth_bytes_per_s"] / 1e9
    dtypes = ", ".join(peaks)
    itemsize = " or ".join(str(getattr(torch, d).itemsize) for d in peaks)
    gpu = args.device == "cuda"
    copy = "a device-to-device copy timed by CUDA events" if gpu else "best of several copies"
    memory = (
        "Peak KiB: the allocator's peak during one step above what was allocated before it. "
        if gpu
        else "Peak KiB: one step's peak resident set above the resident size before the call "
        "(cache, weights and prompt already held), in a fresh process per case and candidate in "
        "which glibc serves every allocation above 64 KiB by its own mapping "
        "(MALLOC_MMAP_THRESHOLD_=65536; peak reset through /proc/self/clear_refs; below about "
        "100 KiB it reads 0 or less than was allocated: a fresh 128 KiB tensor reads 48 KiB). "
    )
    return (
        _machine_line(machine, peaks, args) + f" Measured copy bandwidth: {bandwidth:.1f} GB/s (a "
        f"{machine.get('copy_megabytes', 256)} MiB float32 tensor copied into another, bytes read "
        f"plus written over the time, {copy}, at the start and at the end of the run; the "
        f"larger). Median of {args.rounds} rounds.\n\n"
        f"One generated token (a single-token step), {dtypes}, inference mode, "
        "need_weights=False: grouped-query causal self-attention, rotary embeddings (theta "
        f"{args.rope_theta:g}, rotate-half), no biases, batch-first, on the same q/k/v/o_proj "
        "weights. Every cached candidate holds the same keys and values (random, written "
        f"directly) in the first `prompt` slots of a static cache of max_seq_len = prompt + "
        f"{args.decode_room} slots and decodes position `prompt` in every call (its length "
        "rewound before the call: a StaticCache's cumulative_length, a KVCache's seq_lens; the "
        "Python cache takes input_pos), attending over all max_seq_len slots under a mask. "
        + (
            'The compiled candidates run with mode="reduce-overhead" (CUDA graphs), their caches '
            "marked as static addresses; torchmha_cpp_graph is the C++ step captured once into an "
            "at::cuda::CUDAGraph and replayed per token. The C++ candidates run in their own "
            "process after the rounds (the same weights, cache contents and token). "
            if gpu
            else "torch_mha_recompute is torch.nn.MultiheadAttention over prompt + 1 tokens "
            "(causal mask, is_causal=True) per generated token, as its users decode today: every "
            "head has its own keys and no rotation (another function, so no max diff). "
        )
        + "Speedup = the candidate's median time over torchmha's; 'rounds' in the goals gives the "
        "same ratio taken round by round. Bytes per step = the keys and values of every slot (B x "
        f"KV x max_seq_len x head_dim x 2 x {itemsize} bytes) plus the four projection weights; "
        "GB/s = those bytes over the step's time, % bw = that over the measured copy bandwidth; "
        "'bytes dominate' where those bytes at the copy bandwidth take longer than the step's "
        "FLOPs (projections of one token and both attention products over every slot) at the "
        f"measured GEMM peak. {memory}One step's activations = {itemsize} bytes x (the new "
        "tokens' q, k, v, rotated q and k, attention output and output projection, plus one "
        "score and one mask value per query head and slot)."
    )


if __name__ == "__main__":
    sys.exit(main())
