"""Where a candidate's time goes: torch.profiler's table of one call, candidates side by side.

    python scripts/bench/profile_call.py --device cuda --dtype bfloat16 --shape 32,128,512,8 \
        --mode inference --candidates torchmha_weights,torch_mha_weights

Same weights and input as scripts/bench/bench.py. On a GPU the table lists kernels (CUDA time); on
the CPU, ATen ops. Counts of kernels and of ATen calls come first: at small shapes a GPU call is
bound by launches, so those counts are the cost. ``--suite gqa`` profiles the grouped-query
candidates (``--shape B,L,E,H,KV``, causal, rotary), e.g.

    python scripts/bench/profile_call.py --suite gqa --shape 1,2048,2048,32,8 --mode training \
        --candidates torchmha,sdpa_gqa,llama_sdpa

``--suite decode`` profiles one decoding step of the decoding candidates (``--shape
B,PROMPT,E,H,KV``, inference, each cache prefilled with the prompt), e.g.

    python scripts/bench/profile_call.py --suite decode --shape 8,2048,1024,16,4 \
        --candidates torchmha,sdpa_cache,llama_static
"""

import argparse
import sys

import decode_peers  # this folder is on sys.path when the script runs
import peers
import torch
from torch.profiler import ProfilerActivity, profile


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--suite", default="mha", choices=["mha", "gqa", "decode"])
    parser.add_argument(
        "--shape", default="32,128,512,8", help="B,L,E,H (gqa: B,L,E,H,KV; decode: B,PROMPT,E,H,KV)"
    )
    parser.add_argument(
        "--rope-theta", type=float, default=10000.0, help="rotary base (gqa, decode)"
    )
    parser.add_argument(
        "--decode-room", type=int, default=128, help="decode: cache slots beyond the prompt"
    )
    parser.add_argument("--mode", default="inference", choices=["inference", "training"])
    parser.add_argument("--candidates", default="torchmha_weights,torch_mha_weights")
    parser.add_argument("--rows", type=int, default=12, help="table rows per candidate")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    batch, seq, embed, heads, *kv_heads = map(int, args.shape.split(","))
    torch.manual_seed(0)
    x = torch.randn(batch, seq, embed, device=device, dtype=dtype)
    if args.suite == "decode":
        case = decode_peers.DecodeCase(
            batch,
            seq,
            embed,
            heads,
            *kv_heads,
            max_seq_len=seq + args.decode_room,
            rope_theta=args.rope_theta,
            prompt_tokens=x,
            new_token=torch.randn(batch, 1, embed, device=device, dtype=dtype),
        )
        candidates = decode_peers.decode_candidates(case, set(args.candidates.split(",")))
    elif args.suite == "gqa":
        candidates = peers.gqa_candidates(embed, heads, *kv_heads, args.rope_theta, x)
    else:
        state = torch.nn.MultiheadAttention(embed, heads, batch_first=True).state_dict()
        candidates = peers.python_candidates(embed, heads, state, x)
    training = args.mode == "training"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"{args.device} {args.dtype} shape {args.shape} {args.mode}; torch {torch.__version__}")
    for name in args.candidates.split(","):
        candidate = candidates[name]
        for module in candidate.modules:
            module.train(training)
        x.requires_grad_(training)
        step = peers.step_function(candidate, training)
        if not training:
            step = torch.inference_mode()(step)
        for _ in range(3):  # warm-up: allocator, cuBLAS handles, kernel selection
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        with profile(activities=activities) as prof:
            step()
            if device.type == "cuda":
                torch.cuda.synchronize()
        events = prof.events()
        kernels = sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
        aten_calls = sum(1 for e in events if e.name.startswith("aten::"))
        print(f"\n== {name}: {kernels} GPU kernels, {aten_calls} ATen calls")
        print(
            prof.key_averages().table(
                sort_by=sort_by, row_limit=args.rows, max_name_column_width=60
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
