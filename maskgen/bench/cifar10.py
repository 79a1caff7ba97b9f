"""`maskgen bench cifar10`: every method trained on CIFAR-10 at the same encoder size and images seen, evaluated by
the same protocol, beside the baselines (raw pixels, the tokenizer's latent, each architecture untrained).

OUT/ holds the run directories (OUT/tokenizer, OUT/mage, ...: ordinary `maskgen train` runs), the token cache,
the samples, results/NAME.json (one per method and baseline, filled stage by stage: a finished stage is never
redone, an interrupted training resumes from its last checkpoint), plots/*.png and bench.md (rendered from the
JSON files alone by `report.render`).
"""
from __future__ import annotations

import json
import logging
import math
import shutil
import statistics
import time
from dataclasses import asdict, replace
from datetime import datetime, timezone
from pathlib import Path

import torch

from .. import api
from ..data.token_cache import cache_tokens
from ..engine.logger import setup_logging
from ..errors import MaskgenError, RunError, UserError
from ..eval.features import load_encoder
from ..machine import describe
from ..outputs import prepare_dir
from ..weights import latest_checkpoint
from . import measure
from .plan import FULL, METHODS, QUICK, TOKENIZER, MethodSpec, Protocol, images_for_budget
from .record import Record
from .report import render

log = logging.getLogger("maskgen")

TRAIN_IMAGES = 50_000  # CIFAR-10 train


def run_bench(out: str | Path = "runs/bench-cifar10", methods: list[str] | None = None, budget_hours: float = 1.0,
              quick: bool = False, images: int | None = None, device: str = "cpu", progress: bool = True) -> Path:
    """Train and evaluate `methods` (default: all) on CIFAR-10 into `out`; returns the rendered table (OUT/bench.md).
    `images` per method, else derived from `budget_hours` (the slowest method's measured speed here); `quick`: tiny
    presets, budget and evaluation (minutes: what the tests run)."""
    setup_logging()  # the stage lines ("bench: mage: eval") before the first training configures it
    if budget_hours <= 0:
        raise UserError(f"--budget-hours must be > 0, got {budget_hours}")
    if images is not None and images < 1:
        raise UserError(f"--images must be >= 1, got {images}")
    protocol = QUICK if quick else FULL
    if images is not None:
        protocol = replace(protocol, images=images)
    bench = Bench(Path(out), methods or list(METHODS), protocol, budget_hours, images, device, progress)
    failed = bench.run()
    table = render(bench.out)
    if failed:
        raise RunError(f"bench: {', '.join(failed)} failed (see {bench.results}); the table holds the others. Run the "
                       f"same command again to retry them")
    return table


class Bench:
    def __init__(self, out: Path, methods: list[str], protocol: Protocol, budget_hours: float, images: int | None,
                 device: str, progress: bool):
        self.out = prepare_dir(out, "benchmark folder")
        self.results = self.out / "results"
        self.methods = [METHODS[m] for m in methods]
        self.p, self.budget_hours, self.device, self.progress = protocol, budget_hours, device, progress
        self.images_flag = images  # as asked: a folder continues only with the same request

    # ------------------------------------------------------------------------------------------------ the run
    def run(self) -> list[str]:
        """Every stage not yet done; returns the names of the methods that failed."""
        self.plan = self._plan()
        self._baseline("pixels", "raw pixels, 32×32×3", lambda: load_encoder("pixels", image_size=32))
        tokenizer = self._tokenizer() if any(s.tokens for s in self.methods) else None
        images = self._images(tokenizer)
        failed = []
        for spec in self.methods:
            try:
                self._method(spec, tokenizer, images)
            except MaskgenError as e:
                log.error("bench: %s failed: %s", spec.name, e)
                failed.append(spec.name)
        return failed

    def _plan(self) -> Record:
        """OUT/results/plan.json: what was asked and where it runs. A folder planned with another budget or
        protocol is refused (its numbers would not compare)."""
        rec = Record(self.results / "plan.json", "plan")
        asked = {"quick": self.p.quick, "budget_hours": self.budget_hours, "images": self.images_flag}
        first = {k: v for k, v in (rec.get("asked") or {}).items() if k != "seconds"} or None
        if first is not None and first != asked:
            raise UserError(f"{self.out} was planned with {_describe(first)}, not {_describe(asked)}: use another "
                            f"--out, or the same options to continue it")
        rec.stage("asked", lambda: asked)
        rec.data.update(benchmark="cifar10", protocol=_plain(asdict(self.p)))
        rec.stage("machine", lambda: {"machine": describe(), "date": _now(), "threads": torch.get_num_threads()})
        rec.data["methods"] = sorted({*rec.data.get("methods", []), *(s.name for s in self.methods)},
                                     key=list(METHODS).index)
        rec.save()
        return rec

    def _baseline(self, name: str, label: str, load_model, **header) -> dict:
        rec = Record(self.results / f"{name}.json", name, kind="baseline", label=label, **header)
        return rec.stage("eval", lambda: self._scores(load_model(), final=True))

    def _scores(self, model, final: bool) -> dict:
        p = self.p
        if final:
            return measure.feature_scores(model, train_limit=p.eval_train_limit, test_limit=p.eval_test_limit,
                                          probe_epochs=p.probe_epochs, shots=p.shots, seeds=p.seeds,
                                          device=self.device, progress=self.progress)
        return measure.feature_scores(model, train_limit=p.curve_train_limit, test_limit=p.curve_test_limit,
                                      probe_epochs=p.probe_epochs, device=self.device, progress=self.progress)

    # ---------------------------------------------------------------------------------------------- tokenizer
    def _tokenizer(self) -> Path:
        """Train the tokenizer (its preset as it is, outside the methods' budget: its cost is recorded), cache the
        training images' tokens, and measure its latent as a baseline and its reconstructions as the floor of MAGE's
        FD-lite0."""
        run_dir = self.out / "tokenizer"
        preset = TOKENIZER.quick_preset if self.p.quick else TOKENIZER.preset
        overrides = list(self.p.tokenizer_overrides)
        rec = Record(self.results / "tokenizer.json", "tokenizer", kind="baseline", label=TOKENIZER.label,
                     command=_train_command("tokenizer", preset, run_dir, overrides))
        rec.stage("train", lambda: self._train(TOKENIZER.method, preset, overrides, run_dir))
        batch = api.build_config(TOKENIZER.method, preset, overrides).train.batch_size
        rec.stage("training", lambda: training_summary(run_dir, batch, 1))
        if self.p.token_views:
            rec.stage("token cache", lambda: self._token_cache(run_dir))
        rec.stage("eval", lambda: self._scores(load_encoder(run_dir, image_size=32), final=True))
        rec.stage("reconstruction FD", lambda: measure.reconstruction_floor(
            run_dir, self.p.fd_images, self.out / "fid-cache", self.device, self.progress))
        return run_dir

    def _token_cache(self, tokenizer: Path) -> dict:
        path = self.out / "tokens.safetensors"
        cache_tokens(tokenizer, "cifar10", path, image_size=32, views=self.p.token_views, batch_size=500,
                     device=self.device, progress=self.progress)
        return {"file": path.name, "views": self.p.token_views}

    # ------------------------------------------------------------------------------------------------ budget
    def _images(self, tokenizer: Path | None) -> int:
        """Images seen per method: given, or the budget times the slowest method's speed measured here (a short
        training run of each method, `calibration_steps` steps, its first log window left out)."""
        if self.p.images is not None:
            self.plan.stage("images", lambda: {"images": self.p.images, "from": "given"})
            return self.plan.get("images")["images"]

        def calibrate() -> dict:
            rates = {}
            for spec in self.methods:
                run_dir = self.out / "calibration" / spec.name
                shutil.rmtree(run_dir, ignore_errors=True)
                steps = self.p.calibration_steps
                overrides = [*self._overrides(spec, tokenizer, images=None), f"train.max_steps={steps}",
                             "log.every=5", f"train.save_every={steps}"]
                api.train(spec.method, self._preset(spec), overrides, run_dir=run_dir)
                lines = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if l.strip()]
                rates[spec.name] = statistics.median(r["img_per_s"] for r in lines[1:] or lines) * spec.views
                shutil.rmtree(run_dir, ignore_errors=True)
            return {"images": images_for_budget(self.budget_hours, rates), "from": "budget",
                    "budget_hours": self.budget_hours, "rates_img_per_s": rates,
                    "rule": "budget x the slowest method's training speed measured here, down to a multiple of 1,000"}

        return self.plan.stage("images", calibrate)["images"]

    # ------------------------------------------------------------------------------------------------ methods
    def _preset(self, spec: MethodSpec) -> str:
        return spec.quick_preset if self.p.quick else spec.preset

    def _overrides(self, spec: MethodSpec, tokenizer: Path | None, images: int | None) -> list[str]:
        """The method's preset changed only in its schedule length (`images` seen; None: the preset's), its data
        (the tokenizer and token cache, a training subset) and no periodic previews."""
        o = [*(spec.quick_extra if self.p.quick else spec.extra), "vis.every=0", "train.keep_last=2"]
        if spec.tokens:
            o.append(f"mage.tokenizer={tokenizer}")
            if self.p.token_views:
                o.append(f"mage.token_cache={self.out / 'tokens.safetensors'}")
        if self.p.train_limit:
            o.append(f"data.limit={self.p.train_limit}")
        if images is not None:
            o.append(epochs_override(images, api.build_config(spec.method, self._preset(spec), o), spec.views))
        return o

    def _method(self, spec: MethodSpec, tokenizer: Path | None, images: int) -> None:
        run_dir = self.out / spec.name
        preset, overrides = self._preset(spec), self._overrides(spec, tokenizer, images)
        cfg = api.build_config(spec.method, preset, overrides)
        per_step = cfg.train.batch_size * spec.views
        steps = math.ceil(images / per_step)
        rec = Record(self.results / f"{spec.name}.json", spec.name, kind="method", label=spec.label,
                     method=spec.method, preset=preset, architecture=spec.arch,
                     command=_train_command(spec.method, preset, run_dir, overrides), images_planned=images,
                     images_per_step=per_step, views=spec.views)
        points = self.p.curve_points
        for k in range(1, points + 1):
            stop = round(steps * k / points) if k < points else 0
            rec.stage(f"checkpoint {k}/{points}", lambda: self._segment(spec, preset, overrides, run_dir, stop, per_step))
        rec.stage("training", lambda: training_summary(run_dir, cfg.train.batch_size, spec.views))
        rec.stage("eval", lambda: self._scores(load_encoder(run_dir), final=True))
        model = load_encoder(run_dir)
        self._baseline(f"untrained-{spec.arch}", f"{spec.label} architecture untrained (seed 0)",
                       lambda: load_encoder(run_dir, untrained=True, seed=0), architecture=spec.arch)
        if getattr(model, "default_sampler", None):
            options = {"precision": "auto", **self.p.sampler_options.get(spec.method, {})}
            rec.stage("samples", lambda: measure.sample_fd(run_dir, self.out / "samples" / spec.name, self.p.fd_images,
                                                           self.out / "fid-cache", options, self.device,
                                                           self.progress))
        if callable(getattr(model, "masked_reconstruction", None)):
            rec.stage("reconstructions", lambda: measure.reconstruction_panel_png(
                run_dir, self.p.panel_images, prepare_dir(self.out / "plots") / f"{spec.name}_reconstructions.png",
                device=self.device))

    def _segment(self, spec, preset, overrides, run_dir: Path, stop: int, per_step: int) -> dict:
        """Train up to step `stop` (0: to the end of the schedule), then score the checkpoint on the curve protocol."""
        start = time.perf_counter()
        info = self._train(spec.method, preset, [*overrides, *([f"train.max_steps={stop}"] if stop else [])], run_dir)
        seconds = time.perf_counter() - start
        scores = self._scores(load_encoder(run_dir), final=False)
        return {"step": info["step"], "images": info["step"] * per_step, "train_seconds": round(seconds, 1),
                "knn": scores["knn"], "probe": scores["probe"], "num_train": scores["num_train"]}

    def _train(self, method: str, preset: str, overrides: list[str], run_dir: Path) -> dict:
        """`maskgen train` (resuming the run if it exists); a run stopped before its planned step (Ctrl-C, SIGTERM)
        is an error that says how to continue."""
        api.train(method, preset, overrides, run_dir=run_dir, resume="auto")
        ckpt = latest_checkpoint(run_dir / "checkpoints")
        info = json.loads((ckpt / "trainer.json").read_text())
        if info["step"] < info.get("stop_step", info["step"]):  # the trainer saved and stopped on a signal
            log.info("bench: %s stopped at step %d of %d; run the same bench command again to continue", run_dir,
                     info["step"], info["stop_step"])
            raise KeyboardInterrupt
        return {"step": info["step"], "total_steps": info.get("total_steps")}


def epochs_override(images: int, cfg, views: int = 1) -> str:
    """`train.epochs=E` so that a run of config `cfg` sees `images` encoder inputs: E epochs of its training set
    (`data.limit` images, else CIFAR-10's 50,000), `views` inputs per image."""
    return f"train.epochs={images / ((cfg.data.limit or TRAIN_IMAGES) * views):.6g}"


def training_summary(run_dir: Path, batch: int, views: int) -> dict:
    """Steps, images seen (encoder inputs), training time (from the logged speeds: restarts and evaluations left
    out), median speed (encoder inputs per second), the loss curve (at most 200 points) and where it ran."""
    seen = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line) if line.strip() else {}
        if "loss" in r and "img_per_s" in r:
            seen[r["step"]] = r  # a resumed run may log a step twice: the last one counts
    rows = [seen[s] for s in sorted(seen)]
    if not rows:
        raise RunError(f"{run_dir / 'metrics.jsonl'} holds no training metrics")
    seconds, prev = 0.0, 0
    for r in rows:  # img_per_s counts images (not views) per second of the logging window
        seconds += (r["step"] - prev) * batch / max(r["img_per_s"], 1e-9)
        prev = r["step"]
    every = max(1, len(rows) // 200)
    curve = [[r["step"], round(r["loss"], 5)] for r in rows[::every]]
    steps = rows[-1]["step"]
    return {"steps": steps, "images": steps * batch * views, "train_seconds": round(seconds, 1),
            "img_per_s_median": statistics.median(r["img_per_s"] for r in rows) * views,
            "final_loss": statistics.fmean(r["loss"] for r in rows[-5:]), "loss_curve": curve,
            "machine": describe(), "date": _now()}


def _train_command(method: str, preset: str, run_dir: Path, overrides: list[str]) -> str:
    return f"maskgen train {method} --config {preset} --run-dir {run_dir} --resume auto {' '.join(overrides)}".strip()


def _describe(asked: dict) -> str:
    what = ("--quick " if asked["quick"] else "") + f"--budget-hours {asked['budget_hours']:g}"
    return what + (f" --images {asked['images']}" if asked.get("images") is not None else "")


def _plain(d: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
