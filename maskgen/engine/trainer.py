"""The training loop, the same for every method, for one process or many (torchrun + DDP).

`train(cfg, run_dir, resume)` builds the data, the method and the optimizer, resumes if asked, and runs
optimizer steps until `train.epochs` (or `train.max_steps`) is reached, saving checkpoints every
`train.save_every` steps, at the end, and when SIGTERM / SIGINT asks it to stop. One training at a time writes a
run directory (`RunDirLock`); a run whose loss or weights stop being finite stops with a RunError and keeps its last
good checkpoint.
"""
from __future__ import annotations

import contextlib
import difflib
import logging
import math
import signal
import time
from datetime import datetime
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from .. import distributed as dist
from ..config import Config, config_to_yaml
from ..data.loader import ResumableLoader
from ..errors import MaskgenError, RunError, UserError, is_disk_full, os_error_message
from ..models.layers import compile_blocks
from ..outputs import check_free_space, prepare_dir
from ..precision import autocast, resolve_precision
from ..progress import progress_bar
from ..registry import METHODS
from ..seeding import mix_seed
from ..weights import TRAIN_CONFIG_FILE, latest_checkpoint
from .checkpoint import load_checkpoint, save_checkpoint
from .ema import EMA
from .logger import RunLogger, setup_logging
from .method import HookContext
from .optim import build_optimizer, effective_lr, lr_at, set_lr
from .run_lock import RunDirLock

log = logging.getLogger("maskgen")

MAX_BAD_STEPS = 20  # consecutive non-finite losses before training stops
PREVIEW_IMAGES = 16


def train(cfg: Config, run_dir: str | Path | None = None, resume: str | None = None) -> Path:
    """Train `cfg.method` (a registered method); returns the run directory. `resume`: None, "auto" or a checkpoint
    directory."""
    rank, local_rank, _ = dist.env_world()
    setup_logging(rank)
    device = dist.resolve_device(cfg.train.device, local_rank)
    if cfg.train.precision == "fp16" and device.type != "cuda":
        raise UserError("train.precision=fp16 needs CUDA (fp16 on CPU is ~1000x slower); use bf16 or fp32")
    dist.init(device, cfg.dist.backend, cfg.dist.timeout_s)
    try:
        # every rank uses rank 0's choice (timings differ between processes); config.yaml records it
        cfg.train.precision = dist.broadcast_object(resolve_precision(cfg.train.precision, device))
        run_dir = Path(dist.broadcast_object(str(run_dir or default_run_dir(cfg.method))))
        with _hold_run_dir(run_dir, rank == 0):
            return Trainer(cfg, device, run_dir, resume).run()
    finally:
        dist.cleanup()


@contextlib.contextmanager
def _hold_run_dir(run_dir: Path, main: bool):
    """Rank 0 checks that the run directory can be written and locks it for the run; every rank raises the same
    RunError / UserError when it cannot."""
    lock, error = RunDirLock(run_dir), None
    if main:
        try:
            prepare_dir(run_dir, "run directory")
            lock.acquire()
        except MaskgenError as e:
            error = (type(e), str(e))
    error = dist.broadcast_object(error)
    if error is not None:
        raise error[0](error[1])
    try:
        yield
    finally:
        lock.release()


class _StopFlag:
    """SIGTERM / SIGINT: finish the current step, save, exit. A second SIGINT interrupts at once."""

    def __init__(self):
        self.signal = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name
        log.warning("%s received: finishing this step, saving a checkpoint, then exiting", self.signal)

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


class Trainer:
    """`method` is the registered method (objective + data path), `model` the released model it trains (saved as
    the weights of every checkpoint), `ddp` the method as the training step calls it: wrapped in
    DistributedDataParallel when several processes run, the method itself otherwise."""

    def __init__(self, cfg: Config, device: torch.device, run_dir, resume):
        self.cfg, self.device = cfg, device
        self.rank, self.world = dist.rank(), dist.world_size()
        self.main = self.rank == 0
        tc = cfg.train

        self.run_dir = Path(run_dir)
        self.ckpt_root = self.run_dir / "checkpoints"
        resume_from = self._find_resume(resume)

        # method, then its data (a token cache is checked against the method's tokenizer)
        torch.manual_seed(tc.seed)  # parameter initialisation: identical on every rank
        self.memory_format = torch.channels_last if tc.memory_format == "channels_last" else torch.contiguous_format
        # memory_format applies to 4-D weights only; saved weights are made contiguous
        self.method = METHODS.get(cfg.method).from_config(cfg).to(device, memory_format=self.memory_format)
        self.model = self.method.release_model()
        if tc.init_from and resume_from is None:
            self.method.init_from(tc.init_from)
        dataset, self.source_description = self.method.build_dataset(cfg)
        self.loader = ResumableLoader(dataset, tc.batch_size, tc.seed, self.rank, self.world,
                                      cfg.data.num_workers, cfg.data.limit)
        self.effective_batch = tc.batch_size * tc.accum_steps * self.world
        self.base_lr = effective_lr(cfg.optim, self.effective_batch)
        self.steps_per_epoch = max(1, self.loader.batches_per_epoch // tc.accum_steps)
        self.total_steps = max(1, math.ceil(tc.epochs * self.steps_per_epoch))
        self.stop_step = min(self.total_steps, tc.max_steps) if tc.max_steps else self.total_steps
        self.warmup_steps = round(cfg.schedule.warmup_epochs * self.steps_per_epoch)
        self.optimizer = build_optimizer(self.method, cfg.optim, self.base_lr)
        self.scaler = torch.amp.GradScaler("cuda") if tc.precision == "fp16" else None
        self.ema = EMA(self.model, tc.ema_decay) if tc.ema_decay > 0 else None
        self.step, self.skipped_steps = 0, 0
        if resume_from is not None:
            self._load(resume_from)
        if self.main:
            check_free_space(self.ckpt_root, self._checkpoint_bytes(), "a checkpoint")

        if tc.compile:
            log.info("train.compile: compiling %d transformer blocks (the first steps take longer)",
                     compile_blocks(self.method))
        self.ddp = self.method
        if self.world > 1:
            self.ddp = DistributedDataParallel(
                self.method, device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=cfg.dist.find_unused_parameters)
        self.autocast = autocast(tc.precision, device)
        self.config_yaml = config_to_yaml(cfg)
        if self.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._write_config(resumed=resume_from is not None)
        dist.barrier()
        self.logger = RunLogger(self.run_dir, self.main, cfg.log.tensorboard, resume_step=self.step)
        self.preview = None

    # ------------------------------------------------------------------------------ set-up helpers
    def _find_resume(self, resume) -> Path | None:
        latest = latest_checkpoint(self.ckpt_root)
        if resume is None:
            if latest is not None:
                raise UserError(f"{self.run_dir} already holds checkpoints: pass --resume auto to continue it, "
                                f"or choose another --run-dir")
            return None
        if resume == "auto":
            if latest is None:
                log.info("no checkpoint in %s yet: starting from scratch", self.ckpt_root)
            return latest
        path = Path(resume)
        found = path if (path / TRAIN_CONFIG_FILE).is_file() else latest_checkpoint(path / "checkpoints")
        if found is None:
            raise UserError(f"--resume {resume}: not a checkpoint directory (and no checkpoints under it)")
        return found

    def _load(self, directory: Path) -> None:
        """Restore the checkpoint `directory`; one that another method, model or config wrote is a UserError."""
        try:
            self._restore(*load_checkpoint(directory))
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            lines = [l.strip() for l in str(e).strip().splitlines() if l.strip()] or [type(e).__name__]
            detail = (lines[1] if lines[0].startswith("Error(s) in loading") and len(lines) > 1 else lines[0])[:200]
            raise UserError(f"cannot resume from {directory}: it was not written by this method and config "
                            f"({detail})") from None
        log.info("resumed from %s (step %d)", directory, self.step)

    def _restore(self, model_state: dict, state: dict, trainer: dict, ema_state: dict | None) -> None:
        self.model.load_state_dict(model_state)
        extra = state.get("method_extra", {})
        if extra:
            missing, unexpected = self.method.load_state_dict({**self._release_prefixed(model_state), **extra},
                                                              strict=False)
            if missing or unexpected:
                raise KeyError(f"missing {missing[:3]}, unexpected {unexpected[:3]}")
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            if ema_state is None:
                log.warning("checkpoint has no EMA weights: EMA restarts from the current weights")
            else:
                self.ema.load_state_dict(ema_state)
        self.step = int(trainer["step"])
        self.skipped_steps = int(trainer.get("skipped_steps", 0))
        loader_state = dict(trainer["loader"])
        old_global = int(trainer["global_batch"])
        new_global = self.cfg.train.batch_size * self.world
        if old_global != new_global:  # keep the position in samples; not bit-exact
            log.warning("resuming with a global batch of %d instead of %d: the data position is converted, the "
                        "run is no longer bit-identical to an uninterrupted one", new_global, old_global)
            loader_state["batch"] = loader_state["batch"] * old_global // new_global
        self.loader.load_state_dict(loader_state)

    def _release_prefixed(self, release_state: dict) -> dict:
        prefix = next(name for name, mod in self.method.named_modules() if mod is self.model)
        return {(f"{prefix}.{k}" if prefix else k): v for k, v in release_state.items()}

    def _method_extra_state(self) -> dict:
        """Method tensors outside the release model (e.g. a discriminator)."""
        release_keys = set(self._release_prefixed(self.model.state_dict()))
        return {k: v for k, v in self.method.state_dict().items() if k not in release_keys}

    def _write_config(self, resumed: bool) -> None:
        path = self.run_dir / "config.yaml"
        if resumed and path.is_file():
            old = path.read_text()
            if old != self.config_yaml:
                changes = [l for l in difflib.unified_diff(old.splitlines(), self.config_yaml.splitlines(), lineterm="",
                                                           n=0) if l[:1] in "+-" and l[:3] not in ("+++", "---")]
                # train.max_steps only moves the stopping point (the schedule follows train.epochs): not a warning
                only_stop = all(l[1:].strip().startswith("max_steps:") for l in changes)
                (log.info if only_stop else log.warning)("config differs from the run being resumed: %s",
                                                         "; ".join(changes))
        path.write_text(self.config_yaml)

    # ------------------------------------------------------------------------------------ the loop
    def run(self) -> Path:
        cfg = self.cfg
        if self.main:
            log.info("run directory %s", self.run_dir)
            log.info("data: %s", self.source_description)
            log.info("method %s: %.2fM trainable parameters; effective batch %d (%d x %d accum x %d proc), lr %.3g, "
                     "%d steps (%d/epoch)%s", cfg.method,
                     sum(p.numel() for p in self.method.parameters() if p.requires_grad) / 1e6,
                     self.effective_batch, cfg.train.batch_size, cfg.train.accum_steps, self.world, self.base_lr,
                     self.total_steps, self.steps_per_epoch,
                     f", stopping at step {self.stop_step}" if self.stop_step < self.total_steps else "")
        batches = iter(self.loader)
        bar = progress_bar(total=self.stop_step, initial=self.step, unit="step",
                           enabled=self.main and cfg.log.progress)
        window, window_images, window_start, bad_steps = {}, 0, time.perf_counter(), 0
        stopped_by = None
        with _StopFlag() as stop:
            while self.step < self.stop_step:
                logs, images, ok = self._train_step(batches)
                bad_steps = 0 if ok else bad_steps + 1
                self.skipped_steps += not ok
                if bad_steps >= MAX_BAD_STEPS:
                    raise RunError(f"training diverged: steps {self.step - bad_steps + 1}-{self.step} all had a "
                                   f"non-finite loss or gradient; {self._last_good()}. Lower the learning rate, "
                                   f"or use train.precision=fp32.")
                for k, v in logs.items():
                    window[k] = window.get(k, 0.0) + v
                window_images += images
                bar.update(1)
                if self.step % cfg.log.every == 0 or self.step == self.stop_step:
                    n_steps = cfg.log.every if self.step % cfg.log.every == 0 else self.step % cfg.log.every
                    metrics = self._reduce_window(window, n_steps)
                    elapsed = time.perf_counter() - window_start
                    metrics["img_per_s"] = window_images * self.world / max(elapsed, 1e-9)
                    metrics["epoch"] = self.step / self.steps_per_epoch
                    metrics["wall_time"] = time.time()  # Unix seconds: elapsed time across resumes
                    metrics["skipped_steps"] = self.skipped_steps  # updates skipped for a non-finite loss, in total
                    self.logger.log(self.step, metrics)
                    bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}",
                                    img_s=f"{metrics['img_per_s']:.0f}", refresh=False)
                    window, window_images, window_start = {}, 0, time.perf_counter()
                if cfg.vis.every and self.step % cfg.vis.every == 0:
                    self._run_hooks()
                stopped_by = stop.signal if dist.any_rank(stop.signal is not None, self.device) else None
                if stopped_by or self.step % cfg.train.save_every == 0 or self.step == self.stop_step:
                    if bad_steps:  # the weights just gave a non-finite loss: do not save them as good
                        self._withhold_checkpoint(bad_steps, final=bool(stopped_by) or self.step == self.stop_step)
                    else:
                        self._save()
                if stopped_by:
                    break
        bar.close()
        if not stopped_by and (not cfg.vis.every or self.step % cfg.vis.every):
            self._run_hooks()
        self.logger.close()
        if self.main:
            if stopped_by:
                log.info("stopped by %s at step %d; resume with --resume auto --run-dir %s", stopped_by, self.step,
                         self.run_dir)
            else:
                log.info("done: %d steps; weights in %s", self.step, latest_checkpoint(self.ckpt_root))
            if self.loader.skipped:
                log.warning("%d unreadable images were skipped in total", self.loader.skipped)
            if self.skipped_steps:
                log.warning("%d updates were skipped for a non-finite loss or gradient", self.skipped_steps)
        return self.run_dir

    def _next_batch(self, batches) -> dict:
        for _ in range(1000):
            batch = next(batches)
            if "label" in batch:  # at least one readable sample
                return batch
        raise UserError("1000 consecutive batches held no readable image: check data.path")

    def _train_step(self, batches) -> tuple[dict, int, bool]:
        """One optimizer step over `accum_steps` micro-batches. Returns (summed logs, images seen, stepped?)."""
        tc = self.cfg.train
        set_lr(self.optimizer, lr_at(self.step, self.base_lr, self.total_steps, self.warmup_steps,
                                     self.cfg.schedule.min_lr, self.cfg.schedule.name))
        self.ddp.train()
        logs: dict = {}
        images = 0
        for micro in range(tc.accum_steps):
            batch = self._next_batch(batches)
            images += len(batch["label"])
            batch = {k: self._to_device(v) for k, v in batch.items() if torch.is_tensor(v)}
            batch["step"] = self.step
            seed = mix_seed(tc.seed, self.rank, self.step, micro)
            torch.manual_seed(seed)  # dropout / masking: a function of (seed, rank, step), hence exact resume
            sync = micro == tc.accum_steps - 1 or self.world == 1
            with (contextlib.nullcontext() if sync else self.ddp.no_sync()), self.autocast:
                loss, micro_logs = self.ddp(batch)
            scaled = loss / tc.accum_steps
            (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            for k, v in {"loss": loss.detach(), **micro_logs}.items():
                logs[k] = logs.get(k, 0.0) + float(v) / tc.accum_steps
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        max_norm = self.cfg.optim.clip_grad if self.cfg.optim.clip_grad > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        ok = math.isfinite(grad_norm) and math.isfinite(logs["loss"])
        ok = not dist.any_rank(not ok, self.device)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        elif ok:
            self.optimizer.step()
        else:
            log.warning("step %d: non-finite loss or gradient; the update is skipped", self.step + 1)
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.model)
        self.step += 1
        logs["grad_norm"] = grad_norm
        logs["lr"] = self.optimizer.param_groups[0]["lr"]
        return logs, images, ok

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        """A batch tensor on the training device; images [B, C, H, W] in the training memory format."""
        t = t.to(self.device, non_blocking=True)
        return t.contiguous(memory_format=self.memory_format) if t.dim() == 4 and t.is_floating_point() else t

    def _reduce_window(self, window: dict, n_steps: int) -> dict:
        """Mean over the window's steps and over ranks."""
        keys = sorted(window)
        values = torch.tensor([window[k] / n_steps for k in keys], dtype=torch.float64, device=self.device)
        values = dist.all_reduce_mean(values)
        return dict(zip(keys, values.tolist()))

    def _preview_images(self) -> torch.Tensor | None:
        """The hooks' fixed images [n, 3, S, S]: the first readable ones of the data as epoch 0 augments them,
        the same whether or not the run was interrupted (None for data without images, e.g. a token cache)."""
        if self.preview is None:
            items = (self.loader.dataset[(0, i)] for i in self.loader.indices[:4 * PREVIEW_IMAGES])
            images = [it["image"] for it in items if "image" in it][:PREVIEW_IMAGES]
            self.preview = torch.stack(images) if images else None
        return self.preview

    def _run_hooks(self) -> None:
        hooks = self.method.hooks()
        if self.main and hooks:
            self.method.eval()
            ctx = HookContext(step=self.step, run_dir=self.run_dir, device=self.device, images=self._preview_images(),
                              num_images=self.cfg.vis.num_images, sampler_options=dict(self.cfg.vis.sampler),
                              log=lambda m: self.logger.log(self.step, m),
                              log_image=lambda tag, img: self.logger.image(tag, img, self.step))
            with torch.no_grad():
                for hook in hooks:
                    hook(self.method, ctx)
        dist.barrier()

    def _checkpoint_bytes(self) -> int:
        """About the size of one checkpoint: the weights (and EMA), the method's other tensors and the optimizer's
        two AdamW moments of every trainable parameter."""
        weights = sum(t.numel() * t.element_size() for t in self.method.state_dict().values())
        moments = sum(2 * p.numel() * 4 for p in self.method.parameters() if p.requires_grad)
        ema = sum(t.numel() * t.element_size() for t in self.model.state_dict().values()) if self.ema else 0
        return weights + moments + ema

    def _last_good(self) -> str:
        last = latest_checkpoint(self.ckpt_root)
        return f"the last good checkpoint is {last}" if last else "no checkpoint was saved"

    def _withhold_checkpoint(self, bad_steps: int, final: bool) -> None:
        """A checkpoint is due but the last `bad_steps` steps had a non-finite loss: skip it, or, when the run
        ends here, stop with a RunError instead of reporting 'done'."""
        steps = f"step {self.step}" if bad_steps == 1 else f"steps {self.step - bad_steps + 1}-{self.step}"
        if final:
            raise RunError(f"training diverged: the loss or gradient of {steps} was not finite, so the weights are "
                           f"not saved; {self._last_good()}. Lower the learning rate, or use train.precision=fp32.")
        log.warning("step %d: checkpoint skipped, the loss or gradient of %s was not finite", self.step, steps)

    def _save(self) -> None:
        """Rank 0 writes the checkpoint; a failure (disk full, read-only, weights no longer finite) is raised as the
        same RunError on every rank, and leaves the previous checkpoints intact."""
        error = None
        if self.main:
            try:
                self._write_checkpoint()
            except RunError as e:
                error = str(e)
            except Exception as e:
                if not (isinstance(e, OSError) or is_disk_full(e)):
                    raise
                reason = "no space left on device" if is_disk_full(e) else os_error_message(e)
                error = (f"could not save the checkpoint of step {self.step} in {self.ckpt_root} ({reason}); "
                         f"{self._last_good()}: resume from it with --resume auto once the cause is fixed")
        error = dist.broadcast_object(error)
        if error is not None:
            raise RunError(error)

    def _write_checkpoint(self) -> None:
        bad = [n for n, t in self.model.state_dict().items() if t.is_floating_point() and not bool(t.isfinite().all())]
        if bad:
            raise RunError(f"training diverged: at step {self.step} the weights are no longer finite ({bad[0]}"
                           f"{f' and {len(bad) - 1} more' if len(bad) > 1 else ''}); nothing was saved and "
                           f"{self._last_good()}. Lower the learning rate, or use train.precision=fp32.")
        ema_state = None
        if self.ema is not None:
            ema_state = {k: self.ema.shadow[k].to(v.dtype) if k in self.ema.shadow else v
                         for k, v in self.model.state_dict().items()}
        save_checkpoint(
            self.ckpt_root, self.step, self.model,
            training_state={"optimizer": self.optimizer.state_dict(),
                            "scaler": self.scaler.state_dict() if self.scaler else {},
                            "method_extra": self._method_extra_state()},
            trainer_state={"step": self.step, "loader": self.loader.state_dict(), "seed": self.cfg.train.seed,
                           "world_size": self.world, "global_batch": self.cfg.train.batch_size * self.world,
                           "skipped_steps": self.skipped_steps, "total_steps": self.total_steps,
                           "stop_step": self.stop_step},
            config_yaml=self.config_yaml, ema_state=ema_state, keep_last=self.cfg.train.keep_last)


def default_run_dir(method: str) -> Path:
    return Path("runs") / f"{method}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
