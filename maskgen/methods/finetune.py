"""End-to-end fine-tuning of a pre-trained encoder (MAGE, MAE: official `main_finetune.py`), as the training method
`finetune` of the engine: checkpoints, `--resume auto`, torchrun/DDP and logging come from there.

Per step: images (RandomResizedCrop + flip from `data`, then optional RandAugment) -> optional mixup / cutmix
(timm's batch mode: one lambda per batch, cutmix or mixup chosen with `switch_prob`) -> soft-target
cross-entropy with label smoothing. AdamW with layer-wise lr decay: parameter group of layer i gets
lr x layer_decay^(depth + 1 - i) (embeddings 0, blocks.i i+1, norms and head depth+1); 1-D parameters get no
weight decay. The pre-trained model builds its classifier (`as_classifier(num_classes, drop_path, pool)`: MAGE ->
`MAGEClassifier`, MAE -> `MAEClassifier`, UMD -> `UMDClassifier`), which gives `layer_id(name)` and `num_layers`.
The periodic / final hook evaluates top-1/top-5 on `finetune.eval_data` (centre crop) and writes
`eval/finetune.json` in the run directory.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms import v2

from ..data.sources import open_source
from ..engine.method import HookContext, Method
from ..errors import ConfigError, UserError
from ..eval.features import compute_features
from ..eval.linear_probe import topk_accuracy
from ..eval.report import write_json
from ..models import from_pretrained
from ..options import Options, option
from ..registry import METHODS

RESULT_FILE = "eval/finetune.json"


@dataclass
class FinetuneModelConfig(Options):
    pretrained: str = option("", "pre-trained MAGE (with its tokenizer) or MAE weights / checkpoint / run directory")
    num_classes: int = option(0, "classes of the head (0: from the training data's labels)", min=0)
    pool: str = option("mean", "mean: fc_norm of the mean image-token output (official); cls: norm of the class "
                               "token",
                       choices=("mean", "cls"))
    drop_path: float = option(0.1, "stochastic depth rate of the last block (official: B 0.1, L 0.2)", min=0.0,
                              max=0.9)
    layer_decay: float = option(0.65, "layer-wise lr decay (official: B 0.65, L 0.75; 1: none)", min=0.0, max=1.0)


@dataclass
class FinetuneObjective(Options):
    label_smoothing: float = option(0.1, "label smoothing of the targets", min=0.0, max=0.5)
    mixup: float = option(0.0, "mixup Beta(alpha, alpha) (official: 0.8; 0: off)", min=0.0)
    cutmix: float = option(0.0, "cutmix Beta(alpha, alpha) (official: 1.0; 0: off)", min=0.0)
    mix_prob: float = option(1.0, "probability of mixing a batch", min=0.0, max=1.0)
    switch_prob: float = option(0.5, "probability of cutmix rather than mixup when both are on", min=0.0, max=1.0)
    randaugment: bool = option(False, "torchvision RandAugment on every training image (official: rand-m9)")
    ra_num_ops: int = option(2, "RandAugment operations per image", min=1)
    ra_magnitude: int = option(9, "RandAugment magnitude (0-30)", min=0, max=30)
    eval_data: str = option("", "labelled data evaluated by the hook (folder, shards, cifar10, mnist5k; '': none)")
    eval_split: str = option("test", "split of a named eval_data set", choices=("train", "test"))
    eval_limit: int = option(0, "evaluate a fixed random subset of N images (0: all)", min=0)


def mix_batch(images: torch.Tensor, labels: torch.Tensor, num_classes: int, cfg: FinetuneObjective):
    """images [B, 3, H, W], labels [B] -> (mixed images, soft targets [B, C]) with label smoothing; mixing partner
    of sample i is sample B-1-i (timm's batch flip). Randomness: torch's global RNG (re-seeded by the engine)."""
    off = cfg.label_smoothing / num_classes
    one_hot = F.one_hot(labels, num_classes).float()
    y1 = one_hot * (1.0 - cfg.label_smoothing) + off
    lam = 1.0
    alphas_on = cfg.mixup > 0 or cfg.cutmix > 0
    if alphas_on and torch.rand(()).item() < cfg.mix_prob:
        use_cutmix = cfg.cutmix > 0 and (cfg.mixup == 0 or torch.rand(()).item() < cfg.switch_prob)
        alpha = cfg.cutmix if use_cutmix else cfg.mixup
        lam = float(torch.distributions.Beta(alpha, alpha).sample())
        flipped = images.flip(0)
        if use_cutmix:
            h, w = images.shape[-2:]
            ratio = (1 - lam) ** 0.5
            ch, cw = int(h * ratio), int(w * ratio)
            cy, cx = int(torch.randint(h, ())), int(torch.randint(w, ()))
            y0, y1_, x0, x1 = max(cy - ch // 2, 0), min(cy + ch // 2, h), max(cx - cw // 2, 0), min(cx + cw // 2, w)
            images = images.clone()
            images[..., y0:y1_, x0:x1] = flipped[..., y0:y1_, x0:x1]
            lam = 1 - (y1_ - y0) * (x1 - x0) / (h * w)
        else:
            images = images * lam + flipped * (1 - lam)
    return images, y1 * lam + y1.flip(0) * (1 - lam)


def num_classes_of(data: str, split: str) -> int:
    source = open_source(data, split)
    if not source.classes:
        raise UserError(f"{data} is unlabeled: fine-tuning needs class labels (one sub-folder per class, .cls members)")
    return max(len(source.classes), max((c + 1 for c in source.classes if isinstance(c, int)), default=0))


@METHODS.register("finetune", model=FinetuneModelConfig, options=FinetuneObjective,
                  summary="end-to-end fine-tuning of a MAGE or MAE encoder + linear head (layer-wise lr decay, "
                          "mixup/cutmix)")
class FinetuneMethod(Method):
    def __init__(self, cfg):
        super().__init__()
        m = cfg.model
        if not m.pretrained:
            raise ConfigError("model.pretrained is required: the pre-trained checkpoint to fine-tune (--ckpt)")
        pre = from_pretrained(m.pretrained)
        if not callable(getattr(pre, "as_classifier", None)):
            raise UserError(f"{m.pretrained} holds a '{pre.model_name}' model: fine-tuning needs a pre-trained "
                            f"encoder (MAGE, MAE)")
        if cfg.data.image_size != pre.config.image_size:
            raise ConfigError(f"data.image_size={cfg.data.image_size} but the {pre.model_name} model takes "
                              f"{pre.config.image_size}x{pre.config.image_size} images")
        num_classes = m.num_classes or num_classes_of(cfg.data.path, cfg.data.split)
        self.classifier = pre.as_classifier(num_classes, m.drop_path, m.pool)
        self.layer_decay, self.loss_cfg = m.layer_decay, cfg.objective
        self.randaugment = None
        if cfg.objective.randaugment:
            self.randaugment = v2.RandAugment(cfg.objective.ra_num_ops, cfg.objective.ra_magnitude)

    def release_model(self) -> nn.Module:
        return self.classifier

    def optim_groups(self, weight_decay: float) -> list[dict]:
        """One group per (layer, decayed?) with lr_scale = layer_decay^(depth + 1 - layer)."""
        top = self.classifier.num_layers
        groups: dict = {}
        for name, p in self.classifier.named_parameters():
            if not p.requires_grad:
                continue
            layer = self.classifier.layer_id(name)
            decay = p.ndim > 1 and not name.endswith(".bias")
            g = groups.setdefault((layer, decay), {"params": [], "weight_decay": weight_decay if decay else 0.0,
                                                   "lr_scale": self.layer_decay ** (top - layer)})
            g["params"].append(p)
        return [groups[k] for k in sorted(groups)]

    def _augment(self, images: torch.Tensor) -> torch.Tensor:
        if self.randaugment is None:
            return images
        as_uint8 = (images * 255).round().clamp(0, 255).to(torch.uint8)
        return torch.stack([self.randaugment(img) for img in as_uint8]).float() / 255

    def forward_loss(self, batch: dict):
        labels = batch["label"]
        if bool((labels < 0).any()):
            raise UserError("fine-tuning needs labelled images: the batch holds unlabeled ones (label -1)")
        num_classes = self.classifier.config.num_classes
        if int(labels.max()) >= num_classes:
            raise UserError(f"label {int(labels.max())} is outside the head's {num_classes} classes")
        images, targets = mix_batch(self._augment(batch["image"]), labels, num_classes, self.loss_cfg)
        logits = self.classifier(images)
        loss = torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
        return loss, {"acc": (logits.argmax(1) == labels).float().mean().detach()}

    def hooks(self):
        return [evaluate_hook] if self.loss_cfg.eval_data else []


class _LogitsView(torch.nn.Module):
    """Presents a classifier's logits as `forward_features`, so `compute_features` can run it on a dataset."""

    def __init__(self, classifier: nn.Module):
        super().__init__()
        self.classifier, self.model_name = classifier, classifier.model_name
        self.config = SimpleNamespace(image_size=classifier.image_size)

    def forward_features(self, images: torch.Tensor, pool: str = "mean") -> torch.Tensor:
        return self.classifier(images)


def evaluate_classifier(classifier: nn.Module, data: str, split: str, limit: int = 0, device="cpu",
                        progress: bool = False) -> dict:
    """Top-1 / top-5 (percent) of `classifier` on `data` (centre crop)."""
    was_training = classifier.training
    classifier.eval()
    logits, labels = compute_features(_LogitsView(classifier), data, split, limit=limit, device=str(device),
                                      progress=progress)
    classifier.train(was_training)
    if bool((labels < 0).any()):
        raise UserError(f"finetune.eval_data {data} has unlabeled images")
    return {**topk_accuracy(logits, labels), "num_eval": len(labels)}


def evaluate_hook(method: FinetuneMethod, ctx: HookContext) -> None:
    """Evaluate on finetune.eval_data; log eval_top1 / eval_top5 and write eval/finetune.json in the run directory."""
    cfg = method.loss_cfg
    acc = evaluate_classifier(method.classifier, cfg.eval_data, cfg.eval_split, cfg.eval_limit, ctx.device)
    ctx.log({"eval_top1": acc["top1"], "eval_top5": acc["top5"]})
    write_json(ctx.run_dir / RESULT_FILE, {"step": ctx.step, "eval_data": cfg.eval_data, "eval_split": cfg.eval_split,
                                           **acc})
