"""`maskgen train tokenizer`: the VQGAN tokenizer trained on reconstruction + VQ losses."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchvision.utils import make_grid, save_image

from ..config import option
from ..models.vqgan import VQGAN, VQGANConfig
from . import MethodSpec
from .base import HookContext, Method


@dataclass
class TokenizerLossConfig:
    recon: str = option("l1", "pixel reconstruction loss", choices=("l1", "l2"))
    recon_weight: float = option(1.0, "weight of the pixel reconstruction loss", min=0.0)
    codebook_weight: float = option(1.0, "weight of the VQ codebook + beta x commitment loss", min=0.0)


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean PSNR (dB) of images in [0,1], [B,3,H,W]."""
    mse = (x.clamp(0, 1) - y).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return (-10 * torch.log10(mse)).mean()


class TokenizerMethod(Method):
    def __init__(self, model_cfg: VQGANConfig, loss_cfg: TokenizerLossConfig):
        super().__init__()
        self.vqgan = VQGAN(model_cfg)
        self.loss_cfg = loss_cfg

    def release_model(self) -> VQGAN:
        return self.vqgan

    def forward_loss(self, batch: dict):
        x = batch["image"]
        out = self.vqgan(x)
        recon = out["recon"].float()
        rec = F.l1_loss(recon, x) if self.loss_cfg.recon == "l1" else F.mse_loss(recon, x)
        vq = out["codebook_loss"] + self.vqgan.config.commitment_beta * out["commitment_loss"]
        loss = self.loss_cfg.recon_weight * rec + self.loss_cfg.codebook_weight * vq
        stats = self.vqgan.codebook_stats(out["codes"])
        logs = {"recon": rec.detach(), "vq": vq.detach(), "psnr": psnr(recon.detach(), x),
                "usage": stats["usage"], "perplexity": stats["perplexity"]}
        return loss, logs

    def hooks(self):
        return [reconstruction_grid]


@torch.no_grad()
def reconstruction_grid(method: TokenizerMethod, ctx: HookContext) -> None:
    """samples/recon_step_N.png: originals (top rows) above their reconstructions; logs PSNR and usage."""
    if ctx.images is None:
        return
    x = ctx.images.to(ctx.device)
    codes = method.vqgan.encode(x)
    y = method.vqgan.decode(codes)
    grid = make_grid(torch.cat([x, y]).cpu(), nrow=min(8, len(x)))
    out = ctx.run_dir / "samples" / f"recon_step_{ctx.step:08d}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    save_image(grid, out)
    stats = method.vqgan.codebook_stats(codes)
    ctx.log({"eval/psnr": float(psnr(y, x)), "eval/usage": float(stats["usage"])})
    ctx.log_image("reconstructions", grid)


SPEC = MethodSpec(
    name="tokenizer",
    summary="VQGAN tokenizer (MaskGIT/MAGE architecture): reconstruction + VQ losses",
    model_config=VQGANConfig,
    loss_config=TokenizerLossConfig,
    build=lambda cfg: TokenizerMethod(cfg.model, cfg.loss),
)
