"""Layers shared by GPT-2, GPT-J and BERT."""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn
import torch.nn.functional as F


class Attention(nn.Module):
    """Multi-head self-attention through scaled_dot_product_attention (flash / memory-efficient
    kernels, so memory grows linearly with sequence length)."""

    def __init__(self, hidden_size: int, num_heads: int, *, bias: bool, dropout: float,
                 attention_dropout: float, causal: bool,
                 rotary: Optional[Callable[[torch.Tensor, torch.Tensor], tuple]] = None,
                 out_bias: Optional[bool] = None):
        super().__init__()
        self.num_heads = num_heads
        self.causal = causal
        self.attention_dropout = attention_dropout
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=bias)
        self.out = nn.Linear(hidden_size, hidden_size, bias=bias if out_bias is None else out_bias)
        self.dropout = nn.Dropout(dropout)
        self.rotary = rotary

    def forward(self, x: torch.Tensor, padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.num_heads, c // self.num_heads).unbind(2)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))  # (b, heads, t, head_dim)
        if self.rotary is not None:
            q, k = self.rotary(q, k)
        mask = None
        if padding_mask is not None:  # keys that are padding get no attention
            mask = padding_mask[:, None, None, :].bool()
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=self.causal and mask is None,
                                           dropout_p=self.attention_dropout if self.training else 0.0)
        return self.dropout(self.out(y.transpose(1, 2).reshape(b, t, c)))


class MLP(nn.Module):
    def __init__(self, hidden_size: int, ffn_size: int, *, dropout: float, approximate_gelu: bool):
        super().__init__()
        self.fc_in = nn.Linear(hidden_size, ffn_size)
        self.fc_out = nn.Linear(ffn_size, hidden_size)
        self.approximate = "tanh" if approximate_gelu else "none"
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc_out(F.gelu(self.fc_in(x), approximate=self.approximate)))
