"""Frozen-encoder features of a labelled dataset, the input of the linear probe, kNN and few-shot evaluations.

Images go through the evaluation transform (resize the shorter side, centre crop) and the model's
`forward_features(images [B, 3, S, S] in [0, 1], pool) -> [B, D]`: MAGE (pool "mean": the official linear-probe
features; "cls": the [C0] output), the VQGAN tokenizer ("mean": the mean continuous latent before quantisation)
or the fine-tuned classifier.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from types import SimpleNamespace

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ..data.decode import BadImage, decode_image
from ..data.loader import subset
from ..data.sources import open_source
from ..data.transforms import EvalTransform
from ..errors import UserError
from ..models import from_pretrained, untrained_model
from ..outputs import atomic_write, prepare_dir, prepare_file
from ..progress import progress_bar
from ..weights import TRAIN_CONFIG_FILE, WEIGHTS_FILE, resolve_weights_dir

log = logging.getLogger("maskgen")


PIXELS = "pixels"


class PixelFeatures(nn.Module):
    """The raw-pixel baseline (`--ckpt pixels`): images [B, 3, S, S] in [0, 1] -> their pixels [B, 3*S*S]."""

    model_name = PIXELS

    def __init__(self, image_size: int = 32):
        super().__init__()
        self.config = SimpleNamespace(image_size=image_size)

    def forward_features(self, x: torch.Tensor, pool: str = "mean") -> torch.Tensor:
        return x.flatten(1)


def load_encoder(ckpt: str | os.PathLike, device: str = "cpu", untrained: bool = False, seed: int = 0,
                 image_size: int | None = None, layer: int | None = None, t: int | None = None) -> nn.Module:
    """The model saved in `ckpt` (weights / checkpoint / run directory), in eval mode; it must have
    `forward_features`. `untrained`: the same architecture at its seed-`seed` initialisation instead.
    `layer`: keep only the first `layer` blocks of a ViT encoder (MAGE, its classifier), so that the features are
    those of block `layer` (pooled as usual); None: all blocks.
    `ckpt='pixels'`: the raw pixels of `image_size` (default 32) images. `model.weights_id` identifies the weights
    for the feature cache; `model.trained_image_size` records `data.image_size` of the training run when the
    checkpoint has its train_config.yaml (the tokenizer's config has no image size of its own). `t`: features of
    images noised to diffusion step t, for models with a noise level (a `feature_t` attribute: UMD)."""
    if str(ckpt) == PIXELS and not Path(ckpt).exists():
        if untrained or layer is not None or t is not None:
            flag = "untrained" if untrained else "layer" if layer is not None else "t"
            raise UserError(f"--{flag} needs a checkpoint: the 'pixels' baseline has no weights")
        model = PixelFeatures(image_size or 32)
        model.weights_id = {"weights": PIXELS}
        return model
    model = untrained_model(ckpt, seed, device) if untrained else from_pretrained(ckpt, device=device)
    if not hasattr(model, "forward_features"):
        raise UserError(f"{ckpt} holds a '{model.model_name}' model, which has no features to extract")
    model.weights_id = {**_weights_id(ckpt), **({"untrained_seed": seed} if untrained else {})}
    if layer is not None:
        _truncate(model, layer, ckpt)
    if t is not None:
        _set_noise_level(model, t, ckpt)
    train_cfg = resolve_weights_dir(ckpt) / TRAIN_CONFIG_FILE
    if train_cfg.is_file():
        model.trained_image_size = (yaml.safe_load(train_cfg.read_text()) or {}).get("data", {}).get("image_size")
    return model


def _truncate(model: nn.Module, layer: int, ckpt) -> None:
    """Keep the first `layer` encoder blocks of `model` (in place) and record the layer in its `weights_id`; the
    last layer is the model as it is (its cached features are shared with runs without --layer)."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList):
        raise UserError(f"--layer applies to ViT encoders (MAGE, MAE); {ckpt} holds a '{model.model_name}' model")
    if not 1 <= layer <= len(blocks):
        raise UserError(f"--layer must be between 1 and {len(blocks)} (the encoder's depth), got {layer}")
    if layer < len(blocks):
        model.blocks = blocks[:layer]
        model.weights_id["layer"] = layer


def _set_noise_level(model: nn.Module, t: int, ckpt) -> None:
    """Features at diffusion step `t` (a model with `feature_t` and a `schedule`); recorded in its `weights_id`."""
    if not hasattr(model, "feature_t"):
        raise UserError(f"--t applies to diffusion models (UMD); {ckpt} holds a '{model.model_name}' model")
    steps = model.schedule.num_timesteps
    if not 0 <= t < steps:
        raise UserError(f"--t must lie in 0..{steps - 1} (the model's diffusion steps), got {t}")
    model.feature_t = t
    model.weights_id["t"] = t


def default_pool(model: nn.Module) -> str:
    """The pooling of `model`'s official linear probe: its `default_pool` ("cls" for MAE), else "mean"."""
    return getattr(model, "default_pool", "mean")


def model_image_size(model: nn.Module, image_size: int | None) -> int:
    """The side of the images fed to `model`: `image_size`, checked against what the model accepts, or the
    model's own `config.image_size` (else the image size it was trained at)."""
    own = getattr(model.config, "image_size", None)
    if image_size is None:
        image_size = own or getattr(model, "trained_image_size", None)
        if image_size is None:
            raise UserError(f"the '{model.model_name}' model does not record its image size: pass --image-size")
    if own is not None and image_size != own:
        raise UserError(f"--image-size {image_size} does not match the model, which takes {own}x{own} images")
    f = getattr(model.config, "downsample_factor", 1)
    if image_size < f or image_size % f:
        raise UserError(f"--image-size {image_size} must be a positive multiple of the model's downsampling "
                        f"factor {f}")
    return image_size


def compute_features(model: nn.Module, data: str, split: str, *, pool: str = "mean", image_size: int | None = None,
                     batch_size: int = 64, limit: int = 0, device: str = "cpu",
                     progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of the images of `data` (a folder, shards, 'cifar10' or 'mnist5k'; `split` for named sets):
    (features float32 [N, D], labels int64 [N], -1 = unlabeled). `limit` > 0 takes the same fixed random subset
    as `data.limit` in training (every class of a class-sorted source); unreadable images are skipped, and their
    number logged."""
    feats, labels, _ = _features(model, data, split, pool=pool, image_size=image_size, batch_size=batch_size,
                                 limit=limit, device=device, progress=progress)
    return feats, labels


@torch.no_grad()
def _features(model: nn.Module, data: str, split: str, *, pool: str = "mean", image_size: int | None = None,
              batch_size: int = 64, limit: int = 0, device: str = "cpu",
              progress: bool = True) -> tuple[torch.Tensor, torch.Tensor, int]:
    """`compute_features` and the number of unreadable images it skipped."""
    if pool not in ("mean", "cls"):
        raise UserError(f"pool must be 'mean' or 'cls', got {pool!r}")
    if batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    transform = EvalTransform(model_image_size(model, image_size))
    source = open_source(data, split)
    model.eval()
    feats, labels, batch, batch_labels = [], [], [], []
    skipped = 0

    def flush():
        if batch:
            try:
                out = model.forward_features(torch.stack(batch).to(device), pool=pool)
            except ValueError as e:  # e.g. a pooling the model does not have
                raise UserError(str(e)) from None
            feats.append(out.float().cpu())
            labels.extend(batch_labels)
            batch.clear()
            batch_labels.clear()

    for i in progress_bar(subset(len(source), limit), unit="img", desc=f"features {data}:{split}", enabled=progress):
        s = source[i]
        try:
            img = s.data if not isinstance(s.data, bytes) else decode_image(s.data)
        except BadImage:
            skipped += 1
            continue
        batch.append(transform(img))
        batch_labels.append(s.label)
        if len(batch) == batch_size:
            flush()
    flush()
    if not feats:
        raise UserError(f"no readable image in {data} ({skipped} unreadable)")
    _warn_skipped(skipped, data)
    return torch.cat(feats).contiguous(), torch.tensor(labels, dtype=torch.long), skipped


def _warn_skipped(skipped: int, data: str) -> None:
    if skipped:
        log.warning("%s: %d unreadable images were skipped", data, skipped)


def extract_features(ckpt: str | os.PathLike, data: str, out: str | os.PathLike, split: str = "train",
                     pool: str | None = None, image_size: int | None = None, batch_size: int = 64, limit: int = 0,
                     device: str = "cpu", progress: bool = True, layer: int | None = None,
                     t: int | None = None) -> Path:
    """`maskgen features`: features of every image of `data` (see `compute_features`) into a safetensors file
    with `features` float32 [N, D] and `labels` int64 [N] (-1 = unlabeled); its metadata holds the number of
    unreadable images skipped. `layer`: features of that encoder block (see `load_encoder`); `pool` None: the
    model's `default_pool`; `t`: features of images noised to diffusion step t (UMD)."""
    out = prepare_file(out, "features file")
    model = load_encoder(ckpt, device, layer=layer, t=t)
    pool = pool or default_pool(model)
    feats, labels, skipped = _features(model, data, split, pool=pool, image_size=image_size, batch_size=batch_size,
                                       limit=limit, device=device, progress=progress)
    with atomic_write(out) as tmp:
        save_file({"features": feats, "labels": labels}, str(tmp), metadata={
            "ckpt": str(ckpt), "data": str(data), "split": split, "pool": pool, "skipped": str(skipped),
            "layer": str(layer or "last"), "t": "clean" if t is None else str(t)})
    return out


def _weights_id(ckpt: str | os.PathLike) -> dict:
    """The resolved weights file of `ckpt`: path, size and modification time."""
    weights = resolve_weights_dir(ckpt) / WEIGHTS_FILE
    st = weights.stat()
    return {"weights": str(weights.resolve()), "size": st.st_size, "mtime": st.st_mtime_ns}


def _cache_key(ckpt: str | os.PathLike, model: nn.Module, **fields) -> str:
    """A hash of the model's weights (`weights_id` of `load_encoder`, else those of `ckpt`) and the extraction
    settings."""
    text = json.dumps({**(getattr(model, "weights_id", None) or _weights_id(ckpt)), **fields}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cached_features(ckpt: str | os.PathLike, model: nn.Module, data: str, split: str, cache_dir: str | None,
                    **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """`compute_features(model, data, split, **kwargs)`, read from / written to
    `cache_dir/features-<hash>.safetensors` when `cache_dir` is given (`model` from `load_encoder`). The hash
    covers the weights (trained or untrained, and the --layer), data, split, pool, image size and limit, so a
    changed checkpoint or setting is recomputed, never reused. The number of unreadable images skipped is kept in
    the file's metadata and logged again when it is reused."""
    if not cache_dir:
        return compute_features(model, data, split, **kwargs)
    data_id = str(Path(data).resolve()) if Path(data).exists() else data
    key = _cache_key(ckpt, model, data=data_id, split=split, pool=kwargs.get("pool", "mean"),
                     image_size=model_image_size(model, kwargs.get("image_size")), limit=kwargs.get("limit", 0))
    path = Path(cache_dir) / f"features-{key}.safetensors"
    if path.is_file():
        with safe_open(str(path), "pt") as f:
            _warn_skipped(int((f.metadata() or {}).get("skipped", 0)), data)
        t = load_file(str(path))
        return t["features"], t["labels"]
    prepare_dir(cache_dir, "feature cache")
    x, y, skipped = _features(model, data, split, **kwargs)
    with atomic_write(path) as tmp:
        save_file({"features": x, "labels": y}, str(tmp), metadata={
            "ckpt": str(ckpt), "data": data_id, "split": split, "pool": kwargs.get("pool", "mean"),
            "skipped": str(skipped)})
    return x, y


def require_labels(labels: torch.Tensor, data: str) -> None:
    """A probe needs every image labelled: raise a UserError naming `data` otherwise."""
    if bool((labels < 0).any()):
        n = int((labels < 0).sum())
        raise UserError(f"{data} has {n} unlabeled image(s): evaluations need class labels (an image folder with one "
                        f"sub-folder per class, shards with .cls members, 'cifar10' or 'mnist5k')")
