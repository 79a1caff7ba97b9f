"""Shared transformer layers under every model (MAGE, MAE, MR-MAE, UMD), timm-style.

Pre-LN block (attention through `attention`: SDPA or the plain product, whichever is faster for the case),
optionally with stochastic depth and DiT's adaLN-Zero:

    x = x + drop_path(attn(norm1(x)))                                    # plain (cond_dim=None)
    x = x + drop_path(mlp(norm2(x)))
    x = x + gate_msa * drop_path(attn(modulate(norm1(x), shift_msa, scale_msa)))   # adaLN-Zero (cond_dim set)
    x = x + gate_mlp * drop_path(mlp(modulate(norm2(x), shift_mlp, scale_mlp)))

Parameter names equal the official MAGE/MAE state_dicts (`norm1`, `attn.qkv`, `attn.proj`, `norm2`,
`mlp.fc1`, `mlp.fc2`), so official block tensors load with the identity key map. GELU is the exact (erf)
form, LayerNorm eps is 1e-6, qkv carries a bias, and the attention scale is head_dim ** -0.5 (the SDPA
default). The official code computes softmax(q k^T * scale) by hand in fp32; SDPA matches it in fp32 to
~1e-7 (measured against the official code). Under autocast attention runs in the autocast dtype.

Dropout (`dropout`, `Dropout`) draws its masks with `dropout_keep` on CPU, ~6x faster than `bernoulli_`, at a
rate quantised to 1/65,536; the function is otherwise F.dropout's (issue 18; tests/test_mage_speed.py).
"""
from __future__ import annotations

import math
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from timm.layers import PatchEmbed as _TimmPatchEmbed
from torch import nn

__all__ = ["dropout_keep", "dropout", "Dropout", "attention", "Attention", "Mlp", "DropPath", "Block", "compile_blocks",
           "modulate", "PatchEmbed", "sincos_pos_embed_2d", "learned_pos_embed", "init_vit_weights"]


def dropout_keep(shape: tuple[int, ...], p: float, device) -> tuple[torch.Tensor, float]:
    """An inverted-dropout draw: (keep bool [shape], True with probability 1 - p', scale 1 / (1 - p')).

    Drawn as 16-bit uniform integers (four per int64 from one `torch.randint`), so the rate is quantised to
    p' = round(65,536 p) / 65,536 (0.1 -> 0.100006) and the scale uses p' exactly, which keeps the expectation
    exact. On a CPU this is ~6x faster than `torch.bernoulli_`, which drew the masks in 31 % of a MAGE step
    (BENCHMARKS.md, "MAGE speed")."""
    n = math.prod(shape)
    drop = round(p * 65536)
    words = torch.randint(-2 ** 63, 2 ** 63 - 1, ((n + 3) // 4,), dtype=torch.int64, device=device)
    keep = words.view(torch.int16)[:n].view(shape) >= drop - 32768
    return keep, 65536 / (65536 - drop)


def _cheap_draw(x: torch.Tensor, p: float) -> bool:
    """Whether dropout of x at rate p draws with `dropout_keep`: on CPU, outside compiled code (other devices and
    inductor fuse the draw into their kernels, so they keep F.dropout), at a rate that quantises to neither 0
    nor 1."""
    return x.device.type == "cpu" and not torch.compiler.is_compiling() and 0 < round(p * 65536) < 65536


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """F.dropout(x, p, training) with `dropout_keep`'s cheaper draw where `_cheap_draw` allows it. The scale is a
    Python float, applied in fp32 arithmetic for every dtype, as F.dropout does (a bf16 multiplier tensor would
    round it)."""
    if not training or p == 0.0:
        return x
    if not _cheap_draw(x, p):
        return F.dropout(x, p, True)
    keep, scale = dropout_keep(x.shape, p, x.device)
    return torch.where(keep, x, 0.0).mul_(scale)   # `x * keep` would first copy keep to x's dtype


class Dropout(nn.Dropout):
    """nn.Dropout through `dropout` (same parameters, state_dict and repr)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor:
    """softmax(q k^T / sqrt(head_dim)) v with dropout on the weights; q, k, v [B, heads, N, head_dim] -> same.

    The same function as `F.scaled_dot_product_attention(q, k, v, dropout_p)`, through the faster form for the
    case (measured on a 2-core Xeon with AMX, BENCHMARKS.md "MAGE speed"): SDPA's fused kernels on GPUs and
    whenever no gradient is needed (inference: the CPU flash kernel is up to 3x faster than the plain
    product); in CPU training, SDPA's flash kernel for fp32 without dropout at N >= 192 tokens, else the plain
    product: SDPA's CPU backward runs bf16 2-6x slower than the plain product, and with dropout SDPA falls back
    to an unfused form with bernoulli_ masks that the plain product with `dropout_keep` beats."""
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    fused = q.device.type != "cpu" or (not needs_grad and dropout_p == 0.0) or \
        (q.dtype == torch.float32 and dropout_p == 0.0 and q.shape[-2] >= 192)
    if fused:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
    weights = ((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)).softmax(-1)   # [B, heads, N, N]
    if dropout_p == 0.0:
        return weights @ v
    if not _cheap_draw(weights, dropout_p):
        return F.dropout(weights, dropout_p, True) @ v
    keep, scale = dropout_keep(weights.shape, dropout_p, weights.device)
    return (torch.where(keep, weights, 0.0) @ v).mul_(scale)   # the 1/(1-p) on the N/head_dim times smaller product


class Attention(nn.Module):
    """Multi-head self-attention. x [B, N, dim] -> [B, N, dim].

    `attn_drop` is the dropout on the attention weights (in training only); `proj_drop` is the dropout after
    the output projection."""

    def __init__(self, dim: int, num_heads: int, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        # [B, N, 3, heads, head_dim] -> 3 x [B, heads, N, head_dim]; the official split order
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        x = attention(q, k, v, self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(b, n, c)))


class Mlp(nn.Module):
    """fc1 -> exact GELU -> dropout -> fc2 -> dropout (timm's Mlp). [B, N, dim] -> [B, N, dim]."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """DiT's adaLN modulation: x [B, N, D], shift/scale [B, D] -> x * (1 + scale) + shift, [B, N, D]."""
    return x * (1 + scale[:, None]) + shift[:, None]


class Block(nn.Module):
    """Pre-LN transformer block. x [B, N, dim] (and c [B, cond_dim] with cond_dim) -> [B, N, dim].

    `drop`: dropout after the attention projection and inside/after the MLP; `attn_drop`: dropout on the
    attention weights (official MAGE: both 0.1); `drop_path`: stochastic-depth rate on each residual branch
    (one per-sample Bernoulli draw per branch, attention first). With `cond_dim`, DiT's adaLN-Zero: the norms
    lose their affine parameters and `adaLN_modulation` (SiLU -> Linear(cond_dim, 6 dim), zero-initialised)
    maps c to shift/scale/gate for both branches, so the block is the identity at init. Without it the
    state_dict keys are the official ones."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, drop: float = 0.0, attn_drop: float = 0.0,
                 drop_path: float = 0.0, norm_layer: Callable[..., nn.Module] = partial(nn.LayerNorm, eps=1e-6),
                 cond_dim: int | None = None):
        super().__init__()
        self.cond_dim = cond_dim
        norm_kw = {} if cond_dim is None else {"elementwise_affine": False}
        self.norm1 = norm_layer(dim, **norm_kw)
        self.attn = Attention(dim, num_heads, attn_drop=attn_drop, proj_drop=drop)
        self.norm2 = norm_layer(dim, **norm_kw)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        if cond_dim is None:
            self.adaLN_modulation = None
        else:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 6 * dim))
            self.zero_modulation()

    def zero_modulation(self) -> None:
        """adaLN-Zero init: the modulation Linear's weight and bias to 0 (no-op without cond_dim)."""
        if self.adaLN_modulation is not None:
            nn.init.zeros_(self.adaLN_modulation[-1].weight)
            nn.init.zeros_(self.adaLN_modulation[-1].bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        if self.adaLN_modulation is None:
            if c is not None:
                raise ValueError("this Block has no cond_dim, so it takes no condition c")
            x = x + self.drop_path(self.attn(self.norm1(x)))
            return x + self.drop_path(self.mlp(self.norm2(x)))
        if c is None:
            raise ValueError(f"this Block is adaLN-conditioned (cond_dim {self.cond_dim}): pass c [B, {self.cond_dim}]")
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa[:, None] * self.drop_path(self.attn(modulate(self.norm1(x), shift_msa, scale_msa)))
        return x + gate_mlp[:, None] * self.drop_path(self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp)))


def compile_blocks(module: nn.Module) -> int:
    """torch.compile every `Block` inside `module` in place (`nn.Module.compile`: parameters and state_dict keys
    unchanged) -> the number of blocks. A block whose compilation fails at its first call falls back to eager
    (dynamo's suppress_errors), so a machine without a working compiler still trains."""
    import torch._dynamo

    torch._dynamo.config.suppress_errors = True
    blocks = [m for m in module.modules() if isinstance(m, Block)]
    for blk in blocks:
        blk.compile()
    return len(blocks)


class PatchEmbed(_TimmPatchEmbed):
    """timm's PatchEmbed (Conv2d `proj`, kernel = stride = patch) with a ValueError for a wrong input.
    images [B, in_chans, img, img] -> [B, N, embed_dim], N = (img // patch) ** 2, patches in row-major order."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768):
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not divisible by patch_size {patch_size}")
        super().__init__(img_size, patch_size, in_chans, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        expected = (self.proj.in_channels, *self.img_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"PatchEmbed expects images [B, {expected[0]}, {expected[1]}, {expected[2]}], "
                             f"got {list(x.shape)}")
        return super().forward(x)


def sincos_pos_embed_2d(embed_dim: int, grid_size: int, cls_token: bool = False) -> torch.Tensor:
    """MAE's fixed 2-D sin-cos table (`util/pos_embed.get_2d_sincos_pos_embed`) -> float32
    [grid_size**2 (+1), embed_dim], positions row-major, a zero first row for the cls slot if `cls_token`.

    As in MAE, the first half of the dims encodes grid[0] of `meshgrid(w, h)` ("xy" indexing: the column)
    and the second half the row; each half is [sin(pos * omega), cos(pos * omega)] with
    omega = 1 / 10000 ** (arange(D/4) / (D/4)). Computed in float64 like MAE's NumPy, then cast."""
    if embed_dim % 4:
        raise ValueError(f"embed_dim {embed_dim} must be divisible by 4 for a 2-D sin-cos embedding")
    quarter = embed_dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)   # [D/4]
    coords = torch.arange(grid_size, dtype=torch.float64)
    grid_h, grid_w = torch.meshgrid(coords, coords, indexing="ij")   # == np.meshgrid(w, h)[1], [0]

    def one_axis(pos: torch.Tensor) -> torch.Tensor:   # [G*G] -> [G*G, D/2]
        out = pos.reshape(-1, 1) * omega
        return torch.cat([out.sin(), out.cos()], 1)

    emb = torch.cat([one_axis(grid_w), one_axis(grid_h)], 1)   # [G*G, D]
    if cls_token:
        emb = torch.cat([emb.new_zeros(1, embed_dim), emb], 0)
    return emb.float()


def learned_pos_embed(num_positions: int, dim: int, std: float = 0.02) -> nn.Parameter:
    """A learned position table [1, num_positions, dim], normal(0, std) as MAGE's `decoder_pos_embed_learned`
    (drawn from the global RNG, like `nn.init.normal_`)."""
    return nn.Parameter(nn.init.normal_(torch.empty(1, num_positions, dim), std=std))


def init_vit_weights(module: nn.Module) -> None:
    """The MAE/MAGE init, applied to every sub-module: Linear -> xavier_uniform weight and zero bias,
    LayerNorm -> weight 1, bias 0. Embeddings and free parameters are left to the caller. The
    adaLN modulation of conditioned Blocks is zeroed again afterwards (DiT's order), so adaLN-Zero survives."""
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
    for m in module.modules():
        if isinstance(m, Block):
            m.zero_modulation()
