"""GPT-2 in plain PyTorch: the architecture of the published checkpoints, nothing more.

The layout follows chapter 4 of the book (token + position embeddings, pre-LayerNorm
transformer blocks, a final LayerNorm, a language-model head). Attention runs through
`scaled_dot_product_attention`, which picks a fused kernel where the hardware has one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

GPT2_VOCAB_SIZE = 50257
GPT2_CONTEXT_LENGTH = 1024


@dataclass(frozen=True)
class GPTConfig:
    emb_dim: int
    n_layers: int
    n_heads: int
    vocab_size: int = GPT2_VOCAB_SIZE
    context_length: int = GPT2_CONTEXT_LENGTH
    drop_rate: float = 0.0
    qkv_bias: bool = True
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.emb_dim % self.n_heads:
            raise ValueError(f"emb_dim {self.emb_dim} is not divisible by n_heads {self.n_heads}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "GPTConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown GPT config fields {unknown}; known fields are {sorted(known)}")
        return cls(**values)


# The four published sizes, then small ones for tests and offline demos.
PRESETS: dict[str, GPTConfig] = {
    "gpt2-small": GPTConfig(emb_dim=768, n_layers=12, n_heads=12),
    "gpt2-medium": GPTConfig(emb_dim=1024, n_layers=24, n_heads=16),
    "gpt2-large": GPTConfig(emb_dim=1280, n_layers=36, n_heads=20),
    "gpt2-xl": GPTConfig(emb_dim=1600, n_layers=48, n_heads=25),
    "gpt2-mini": GPTConfig(emb_dim=256, n_layers=4, n_heads=4),
    "gpt2-tiny": GPTConfig(emb_dim=64, n_layers=2, n_heads=2),
}


def preset_config(name: str, **overrides) -> GPTConfig:
    """The config of a named preset, with any field replaced (dropout, say)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return GPTConfig(**{**PRESETS[name].to_dict(), **overrides})


class MultiHeadAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.emb_dim // cfg.n_heads
        # One projection for queries, keys and values: one matrix product instead of three.
        self.qkv = nn.Linear(cfg.emb_dim, 3 * cfg.emb_dim, bias=cfg.qkv_bias)
        self.out_proj = nn.Linear(cfg.emb_dim, cfg.emb_dim)
        self.drop_rate = cfg.drop_rate
        self.resid_drop = nn.Dropout(cfg.drop_rate)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = x.shape
        return x.view(batch, tokens, self.n_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, query_positions: torch.Tensor | None = None, causal: bool = True,
                key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Self-attention, causal (GPT-2) or over the whole message (`causal=False`: each position
        sees every real token, `key_mask` [B, T] marking them, never the padding); with
        `query_positions` ([B]) only those rows are computed."""
        batch, tokens, emb_dim = x.shape
        queries, keys, values = self.qkv(x).split(emb_dim, dim=-1)
        keys, values = self._heads(keys), self._heads(values)
        dropout = self.drop_rate if self.training else 0.0
        if query_positions is None:
            if causal:
                context = F.scaled_dot_product_attention(self._heads(queries), keys, values, dropout_p=dropout,
                                                         is_causal=True)
            else:
                mask = None if key_mask is None else key_mask[:, None, None, :]
                context = F.scaled_dot_product_attention(self._heads(queries), keys, values, attn_mask=mask,
                                                         dropout_p=dropout)
        else:
            rows = torch.arange(batch, device=x.device)
            queries = self._heads(queries[rows, query_positions].unsqueeze(1))
            if causal:  # a query at position p sees keys 0..p, as the causal mask would give it
                visible = torch.arange(tokens, device=x.device) <= query_positions[:, None]
            else:
                visible = key_mask if key_mask is not None else torch.ones(batch, tokens, dtype=torch.bool,
                                                                           device=x.device)
            context = F.scaled_dot_product_attention(
                queries, keys, values, attn_mask=visible[:, None, None, :], dropout_p=dropout
            )
        context = context.transpose(1, 2).reshape(batch, -1, emb_dim)
        return self.resid_drop(self.out_proj(context))


class FeedForward(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.emb_dim, 4 * cfg.emb_dim)
        self.proj = nn.Linear(4 * cfg.emb_dim, cfg.emb_dim)
        self.drop = nn.Dropout(cfg.drop_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # GPT-2 was trained with the tanh approximation of GELU.
        return self.drop(self.proj(F.gelu(self.fc(x), approximate="tanh")))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.emb_dim, eps=cfg.layer_norm_eps)
        self.att = MultiHeadAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.emb_dim, eps=cfg.layer_norm_eps)
        self.ff = FeedForward(cfg)

    def forward(self, x: torch.Tensor, query_positions: torch.Tensor | None = None, causal: bool = True,
                key_mask: torch.Tensor | None = None) -> torch.Tensor:
        if query_positions is None:
            x = x + self.att(self.norm1(x), causal=causal, key_mask=key_mask)
        else:
            shortcut = x[torch.arange(x.shape[0], device=x.device), query_positions].unsqueeze(1)
            x = shortcut + self.att(self.norm1(x), query_positions, causal=causal, key_mask=key_mask)
        return x + self.ff(self.norm2(x))


class GPTModel(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = _embedding(cfg.vocab_size, cfg.emb_dim)
        self.pos_emb = _embedding(cfg.context_length, cfg.emb_dim)
        self.drop_emb = nn.Dropout(cfg.drop_rate)
        self.trf_blocks = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layers))
        self.final_norm = nn.LayerNorm(cfg.emb_dim, eps=cfg.layer_norm_eps)
        self.out_head = nn.Linear(cfg.emb_dim, cfg.vocab_size, bias=False)
        self.apply(_init_gpt2_weights)
        self.out_head.weight = self.tok_emb.weight  # GPT-2 ties its output head to the embedding

    def _check_ids(self, token_ids: torch.Tensor) -> None:
        if token_ids.dtype != torch.long or token_ids.dim() != 2:
            raise TypeError(f"token ids must be a LongTensor [batch, tokens], got {token_ids.dtype} {tuple(token_ids.shape)}")
        if token_ids.shape[1] > self.cfg.context_length:
            raise ValueError(
                f"{token_ids.shape[1]} tokens exceed the context length {self.cfg.context_length}; truncate first"
            )

    def hidden_states(self, token_ids: torch.Tensor, query_positions: torch.Tensor | None = None,
                      causal: bool = True, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Final-LayerNorm outputs [B, T, D], or [B, 1, D] at `query_positions` only.

        Reading one position per row lets the last block skip every other row: the earlier
        blocks must still run in full, since later positions attend to all earlier ones.
        `causal=False` lets every position attend to every real token (`key_mask`).
        """
        self._check_ids(token_ids)
        positions = torch.arange(token_ids.shape[1], device=token_ids.device)
        x = self.drop_emb(self.tok_emb(token_ids) + self.pos_emb(positions))
        *early_blocks, last_block = self.trf_blocks
        for block in early_blocks:
            x = block(x, causal=causal, key_mask=key_mask)
        x = last_block(x, query_positions, causal=causal, key_mask=key_mask)
        return self.final_norm(x.to(self.final_norm.weight.dtype))  # fp32 on bf16 blocks: set_precision

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Language-model logits [B, T, vocab_size]."""
        return self.out_head(self.hidden_states(token_ids))


def _embedding(count: int, dim: int) -> nn.Embedding:
    # Built around an empty weight that _init_gpt2_weights fills: nn.Embedding's own N(0, 1) draw
    # would be thrown away, and on the meta device (TextClassifier.load) it alone imports
    # torch._dynamo, which costs each scoring replica seconds as it starts.
    return nn.Embedding(count, dim, _weight=torch.empty(count, dim))


def _init_gpt2_weights(module: nn.Module) -> None:
    # GPT-2's own initialisation: N(0, 0.02) for weights, zeros for biases. A skeleton on the
    # meta device has no values to draw.
    if getattr(module, "weight", None) is not None and module.weight.is_meta:
        return
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Distinct parameters (a tied weight counts once)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
