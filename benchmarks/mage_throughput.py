"""MAGE (and MAE) throughput and MFU on this machine: training steps (from cached tokens and from images) and MaskGIT
generation of the `mage-cifar10` preset model (ViT-S-like 6x384 encoder, 4x384 decoder, 8x8 tokens, 32 px; 64 codes
since 2026-12-03, 512 in the BENCHMARKS.md rows of 2026-11-24) with a tokenizer built from the `tokenizer-cifar10`
preset. Random weights: speed does not depend on them.

    python benchmarks/mage_throughput.py [--min-time 3] [--batch 64] [--gen-batch 16] [--skip-bf16] [--threads N]
        [--mae PRESET:BATCH ...] [--skip-mage]

What is measured, row by row:
- matmul peak: GFLOP/s of a square matmul n x n @ n x n, in fp32 and bf16, both as `a @ b` and as `a @ b.T`
  (F.linear, the kernel nn.Linear uses: on CPUs without native bf16 the two differ ~7x). n doubles from 256
  while one call stays under ~0.5 s (max 2048 on CPU); --matmul-size fixes it. The peak of a precision is the
  faster of the two kernels, and is the denominator of that precision's MFU.
- train: one optimizer step = forward loss + backward + AdamW step of MAGE (train mode, dropout on, no grad
  clipping), at --batch, fp32 or bf16 autocast. source `tokens`: random token ids (as with a token cache);
  source `images`: random 32 px images tokenized inside the step by the frozen tokenizer (as without a cache).
- generate: the model's sampler (MaskGIT, 12 iterations) from scratch plus the tokenizer decode, at
  --gen-batch.
- MAE train step (--mae PRESET:BATCH, default mae-cifar10:64 and mae-vitb-in224:8): one optimizer step of the
  preset's MAE (75 % of the patches removed, norm-pix loss on the removed ones, AdamW) on random images.
FLOPs are counted with torch.utils.flop_counter.FlopCounterMode on one step of the same batch run in fp32
(the count does not depend on the precision): matmuls, convolutions and attention (the CPU SDPA kernels are
added to its table), no element-wise ops, embeddings, or optimizer arithmetic. The `FLOPs counted` column
says which parts are in `GFLOP/step`; achieved GFLOP/s = GFLOP/step / seconds per step, MFU = achieved / peak.

bf16 on a CPU without native bf16 (e.g. AVX2-only x86) is emulated and much slower than fp32 (measured on an
AVX2 AMD EPYC, one thread: fp32 ~90 GFLOP/s, bf16 ~1.3 as a @ b and ~10 as a @ b.T). When the measured bf16 peak
is below 1/2 of fp32 (no native bf16: a CPU that has it runs bf16 faster than fp32), every bf16 cell is timed as
ONE call after one warm-up call at the small --bf16-slow-batch (the `note` column says so), so that the default
run stays within a few minutes: at batch 64, one emulated bf16 step of mage-cifar10 takes over a minute.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_out_argument, report, timeit  # noqa: E402

from maskgen.api import build_config  # noqa: E402
from maskgen.precision import autocast as autocast_for  # noqa: E402
from maskgen.methods.mae import masked_mse  # noqa: E402
from maskgen.methods.mage import MAGEMasking, MAGEObjective, mage_loss  # noqa: E402
from maskgen.models.mae import MAE  # noqa: E402
from maskgen.models.mage import MAGE  # noqa: E402
from maskgen.models.vqgan import VQGAN  # noqa: E402
from maskgen.sampling import sampler_for, samples_to_images  # noqa: E402

NUM_ITER = 12
SLOW_BF16_RATIO = 0.5  # bf16 peak / fp32 peak below which bf16 (emulated) cells get one step at a small batch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------ FLOP counting
def _sdpa_cpu(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _sdpa_cpu_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


def _custom_flops() -> dict:
    """FlopCounterMode has no formula for the CPU flash-attention kernels (used by SDPA without dropout)."""
    aten = torch.ops.aten
    out = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        out[aten._scaled_dot_product_flash_attention_for_cpu] = _sdpa_cpu
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
        out[aten._scaled_dot_product_flash_attention_for_cpu_backward] = _sdpa_cpu_backward
    return out


def count_flops(fn) -> int:
    """FLOPs of one call of fn() (run once, for real)."""
    with FlopCounterMode(display=False, custom_mapping=_custom_flops()) as fc:
        fn()
    return fc.get_total_flops()


# ------------------------------------------------------------------------------------------ matmul peak
def matmul_peak(dtype: torch.dtype, device: torch.device, min_time: float, size: int | None,
                transposed: bool) -> tuple[float, int]:
    """(GFLOP/s, n) of an n x n matmul a @ b (or a @ b.T via F.linear when `transposed`)."""
    max_n = 8192 if device.type == "cuda" else 2048

    def make(n):
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        return (lambda: F.linear(a, b)) if transposed else (lambda: a @ b)

    with torch.inference_mode():
        n = size or 256
        fn = make(n)
        fn()
        if not size:
            while n < max_n:
                t0 = time.perf_counter()
                fn()
                _sync(device)
                if 8 * (time.perf_counter() - t0) > 0.5:  # the next size would take > ~0.5 s a call
                    break
                n *= 2
                fn = make(n)
                fn()
        sec = timeit(fn, min(min_time, 2.0), warmup=1)
    return 2 * n ** 3 / sec / 1e9, n


# ------------------------------------------------------------------------------------------ the cells
def build_models(args, device):
    cfg = build_config("mage", args.config).model
    mage = MAGE(cfg).to(device)
    tok_cfg = build_config("tokenizer", args.tokenizer, [f"model.codebook_size={cfg.codebook_size}"]).model
    mage.set_tokenizer(VQGAN(tok_cfg).to(device))
    return cfg, mage


def train_step_fn(mage: MAGE, opt, source: str, batch: int, autocast, device):
    cfg, objective = mage.config, MAGEObjective()  # the paper's masking and label smoothing
    masking = MAGEMasking(objective, cfg.num_tokens)
    if source == "tokens":
        x = torch.randint(0, cfg.codebook_size, (batch, cfg.token_grid, cfg.token_grid), device=device)
    else:
        x = torch.rand(batch, 3, cfg.image_size, cfg.image_size, device=device)

    def step():
        with autocast:
            # images: tokenized inside (no grad), as the trainer does without a cache
            loss, _, _ = mage_loss(mage, x, masking, objective.label_smoothing)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, x


def gen_fn(mage: MAGE, batch: int, autocast, device):
    g = torch.Generator(device).manual_seed(0)
    sampler = sampler_for(mage, num_iter=NUM_ITER)  # what `maskgen generate` runs

    def run():
        with autocast, torch.no_grad():
            samples_to_images(mage, sampler.generate(mage, batch, generator=g))

    return run


def mae_step_fn(mae: MAE, opt, batch: int, autocast, device):
    """One MAE optimizer step on random images of the model's size (the paper's 0.75 masking)."""
    x = torch.rand(batch, 3, mae.config.image_size, mae.config.image_size, device=device)

    def step():
        with autocast:
            latent, mask, ids_restore, _ = mae.forward_encoder(x, 0.75)
            loss = masked_mse(mae.forward_decoder(latent, ids_restore), mae.targets(x), mask)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def time_cell(fn, min_time: float, slow: bool, device) -> float:
    """Seconds per call: the median of >= 3 calls over min_time (1 warm-up), or one call after one warm-up."""
    if not slow:
        return timeit(fn, min_time, warmup=1)
    fn()
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def run(args) -> list[dict]:
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precisions = ["fp32"] if args.skip_bf16 else ["fp32", "bf16"]
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    blank = {"what": "", "precision": "", "source": "", "batch": "-", "img/s": "-", "GFLOP/step": "-",
             "achieved GFLOP/s": "-", "MFU %": "-", "FLOPs counted": "-", "note": ""}
    rows = []

    def add(**kw):
        rows.append({**blank, **kw})
        print(rows[-1], file=sys.stderr, flush=True)

    # 1. matmul peaks
    peak = {}
    for p in precisions:
        best = 0.0
        for transposed in (False, True):
            gflops, n = matmul_peak(dtypes[p], device, args.min_time, args.matmul_size, transposed)
            best = max(best, gflops)
            add(what="matmul peak", precision=p, source=f"{'a @ b.T (F.linear)' if transposed else 'a @ b'} n={n}",
                **{"achieved GFLOP/s": gflops})
        peak[p] = best
    slow_bf16 = "bf16" in peak and device.type == "cpu" and peak["bf16"] < SLOW_BF16_RATIO * peak["fp32"]
    if slow_bf16:
        print(f"bf16 matmul peak {peak['bf16']:.3g} GFLOP/s is {peak['bf16'] / peak['fp32']:.2g}x fp32 "
              f"({peak['fp32']:.3g}), below {SLOW_BF16_RATIO}: bf16 is emulated on this CPU, so every bf16 cell is timed as "
              f"one call after one warm-up call at batch {args.bf16_slow_batch} instead of --min-time at full batch",
              file=sys.stderr)

    flops_cache: dict = {}

    def flops(key, fn):
        if key not in flops_cache:
            flops_cache[key] = count_flops(fn)
        return flops_cache[key]

    if not args.skip_mage:
        cfg, mage = build_models(args, device)
        tok = mage.tokenizer
        opt = torch.optim.AdamW(mage.parameters(), lr=1.5e-4, betas=(0.9, 0.95), weight_decay=0.05)
    for p in precisions if not args.skip_mage else ():
        slow = p == "bf16" and slow_bf16
        autocast = autocast_for(p, device)
        note = (f"emulated bf16 (peak {peak['bf16'] / peak['fp32']:.2g}x fp32): 1 call after 1 warm-up, "
                f"batch {args.bf16_slow_batch}" if slow else "")
        # 2./3. training steps
        batch = args.bf16_slow_batch if slow else args.batch
        for source in ("tokens", "images"):
            step, x = train_step_fn(mage, opt, source, batch, autocast, device)
            mage.train()
            fp32_step, _ = train_step_fn(mage, opt, "tokens", batch, autocast_for("fp32", device), device)
            f_mage = flops(("train", batch), fp32_step)
            counted = "MAGE fwd+bwd"
            f_total = f_mage
            if source == "images":
                f_enc = flops(("encode", batch), lambda: tok.encode(x))
                f_total += f_enc
                counted = f"MAGE fwd+bwd {f_mage / 1e9:.4g} + tokenizer encode {f_enc / 1e9:.3g}"
            sec = time_cell(step, args.min_time, slow, device)
            add(what="train step", precision=p, source=source, batch=batch, **{
                "img/s": batch / sec, "GFLOP/step": f_total / 1e9, "achieved GFLOP/s": f_total / sec / 1e9,
                "MFU %": 100 * f_total / sec / 1e9 / peak[p], "FLOPs counted": counted, "note": note})
        # 4. generation
        gbatch = args.bf16_slow_batch if slow else args.gen_batch
        mage.eval()
        f_gen = flops(("generate", gbatch), lambda: sampler_for(mage, num_iter=NUM_ITER).generate(mage, gbatch))
        codes = torch.randint(0, cfg.codebook_size, (gbatch, cfg.token_grid, cfg.token_grid), device=device)
        f_dec = flops(("decode", gbatch), lambda: tok.decode(codes))
        f_total = f_gen + f_dec
        sec = time_cell(gen_fn(mage, gbatch, autocast, device), args.min_time, slow, device)
        add(what=f"generate ({NUM_ITER} it.)", precision=p, source="scratch", batch=gbatch, **{
            "img/s": gbatch / sec, "GFLOP/step": f_total / 1e9, "achieved GFLOP/s": f_total / sec / 1e9,
            "MFU %": 100 * f_total / sec / 1e9 / peak[p],
            "FLOPs counted": f"MAGE fwd x{NUM_ITER} {f_gen / 1e9:.4g} + tokenizer decode {f_dec / 1e9:.3g}",
            "note": note})
    # 5. MAE training steps, one preset at a time
    for spec in args.mae:
        preset, _, b = spec.partition(":")
        mae = MAE(build_config("mae", preset).model).to(device).train()
        opt = torch.optim.AdamW(mae.parameters(), lr=1.5e-4, betas=(0.9, 0.95), weight_decay=0.05)
        for p in precisions:
            slow = p == "bf16" and slow_bf16
            batch = args.bf16_slow_batch if slow else int(b or args.batch)
            f = flops(("mae", preset, batch), mae_step_fn(mae, opt, batch, autocast_for("fp32", device), device))
            sec = time_cell(mae_step_fn(mae, opt, batch, autocast_for(p, device), device), args.min_time, slow, device)
            add(what=f"MAE train step ({preset})", precision=p, source="images", batch=batch, **{
                "img/s": batch / sec, "GFLOP/step": f / 1e9, "achieved GFLOP/s": f / sec / 1e9,
                "MFU %": 100 * f / sec / 1e9 / peak[p], "FLOPs counted": "MAE fwd+bwd",
                "note": "emulated bf16: 1 call after 1 warm-up" if slow else ""})
        del mae, opt
    return rows


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--min-time", type=float, default=3.0, help="seconds of timing per cell (default 3)")
    ap.add_argument("--batch", type=int, default=64, help="training batch size (default 64)")
    ap.add_argument("--gen-batch", type=int, default=16, help="images generated per call (default 16)")
    ap.add_argument("--skip-bf16", action="store_true", help="skip every bf16 row")
    ap.add_argument("--skip-mage", action="store_true", help="skip the MAGE rows (matmul peaks and MAE rows only)")
    ap.add_argument("--bf16-slow-batch", type=int, default=2,
                    help="batch (training and generation) of the single-call bf16 cells where bf16 is emulated "
                         "(bf16 peak < 1/2 of fp32; default 2)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's default)")
    ap.add_argument("--config", default="mage-cifar10", help="MAGE preset name or YAML path (default mage-cifar10)")
    ap.add_argument("--tokenizer", default="tokenizer-cifar10",
                    help="tokenizer preset whose model config (codebook size set to the MAGE model's) is used "
                         "(default tokenizer-cifar10)")
    ap.add_argument("--matmul-size", type=int, default=0, help="fixed n of the matmul peak (default: auto)")
    ap.add_argument("--mae", nargs="*", default=["mae-cifar10:64", "mae-vitb-in224:8"], metavar="PRESET:BATCH",
                    help="MAE presets whose training step is timed, with their batch (default mae-cifar10:64 "
                         "mae-vitb-in224:8; none: give the flag alone)")
    add_out_argument(ap, "mage_throughput")
    return ap.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    rows = run(args)
    report(args.out, rows, "python benchmarks/mage_throughput.py " + " ".join(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
