"""The frozen reference: MAGE's training loss and generation logits exactly as maskgen computed them before the
speed work of issue 18 (commit b3be06d), written as plain functions over a `MAGE` module's parameters.

`mage_speed.py` times it (with `ReferenceMaskGIT`, the sampler of that commit) beside today's model, and `tests/test_mage_speed.py` checks that today's logits and
losses equal it (same weights, same masks, dropout off) within 1e-5 in fp32. It is deliberately the slow
form and must not be optimised: it is the yardstick.

What it does (the data flow of `maskgen/models/mage.py`):
  ids = [C0] + tokens (masked -> [MASK]) -> word + position embedding -> LayerNorm -> F.dropout -> drop the
  dropped tokens -> blocks (LN -> qkv -> SDPA with dropout_p -> proj -> F.dropout; LN -> fc1 -> GELU ->
  F.dropout -> fc2 -> F.dropout) -> norm -> decoder_embed -> [C] padding -> + decoder position -> decoder
  blocks -> decoder_norm -> fc -> GELU -> LN -> logits against all `vocab` rows of the word table + bias at
  ALL 1+L positions; the loss slices [:, 1:, :K] and averages a label-smoothed cross-entropy over the masked
  positions with a 0/1 weight.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from maskgen.sampling.base import row_generators
from maskgen.sampling.maskgit import MaskGITScheduler


def _block(blk, x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    a = blk.attn
    b, n, c = x.shape
    h = F.layer_norm(x, (c,), blk.norm1.weight, blk.norm1.bias, blk.norm1.eps)
    q, k, v = F.linear(h, a.qkv.weight, a.qkv.bias).view(b, n, 3, a.num_heads, c // a.num_heads) \
        .permute(2, 0, 3, 1, 4).unbind(0)
    h = F.scaled_dot_product_attention(q, k, v, dropout_p=p if training else 0.0)
    h = F.linear(h.transpose(1, 2).reshape(b, n, c), a.proj.weight, a.proj.bias)
    x = x + F.dropout(h, p, training)
    m = blk.mlp
    h = F.layer_norm(x, (c,), blk.norm2.weight, blk.norm2.bias, blk.norm2.eps)
    h = F.dropout(F.gelu(F.linear(h, m.fc1.weight, m.fc1.bias)), p, training)
    return x + F.dropout(F.linear(h, m.fc2.weight, m.fc2.bias), p, training)


def reference_logits(model, tokens: torch.Tensor, mask: torch.Tensor | None = None,
                     drop_mask: torch.Tensor | None = None) -> torch.Tensor:
    """tokens [B, L] long, mask / drop_mask bool [B, L] or None -> logits [B, 1+L, vocab] (train mode follows
    `model.training`: dropout with the config's rate)."""
    cfg, training = model.config, model.training
    p = cfg.dropout
    b, length = tokens.shape
    lead = torch.zeros(b, 1, dtype=torch.bool, device=tokens.device)
    mask_c = torch.cat([lead, mask], 1) if mask is not None else lead.expand(b, length + 1)
    drop_c = torch.cat([lead, drop_mask], 1) if drop_mask is not None else lead.expand(b, length + 1)
    if mask is not None:
        tokens = torch.where(mask, torch.full_like(tokens, cfg.mask_id), tokens)
    ids = torch.cat([torch.full((b, 1), cfg.cls_id, dtype=torch.long, device=tokens.device), tokens], 1)
    te = model.token_emb
    x = te.word_embeddings(ids) + te.position_embeddings.weight[: ids.shape[1]]
    x = F.dropout(F.layer_norm(x, (x.shape[-1],), te.LayerNorm.weight, te.LayerNorm.bias, te.LayerNorm.eps), p,
                  training)
    keep = ~drop_c
    if drop_mask is not None:
        x = x[keep].view(b, -1, x.shape[-1])
    for blk in model.blocks:
        x = _block(blk, x, p, training)
    x = model.norm(x)
    x = model.decoder_embed(x)
    d, n = x.shape[-1], length + 1
    cls_feature = x[:, :1].expand(b, n, d)
    if drop_mask is None:
        scattered = x
    else:
        src = (keep.long().cumsum(1) - 1).clamp_min(0)
        scattered = x.gather(1, src[..., None].expand(b, n, d))
    x = torch.where((keep & ~mask_c)[..., None], scattered, cls_feature) + model.decoder_pos_embed_learned
    for blk in model.decoder_blocks:
        x = _block(blk, x, p, training)
    x = model.decoder_norm(x)
    mlm = model.mlm_layer
    h = mlm.ln(F.gelu(mlm.fc(x)))
    return h @ te.word_embeddings.weight.detach().t() + mlm.bias


def reference_loss(model, tokens: torch.Tensor, mask: torch.Tensor, drop_mask: torch.Tensor,
                   label_smoothing: float) -> torch.Tensor:
    """The loss of `mage_loss` before issue 18 for given masks: tokens [B, L] -> 0-d loss."""
    b = tokens.shape[0]
    logits = reference_logits(model, tokens, mask, drop_mask)[:, 1:, : model.config.codebook_size].float()
    per_token = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1),
                                label_smoothing=label_smoothing, reduction="none").view(b, -1)
    weight = mask.float()
    return (per_token * weight).sum() / weight.sum().clamp_min(1.0)


def reference_token_logits(model, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`MAGE.token_logits` before issue 18: tokens [B, L], mask [B, L] bool -> [B, L, K] fp32 at every
    position, nothing dropped."""
    tokens = tokens.reshape(tokens.shape[0], -1).masked_fill(mask, 0)
    return reference_logits(model, tokens, mask.reshape(tokens.shape))[:, 1:, : model.config.codebook_size].float()


class ReferenceMaskGIT(MaskGITScheduler):
    """The MaskGIT sampler before issue 18: tokens drawn with `torch.multinomial` (one generator for the batch,
    or one per row); everything else is today's sampler."""

    def sample(self, logits: torch.Tensor, generator=None) -> torch.Tensor:
        if self.temperature == 0:
            return logits.argmax(-1)
        probs = torch.softmax(logits.float() / self.temperature, dim=-1)
        b, n, k = probs.shape
        gens = row_generators(generator, b)
        if gens is None:
            return torch.multinomial(probs.reshape(b * n, k), 1, generator=generator).view(b, n)
        return torch.stack([torch.multinomial(probs[i], 1, generator=g).squeeze(1) for i, g in enumerate(gens)])


class ReferenceSampling:
    """Wraps a MAGE model so that a MaskGIT sampler calls `reference_token_logits` in place of the model's own
    `token_logits` (the generation yardstick): every other attribute is the model's."""

    def __init__(self, model):
        self._model = model

    def __getattr__(self, name):
        return getattr(self._model, name)

    def token_logits(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return reference_token_logits(self._model, tokens, mask.reshape(tokens.shape[0], -1).bool())
