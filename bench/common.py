"""Shared pieces of the benchmarks: messages, timing, the FLOP count and the GEMM ceiling."""

from __future__ import annotations

import time

import torch

from spamray.model import GPTConfig
from spamray.prepare import read_labelled


def first_messages(count: int) -> list[str]:
    return read_labelled("sms")["text"].tolist()[:count]


def rate(function, items: int, repeats: int = 1, warmup=None) -> float:
    """Items per second of `function()`, the best of `repeats` runs after one warm-up call
    (of `warmup` where given: a short run for the slow baselines)."""
    (warmup or function)()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - start)
    return items / best


def forward_flops(cfg: GPTConfig, token_counts: list[int]) -> float:
    """Forward FLOPs over messages unpadded: 2 x non-embedding parameters x tokens, plus
    attention (QK^T and AV: 2 x 2 x T^2 x d per layer)."""
    d, layers = cfg.emb_dim, cfg.n_layers
    block_params = 12 * d * d + 13 * d  # qkv, out, fc, proj weights and biases, two LayerNorms
    non_embedding = layers * block_params + 2 * d
    return sum(2 * non_embedding * t + layers * 4 * t * t * d for t in token_counts)


def gemm_flops_per_second(emb_dim: int = 768, rows: int = 2048, seconds: float = 3.0) -> float:
    """Sustained fp32 matrix-product rate for the model's MLP shapes, [rows, d] @ [d, 4d] and
    back, over `seconds` (a sustained rate, as a scoring pass sustains it; not a best burst)."""
    x = torch.randn(rows, emb_dim)
    up, down = torch.randn(emb_dim, 4 * emb_dim), torch.randn(4 * emb_dim, emb_dim)
    hidden = torch.empty(rows, 4 * emb_dim)

    def both():
        torch.matmul(x, up, out=hidden)
        torch.matmul(hidden, down)

    both()
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        both()
        calls += 1
    return calls / (time.perf_counter() - start) * 2 * (2 * rows * emb_dim * 4 * emb_dim)


def table(rows: list[tuple[str, float]], baseline: str, unit: str = "msgs/s") -> str:
    reference = dict(rows)[baseline]
    width = max(len(name) for name, _ in rows)
    lines = [f"{'':<{width}}  {unit:>10}  {'x ' + baseline:>16}"]
    lines += [f"{name:<{width}}  {value:>10.1f}  {value / reference:>15.2f}x" for name, value in rows]
    return "\n".join(lines)
