"""`maskgen demo`: the whole MAGE pipeline on the embedded MNIST digits (mnist5k) in about ten minutes on a CPU.

Stages (each resumes if the demo is run again with the same --run-dir):
  1. train a small VQGAN tokenizer (preset `tokenizer-demo`)          -> RUN/tokenizer/
  2. tokenize the training digits once (2 views)                      -> RUN/tokens.safetensors
  3. pre-train a small MAGE on those tokens (preset `mage-demo`)       -> RUN/mage/
  4. generate digits from scratch, inpaint the centre of test digits  -> RUN/generated.png, RUN/inpainting.png
  5. linear probe on frozen MAGE features (vs the same MAGE untrained) -> RUN/probe.json
  6. loss curves and a one-page report                                -> RUN/loss_curves.png, RUN/report.md
"""
from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import torch
from PIL import Image

from . import api
from .data.sources import mnist5k
from .data.token_cache import cache_tokens
from .data.transforms import EvalTransform
from .eval.features import compute_features
from .eval.linear_probe import train_linear_probe
from .generation import edit_image, generate_images, grid_path
from .models import from_pretrained
from .models.mage import MAGE
from .plots import line_charts

log = logging.getLogger("maskgen")

TOKENIZER_PRESET, MAGE_PRESET, DATA = "tokenizer-demo", "mage-demo", "mnist5k"
CACHE_VIEWS = 2
INPAINT_BOX = (9, 9, 23, 23)  # x0, y0, x1, y1 of a 32 px digit: its centre
# sampling of this small model: a lower choice temperature and sampling temperature than the official 4.5 / 1.0
# give more legible digits (compared by eye on 64 samples of each)
SAMPLING = {"num_iter": 12, "choice_temperature": 2.0, "temperature": 0.8}


def _stage(n: int, text: str) -> None:
    print(f"\n== maskgen demo [{n}/6] {text}", file=sys.stderr, flush=True)


def run_demo(run_dir: str | Path = "runs/demo", max_steps: int = 0, num_images: int = 64, device: str = "cpu",
             progress: bool = True) -> Path:
    """Run every stage into `run_dir`; returns the path of the report. `max_steps` > 0 caps both training runs
    (a smoke test; the images are then noise)."""
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    cap = [f"train.max_steps={max_steps}"] if max_steps else []
    dev = [f"train.device={device}"]
    seconds = {}

    t = time.time()
    _stage(1, f"training the tokenizer (preset {TOKENIZER_PRESET}) on {DATA}")
    api.train("tokenizer", TOKENIZER_PRESET, [*cap, *dev], run_dir=run / "tokenizer", resume="auto")
    seconds["tokenizer"] = time.time() - t

    t = time.time()
    _stage(2, "tokenizing the training digits once (token cache)")
    cache = run / "tokens.safetensors"
    tok_data = api.build_config("tokenizer", TOKENIZER_PRESET).data
    if not cache.is_file():
        cache_tokens(run / "tokenizer", DATA, cache, image_size=tok_data.image_size, views=CACHE_VIEWS,
                     crop_scale=tuple(tok_data.crop_scale), device=device, progress=progress)
    seconds["token cache"] = time.time() - t

    t = time.time()
    _stage(3, f"pre-training MAGE (preset {MAGE_PRESET}) on the cached tokens")
    api.train("mage", MAGE_PRESET, [f"mage.tokenizer={run / 'tokenizer'}", f"mage.token_cache={cache}", *cap, *dev],
              run_dir=run / "mage", resume="auto")
    seconds["mage"] = time.time() - t

    t = time.time()
    _stage(4, f"generating {num_images} digits and inpainting 4 test digits")
    generate_images(run / "mage", run / "generated", num_images, seed=0, device=device, progress=progress,
                    **SAMPLING)
    grid_path(run / "generated").replace(run / "generated.png")
    _inpainting_examples(run, edit_image, device)
    seconds["generation"] = time.time() - t

    t = time.time()
    _stage(5, "linear probe on frozen features (MAGE pre-trained vs the same MAGE untrained)")
    probe = {}
    trained = from_pretrained(run / "mage", device=device)
    torch.manual_seed(0)
    untrained = MAGE(trained.config).set_tokenizer(trained.tokenizer).to(device).eval()
    for name, model in (("mage", trained), ("untrained", untrained)):
        train_x, train_y = compute_features(model, DATA, "train", device=device, progress=progress)
        test_x, test_y = compute_features(model, DATA, "test", device=device, progress=progress)
        # SGD (momentum 0.9, lr 0.1): LARS at MAE's settings needs far more than these ~1,500 steps
        probe[name] = train_linear_probe(train_x, train_y, test_x, test_y, epochs=100, batch_size=256,
                                         optimizer="sgd", progress=progress)
    (run / "probe.json").write_text(json.dumps(probe, indent=2))
    seconds["linear probe"] = time.time() - t

    _stage(6, "loss curves and report")
    curves = {"tokenizer": _series(run / "tokenizer" / "metrics.jsonl"), "MAGE": _series(run / "mage" / "metrics.jsonl")}
    plot_curves(curves, run / "loss_curves.png")
    report = _write_report(run, probe, seconds, curves, max_steps)
    print(f"\nmaskgen demo: done in {sum(seconds.values()) / 60:.1f} min. MAGE linear probe top-1 "
          f"{probe['mage']['top1']:.1f} % (untrained: {probe['untrained']['top1']:.1f} %). Report: {report}",
          file=sys.stderr)
    return report


def _inpainting_examples(run: Path, edit_image, device: str) -> None:
    """RUN/inpainting.png: rows of (input | masked | result) for the first test digit of 4 classes."""

    source, seen, rows = mnist5k("test"), set(), []
    folder = run / "inpainting"
    folder.mkdir(exist_ok=True)
    box = ",".join(map(str, INPAINT_BOX))
    for i in range(len(source)):
        sample = source[i]
        if sample.label in seen or sample.label not in (0, 2, 3, 8):
            continue
        seen.add(sample.label)
        x = EvalTransform(32)(sample.data)
        path = folder / f"digit{sample.label}.png"
        Image.fromarray((x.permute(1, 2, 0).numpy() * 255).round().astype("uint8")).save(path)
        out = edit_image("inpaint", run / "mage", path, folder / f"digit{sample.label}_inpainted.png", box=box,
                         seed=sample.label, device=device, **SAMPLING)
        rows.append(Image.open(out.with_name(out.stem + "_panel.png")).convert("RGB"))
        if len(rows) == 4:
            break
    sheet = Image.new("RGB", (rows[0].width, sum(r.height for r in rows)), "white")
    for k, r in enumerate(rows):
        sheet.paste(r, (0, k * rows[0].height))
    sheet.resize((sheet.width * 3, sheet.height * 3), Image.NEAREST).save(run / "inpainting.png")


def _series(metrics: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def plot_curves(curves: dict[str, list[tuple[int, float]]], out: Path, width: int = 420, height: int = 260) -> Path:
    """One training-loss chart per named series of (step, loss), side by side, into a PNG."""
    return line_charts({f"{name} training loss": {name: points} for name, points in curves.items()}, out, "step",
                       width, height)


def _write_report(run: Path, probe: dict, seconds: dict, curves: dict, max_steps: int) -> Path:
    final = {name: points[-1][1] for name, points in curves.items() if points}
    lines = [
        "# maskgen demo: MAGE on MNIST digits",
        "",
        f"A VQGAN tokenizer (`{TOKENIZER_PRESET}`) and a MAGE (`{MAGE_PRESET}`) trained from scratch on the 4,000 "
        "training digits of the embedded `mnist5k` set, then used to generate, inpaint and classify.",
    ]
    if max_steps:
        lines += ["", f"**Smoke run: training capped at {max_steps} steps per model; expect noise, not digits.**"]
    lines += [
        "", "| stage | minutes |", "| --- | --- |",
        *[f"| {k} | {v / 60:.1f} |" for k, v in seconds.items()],
        f"| **total** | **{sum(seconds.values()) / 60:.1f}** |",
        "", f"## Generated digits (from all-[MASK]: {SAMPLING['num_iter']} MaskGIT iterations, choice temperature "
        f"{SAMPLING['choice_temperature']}, sampling temperature {SAMPLING['temperature']})", "",
        "![generated](generated.png)",
        "", "## Inpainting (input | centre removed | MAGE's completion)", "", "![inpainting](inpainting.png)",
        "", "## Linear probe on frozen features (1,000 test digits; BatchNorm + linear head, SGD, 100 epochs)", "",
        "| encoder | top-1 % | top-5 % |", "| --- | --- | --- |",
        f"| MAGE, pre-trained | {probe['mage']['top1']:.1f} | {probe['mage']['top5']:.1f} |",
        f"| same MAGE, untrained | {probe['untrained']['top1']:.1f} | {probe['untrained']['top5']:.1f} |",
        "", "## Training loss", "", "![loss curves](loss_curves.png)", "",
        "Final logged loss: " + ", ".join(f"{k} {v:.3f}" for k, v in final.items()) + ". The tokenizer's loss "
        "includes MaskGIT's codebook-entropy term (a negative number), so it may end below zero; MAGE's starts near "
        "ln(codebook size).",
        "", "Reproduce or extend: `maskgen config show mage-demo`; runs, checkpoints and metrics are in "
        "`tokenizer/` and `mage/`.",
    ]
    report = run / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report
