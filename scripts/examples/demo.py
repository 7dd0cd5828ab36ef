"""The main demo: one attention, three callers, the same numbers.

On the same random inputs and weights, runs torch.nn.MultiheadAttention, torchmha from Python
and the C++ example program (which reads what this script saved and writes its output back),
then prints the max abs difference to PyTorch and the time per call. Exits 1 if a difference is
above tolerance.
"""

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
import torch.jit._pickle

import torchmha

TOLERANCE = 1e-5  # float32, outputs of order one


def seconds_per_call(fn: Callable[[], torch.Tensor], repeats: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cpp-demo", default="build/torchmha_demo", help="C++ example program")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--embed", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()

    torch.manual_seed(0)
    reference = torch.nn.MultiheadAttention(args.embed, args.heads, batch_first=True).eval()
    with torch.no_grad():
        reference.in_proj_bias.normal_()  # nonzero biases, so they are checked too
        reference.out_proj.bias.normal_()
    ours = torchmha.MultiHeadAttention(args.embed, args.heads, batch_first=True).eval()
    ours.load_state_dict(reference.state_dict())

    query = torch.randn(args.batch, args.seq, args.embed)
    key_padding_mask = torch.zeros(args.batch, args.seq, dtype=torch.bool)
    key_padding_mask[:, -args.seq // 4 :] = True  # the last quarter of every sequence is padding

    results = {}
    with torch.inference_mode():
        expected = reference(query, query, query, key_padding_mask, need_weights=False)[0]
        results["torch.nn.MultiheadAttention"] = (
            expected,
            seconds_per_call(
                lambda: reference(query, query, query, key_padding_mask, need_weights=False)[0],
                args.repeats,
            ),
        )
        results["torchmha (Python)"] = (
            ours(query, query, query, key_padding_mask, need_weights=False)[0],
            seconds_per_call(
                lambda: ours(query, query, query, key_padding_mask, need_weights=False)[0],
                args.repeats,
            ),
        )

    with tempfile.TemporaryDirectory() as folder:
        weights = Path(folder, "weights.pt")
        inputs, outputs = Path(folder, "inputs.pt"), Path(folder, "outputs.pt")
        torchmha.save_state_dict(reference, weights)  # PyTorch's module's weights, as they are
        config = {"embed_dim": args.embed, "num_heads": args.heads}
        torch.save({"config": config, "query": query, "key_padding_mask": key_padding_mask}, inputs)
        subprocess.run(
            [args.cpp_demo, str(weights), str(inputs), str(outputs), str(args.repeats)],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        # torch::pickle_save tags the dict's type; allow that one tag, nothing else.
        with torch.serialization.safe_globals([torch.jit._pickle.restore_type_tag]):
            cpp = torch.load(outputs)
        results["torchmha (C++ program)"] = (cpp["output"], cpp["seconds_per_call"])

    print(
        f"torch {torch.__version__}, torchmha {torchmha.__version__}, "
        f"{torch.get_num_threads()} threads; (batch, seq, embed, heads) = "
        f"({args.batch}, {args.seq}, {args.embed}, {args.heads}), float32, inference"
    )
    print(f"{'candidate':<30} {'max |diff| to PyTorch':>22} {'time per call':>15}")
    failed = False
    for name, (output, seconds) in results.items():
        difference = (output - expected).abs().max().item()
        failed |= not difference <= TOLERANCE
        print(f"{name:<30} {difference:>22.2e} {seconds * 1e6:>12.1f} us")
    if failed:
        print(f"FAILED: a difference is above the tolerance {TOLERANCE:g}", file=sys.stderr)
        return 1
    print(f"OK: every difference is within {TOLERANCE:g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
