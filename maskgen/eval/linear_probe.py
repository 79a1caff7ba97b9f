"""Linear probing of frozen features, as in MAE / MAGE `main_linprobe.py`.

head = BatchNorm1d(D, affine=False, eps=1e-6) -> Linear(D, C) (weight trunc_normal std 0.01, bias 0), trained
with LARS (momentum 0.9, trust coefficient 0.001, weight decay 0), lr = blr x batch / 256 (blr 0.1), linear
warm-up (epochs / 9: 10 of 90) then half-cosine to 0, per step; plain cross-entropy. Also SGD (momentum 0.9)
and AdamW (blr 1e-3, betas 0.9/0.999) for comparison.

Fast path (`train_linear_probe`): features computed once (centre crop) and the head trained on them.
Paper path (`train_linear_probe_augmented`): every epoch draws RandomResizedCrop(scale 0.2-1, bicubic) + flip
views and runs the frozen encoder on them.
"""
from __future__ import annotations

import logging
import math
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..engine.optim import LARS, lr_at, scaled_lr, set_lr
from ..data.loader import AugmentedImages, ResumableLoader
from ..data.sources import open_source
from ..data.transforms import PretrainTransform
from ..errors import UserError
from ..progress import progress_bar
from .features import model_image_size

log = logging.getLogger("maskgen")

OPTIMIZERS = ("lars", "sgd", "adamw")
NEAR_CHANCE = 0.9  # a last training loss above this fraction of ln(classes): the head barely left chance
DEFAULT_BLR = {"lars": 0.1, "sgd": 0.1, "adamw": 1e-3}


def probe_head(dim: int, num_classes: int) -> nn.Sequential:
    """BatchNorm1d(dim, affine=False, eps=1e-6) + Linear(dim, num_classes): [B, dim] -> logits [B, C]."""
    linear = nn.Linear(dim, num_classes)
    nn.init.trunc_normal_(linear.weight, std=0.01)
    nn.init.zeros_(linear.bias)
    return nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), linear)


def make_optimizer(name: str, params, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """LARS / SGD (momentum 0.9) / AdamW (betas 0.9, 0.999); the lr is set every step by the schedule."""
    if name == "lars":
        return LARS(params, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=0.0, momentum=0.9, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=0.0, betas=(0.9, 0.999), weight_decay=weight_decay)
    raise UserError(f"unknown optimizer '{name}' (choose {', '.join(OPTIMIZERS)})")


@torch.no_grad()
def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> dict[str, float]:
    """logits [N, C], labels [N] -> {"top1": %, "top5": %} (k clipped to C)."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hit = top == labels[:, None]
    return {f"top{k}": 100.0 * hit[:, :k].any(1).float().mean().item() for k in ks}


def check_features(train_x, train_y, test_x, test_y) -> int:
    """Shapes and labels of a probe's inputs; returns the number of classes (max label + 1)."""
    if train_x.dim() != 2 or test_x.dim() != 2:
        raise UserError(f"features must be [N, D] matrices, got {list(train_x.shape)} and {list(test_x.shape)}")
    if train_x.shape[1] != test_x.shape[1]:
        raise UserError(f"train features have {train_x.shape[1]} dimensions but test features {test_x.shape[1]}: "
                        f"they must come from the same model and pooling")
    if len(train_x) != len(train_y) or len(test_x) != len(test_y):
        raise UserError(f"features and labels differ in number: train {len(train_x)} vs {len(train_y)}, "
                        f"test {len(test_x)} vs {len(test_y)}")
    if len(train_x) < 2 or len(test_x) < 1:
        raise UserError("a probe needs at least 2 training and 1 test sample")
    if bool((train_y < 0).any()) or bool((test_y < 0).any()):
        raise UserError("every sample needs a class label (found label -1: unlabeled data)")
    return int(max(train_y.max(), test_y.max())) + 1


def fit_head(head: nn.Module, forward: Callable[[torch.Tensor], torch.Tensor],
             epoch_batches: Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor]]], steps_per_epoch: int, *,
             epochs: int, lr: float, optimizer: str, weight_decay: float, warmup_epochs: float | None,
             progress: bool) -> float:
    """Train `head` on `forward(inputs)` for `epochs` passes of `epoch_batches(epoch)`, with warm-up + cosine per
    step. Returns the mean training loss of the last epoch, and warns when it is still near chance (ln C)."""
    opt = make_optimizer(optimizer, head.parameters(), weight_decay)
    total = epochs * steps_per_epoch
    warmup = round((epochs / 9 if warmup_epochs is None else warmup_epochs) * steps_per_epoch)
    step, last = 0, float("nan")
    bar = progress_bar(range(epochs), unit="epoch", desc="linear probe", enabled=progress)
    for epoch in bar:
        head.train()
        losses = []
        for x, y in epoch_batches(epoch):
            set_lr(opt, lr_at(step, lr, total, warmup))
            loss = F.cross_entropy(head(forward(x)), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            step += 1
        last = sum(losses) / max(1, len(losses))
        if not math.isfinite(last):
            raise UserError(f"the probe's loss became {last} in epoch {epoch}: lower --lr / --blr")
        bar.set_postfix(loss=f"{last:.4f}", refresh=False)
    classes = head[-1].out_features
    if classes > 1 and last > NEAR_CHANCE * math.log(classes):
        log.warning("the probe's head stayed near chance: its last training loss %.3f is %.0f %% of ln %d = %.3f, so "
                    "its accuracy says little about the features (%s at lr %.3g barely moved it: try --optimizer "
                    "sgd, a larger --lr or more --epochs)", last, 100 * last / math.log(classes), classes,
                    math.log(classes), optimizer, lr)
    return last


def train_linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor, *,
                       epochs: int = 90, batch_size: int = 256, lr: float | None = None, optimizer: str = "lars",
                       weight_decay: float = 0.0, warmup_epochs: float | None = None, seed: int = 0,
                       progress: bool = True) -> dict:
    """Train the probe head on precomputed features train_x [N, D] / train_y [N] (int64 class ids) and evaluate
    it on test_x [M, D] / test_y [M]. lr None: blr x batch / 256 (blr: lars/sgd 0.1, adamw 1e-3). Batches are
    drawn without replacement by a generator seeded with `seed`; the last incomplete batch is dropped (as MAE).
    Returns {"top1", "top5" (percent), "train_loss", "lr", "epochs", "batch_size", "optimizer", "num_train",
    "num_test", "num_classes", "dim"}."""
    num_classes = check_features(train_x, train_y, test_x, test_y)
    if epochs < 1 or batch_size < 1:
        raise UserError("--epochs and --batch-size must be at least 1")
    if optimizer not in OPTIMIZERS:
        raise UserError(f"unknown optimizer '{optimizer}' (choose {', '.join(OPTIMIZERS)})")
    torch.manual_seed(seed)
    train_x, test_x = train_x.float(), test_x.float()
    batch_size = min(batch_size, len(train_x))
    lr = scaled_lr(DEFAULT_BLR[optimizer], batch_size) if lr is None else lr
    head = probe_head(train_x.shape[1], num_classes)
    g = torch.Generator().manual_seed(seed)
    steps = len(train_x) // batch_size

    def epoch_batches(epoch):
        perm = torch.randperm(len(train_x), generator=g)
        for k in range(steps):
            idx = perm[k * batch_size:(k + 1) * batch_size]
            yield train_x[idx], train_y[idx]

    loss = fit_head(head, lambda x: x, epoch_batches, steps, epochs=epochs, lr=lr, optimizer=optimizer,
                    weight_decay=weight_decay, warmup_epochs=warmup_epochs, progress=progress)
    head.eval()
    with torch.no_grad():
        acc = topk_accuracy(head(test_x), test_y)
    return {**acc, "train_loss": loss, "lr": lr, "epochs": epochs, "batch_size": batch_size, "optimizer": optimizer,
            "num_train": len(train_x), "num_test": len(test_x), "num_classes": num_classes, "dim": train_x.shape[1]}


def train_linear_probe_augmented(model: nn.Module, data: str, split: str, test_x: torch.Tensor,
                                 test_y: torch.Tensor, *, pool: str = "mean", image_size: int | None = None,
                                 epochs: int = 90, batch_size: int = 256, lr: float | None = None,
                                 optimizer: str = "lars", weight_decay: float = 0.0,
                                 warmup_epochs: float | None = None, limit: int = 0, num_workers: int = 0,
                                 seed: int = 0, device: str = "cpu", progress: bool = True) -> dict:
    """The paper path: the head is trained on features of fresh RandomResizedCrop(scale 0.2-1) + flip views of
    `data` (frozen `model`, eval mode, no grad), and evaluated on precomputed centre-crop test_x [M, D] / test_y.
    Augmentation is keyed by (seed, epoch, index), as in pre-training. Returns what `train_linear_probe` does."""
    if optimizer not in OPTIMIZERS:
        raise UserError(f"unknown optimizer '{optimizer}' (choose {', '.join(OPTIMIZERS)})")
    source = open_source(data, split)
    if not source.classes:
        raise UserError(f"{data} is unlabeled: the probe needs class labels (one sub-folder per class, .cls members)")
    dataset = AugmentedImages(source, PretrainTransform(model_image_size(model, image_size), scale=(0.2, 1.0)), seed)
    loader = ResumableLoader(dataset, min(batch_size, len(source)), seed, limit=limit, num_workers=num_workers)
    num_classes = max(int(test_y.max()) + 1, len(source.classes))
    torch.manual_seed(seed)
    head = probe_head(test_x.shape[1], num_classes).to(device)
    lr = scaled_lr(DEFAULT_BLR[optimizer], loader.batch_size) if lr is None else lr
    model.eval()

    def epoch_batches(epoch):
        for batch in loader.epoch_batches(epoch):
            if "label" not in batch:
                continue
            y = batch["label"].to(device)
            if bool((y < 0).any()):
                raise UserError(f"{data} has unlabeled images: the probe needs class labels")
            if int(y.max()) >= num_classes:
                raise UserError(f"{data} has class {int(y.max())} that the test set lacks")
            yield batch["image"].to(device), y

    def features(images):
        with torch.no_grad():
            return model.forward_features(images, pool=pool).float()

    loss = fit_head(head, features, epoch_batches, loader.batches_per_epoch, epochs=epochs, lr=lr,
                    optimizer=optimizer, weight_decay=weight_decay, warmup_epochs=warmup_epochs, progress=progress)
    head.eval()
    with torch.no_grad():
        acc = topk_accuracy(head(test_x.float().to(device)).cpu(), test_y)
    return {**acc, "train_loss": loss, "lr": lr, "epochs": epochs, "batch_size": loader.batch_size,
            "optimizer": optimizer, "num_train": loader.num_samples, "num_test": len(test_x),
            "num_classes": num_classes, "dim": test_x.shape[1]}
