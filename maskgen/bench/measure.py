"""The measurements of the benchmark, each on one model: feature scores (kNN, linear probe, few-shot), FD-lite0 of
samples or of the tokenizer's reconstructions, and MAE's reconstruction panel. Built on `maskgen.eval`."""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn
from torchvision.utils import make_grid

from ..eval.features import compute_features, default_pool, require_labels
from ..eval.fewshot import fewshot_eval
from ..eval.fid import Lite0Extractor, fid_metrics, set_features
from ..eval.image_sets import SourceImages
from ..eval.knn import knn_classify
from ..eval.linear_probe import train_linear_probe
from ..generation import generate_images, save_png
from ..models import from_pretrained
from ..reconstruction import reconstruction_panel

DATA = "cifar10"
TEST_SET = "cifar10-test"
IMAGE_SIZE = 32


def feature_scores(model: nn.Module, *, train_limit: int, test_limit: int, probe_epochs: int, shots=(), seeds=(),
                   device: str = "cpu", progress: bool = True) -> dict:
    """kNN (k 20, T 0.07) and linear-probe (SGD, `probe_epochs`) top-1 on CIFAR-10 test of `model`'s features (its
    official pooling), fitted on `train_limit` training images (0: all); few-shot ridge for `shots` x `seeds`."""
    pool = default_pool(model)
    common = dict(pool=pool, image_size=IMAGE_SIZE, batch_size=128, device=device, progress=progress)
    train_x, train_y = compute_features(model, DATA, "train", limit=train_limit, **common)
    test_x, test_y = compute_features(model, DATA, "test", limit=test_limit, **common)
    require_labels(train_y, DATA)
    knn = knn_classify(train_x, train_y, test_x, test_y, k=20, T=0.07)
    probe = train_linear_probe(train_x, train_y, test_x, test_y, epochs=probe_epochs, optimizer="sgd",
                               progress=progress)
    out = {"pool": pool, "dim": train_x.shape[1], "num_train": len(train_y), "num_test": len(test_y),
           "knn": knn["top1"], "probe": probe["top1"], "probe_train_loss": probe["train_loss"],
           "probe_epochs": probe_epochs}
    if shots:
        few = fewshot_eval(train_x, train_y, test_x, test_y, shots=shots, seeds=seeds)
        out["fewshot"] = {n: {"mean": r["mean"], "std": r["std"]} for n, r in few["results"].items()}
    return out


def _fd(image_set, num: int, cache_dir: Path, device: str, progress: bool) -> dict:
    """FD-lite0 (and precision / recall) of `image_set` against `num` CIFAR-10 test images."""
    ext = Lite0Extractor(device)
    f1, l1 = set_features(image_set, ext, 50, None, progress)
    f2, _ = set_features(SourceImages(TEST_SET, IMAGE_SIZE, num), ext, 50, cache_dir, progress)
    r = fid_metrics(f1, l1, f2, ext.label, metrics=("fd", "prc"))
    return {"fd_lite0": r["fd_lite0"], "precision": r["precision"], "recall": r["recall"], "num_samples": len(f1),
            "num_test": len(f2)}


class TokenizerReconstructions:
    """The FD reference images (the fixed subset of `num` CIFAR-10 test images) through the tokenizer: uint8
    batches; `psnr()` of the last pass."""

    cache_id = None

    def __init__(self, tokenizer: nn.Module, num: int, device: str):
        self.source = SourceImages(TEST_SET, IMAGE_SIZE, num)
        self.tokenizer, self.device, self.name = tokenizer, device, "tokenizer reconstructions"
        self.sq_error, self.pixels = 0.0, 0

    def __len__(self) -> int:
        return len(self.source)

    @torch.no_grad()
    def batches(self, batch_size: int):
        self.sq_error, self.pixels = 0.0, 0
        for images in self.source.batches(batch_size):
            x = images.float().div(255).to(self.device)
            recon = self.tokenizer.decode(self.tokenizer.encode(x)).clamp(0, 1)
            out = (recon * 255).round().to(torch.uint8).cpu()
            self.sq_error += float(((out.float() - images.float()) / 255).pow(2).sum())
            self.pixels += images.numel()
            yield out

    def psnr(self) -> float:
        return 10 * math.log10(1.0 / (self.sq_error / self.pixels))


def reconstruction_floor(tokenizer_dir: Path, num: int, cache_dir: Path, device: str = "cpu",
                         progress: bool = True) -> dict:
    """FD-lite0 of the tokenizer's reconstructions of `num` test images against the same images (the floor of
    MAGE's samples, which the same decoder draws), and their PSNR."""
    recon = TokenizerReconstructions(from_pretrained(tokenizer_dir, device=device), num, device)
    out = _fd(recon, num, cache_dir, device, progress)
    return {**out, "psnr": recon.psnr()}


def sample_fd(run_dir: Path, samples_dir: Path, num: int, cache_dir: Path, sampler_options: dict,
              device: str = "cpu", progress: bool = True) -> dict:
    """Generate `num` samples (seed 0) into `samples_dir` (and its 64-image grid beside it), then their FD-lite0
    against `num` test images."""
    generate_images(run_dir, samples_dir, num, seed=0, batch_size=100, device=device, progress=progress,
                    **sampler_options)
    return {**_fd(SourceImages(str(samples_dir)), num, cache_dir, device, progress),
            "sampler_options": sampler_options}


@torch.no_grad()
def reconstruction_panel_png(run_dir: Path, num: int, out: Path, mask_ratio: float = 0.75, device: str = "cpu") -> dict:
    """MAE's reconstructions of `num` test images (a fixed subset) with `mask_ratio` of the patches removed (seed 0):
    rows input | masked | reconstruction | reconstruction with the visible patches pasted back. Returns the masked
    pixels' mean squared error (pixels in [0, 1])."""
    model = from_pretrained(run_dir, device=device)
    images = next(SourceImages(TEST_SET, IMAGE_SIZE, num).batches(num)).float().div(255).to(device)
    generator = torch.Generator(device).manual_seed(0)
    recon, mask = model.masked_reconstruction(images, mask_ratio, generator=generator)
    save_png(make_grid(reconstruction_panel(images, recon, mask).cpu(), nrow=num, padding=2, pad_value=1.0), out)
    mse = float(((recon - images) ** 2 * mask).sum() / (mask.sum() * 3).clamp(min=1))
    return {"file": out.name, "mask_ratio": mask_ratio, "masked_mse": mse}
