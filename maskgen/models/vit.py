"""Pre-LN transformer blocks (MAE / timm / official MAGE layout) on `F.scaled_dot_product_attention`.

    x = x + drop(proj(attention(norm1(x))))
    x = x + drop(fc2(drop(gelu(fc1(norm2(x))))))

Parameter names equal the official MAGE/MAE state_dicts (`norm1`, `attn.qkv`, `attn.proj`, `norm2`,
`mlp.fc1`, `mlp.fc2`), so official block tensors load with the identity key map. GELU is the exact (erf)
form, LayerNorm eps is 1e-6, qkv carries a bias, and the attention scale is head_dim ** -0.5 (the SDPA
default). The official code computes softmax(q k^T * scale) by hand in fp32; SDPA matches it in fp32 to
~1e-7 (reference/mage.md §2.5). Under autocast SDPA runs in the autocast dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    """Multi-head self-attention. x [B, N, dim] -> [B, N, dim].

    `attn_drop` is the dropout on the attention weights (passed to SDPA as dropout_p, in training only);
    `proj_drop` is the dropout after the output projection."""

    def __init__(self, dim: int, num_heads: int, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        # [B, N, 3, heads, head_dim] -> 3 x [B, heads, N, head_dim]; the official split order
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(b, n, c)))


class Mlp(nn.Module):
    """fc1 -> exact GELU -> dropout -> fc2 -> dropout (timm's Mlp). [B, N, dim] -> [B, N, dim]."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-LN transformer block. x [B, N, dim] -> [B, N, dim].

    `drop` is the dropout after the attention projection and inside/after the MLP; `attn_drop` the
    dropout on attention weights (official MAGE: both 0.1). No drop-path."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, drop: float = 0.0, attn_drop: float = 0.0,
                 eps: float = 1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, heads, attn_drop=attn_drop, proj_drop=drop)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def init_vit_weights(module: nn.Module) -> None:
    """The MAE/MAGE init, applied to every sub-module: Linear -> xavier_uniform weight and zero bias,
    LayerNorm -> weight 1, bias 0. Embeddings and free parameters are left to the caller."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            if m.weight is not None:
                nn.init.ones_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
