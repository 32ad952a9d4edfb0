"""Low-rank adaptation (the book's appendix E) for fine-tuning the larger GPT-2 sizes cheaply.

Each linear layer of the transformer blocks gains a trainable update `x @ A @ B * alpha/rank`
beside its frozen weight. Before a classifier is saved the update is merged into the weight,
so a saved classifier is always a plain GPT-2 with no LoRA code needed to load it.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {rank}")
        self.base = base
        self.scale = (alpha if alpha is not None else rank) / rank
        self.lora_a = nn.Parameter(torch.empty(base.in_features, rank))
        self.lora_b = nn.Parameter(torch.zeros(rank, base.out_features))  # starts as a no-op
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_a @ self.lora_b) * self.scale

    def merged(self) -> nn.Linear:
        with torch.no_grad():
            self.base.weight += (self.lora_a @ self.lora_b).t() * self.scale
        return self.base


def add_lora(blocks: nn.Module, rank: int) -> None:
    """Wraps every nn.Linear under `blocks` in a LoRALinear, in place."""
    for name, child in list(blocks.named_children()):
        if isinstance(child, nn.Linear):
            setattr(blocks, name, LoRALinear(child, rank))
        else:
            add_lora(child, rank)


def merge_lora(module: nn.Module) -> None:
    """Folds every LoRALinear under `module` back into a plain nn.Linear, in place."""
    for name, child in list(module.named_children()):
        if isinstance(child, LoRALinear):
            setattr(module, name, child.merged())
        else:
            merge_lora(child)
