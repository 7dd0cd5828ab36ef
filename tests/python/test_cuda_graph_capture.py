"""A decoding step with a key/value cache captured into a CUDA graph by hand (torch.cuda.graph, no
compiler): while a stream captures, the op checks the cache's lengths inside the graph (a copy to
the host is refused then), and every replay computes what the eager step computes."""

import pytest
import torch

import torchmha

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

EMBED_DIM, PROMPT = 32, 5


def test_captured_decoding_step_replays_the_eager_step() -> None:
    torch.manual_seed(0)
    attention = torchmha.MultiHeadAttention(
        EMBED_DIM, 4, bias=False, batch_first=True, num_kv_heads=2, rope_theta=10000.0
    ).to("cuda", torch.float64)
    prompt = torch.randn(2, PROMPT, EMBED_DIM, device="cuda", dtype=torch.float64)
    token = torch.randn(2, 1, EMBED_DIM, device="cuda", dtype=torch.float64)
    eager_cache, graph_cache = (attention.new_kv_cache(2, 16) for _ in range(2))

    def prefill(cache):
        attention(prompt, prompt, prompt, kv_cache=cache, is_causal=True, need_weights=False)

    def step(cache):
        cache.seq_lens.fill_(PROMPT)  # rewound: every replay decodes the same position
        return attention(token, token, token, kv_cache=cache, is_causal=True, need_weights=False)[0]

    with torch.inference_mode():
        for cache in (eager_cache, graph_cache):
            prefill(cache)
        expected = step(eager_cache)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step(graph_cache)  # warm-up outside capture
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            replayed = step(graph_cache)
        # The replays must write the step's keys and values themselves.
        graph_cache.key.zero_()
        graph_cache.value.zero_()
        prefill(graph_cache)
        for _ in range(2):
            graph.replay()
            torch.cuda.synchronize()
            torch.testing.assert_close(replayed, expected, atol=1e-12, rtol=1e-12)
            for name in ("key", "value"):
                torch.testing.assert_close(
                    getattr(graph_cache, name), getattr(eager_cache, name), atol=1e-12, rtol=1e-12
                )
            assert torch.equal(graph_cache.seq_lens, eager_cache.seq_lens)
