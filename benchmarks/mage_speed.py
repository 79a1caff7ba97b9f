"""MAGE's training step and generation, side by side: the frozen reference (maskgen before issue 18, kept in
`mage_reference.py`) against today's implementation, in one process, with the MFU against a matmul peak
measured in the same run.

    python benchmarks/mage_speed.py [--quick] [--out DIR] [--rounds 5] [--threads N] [--profile] [--no-scaling]

Cells (each a config and a precision): `issue` is the configuration of issue 18 (encoder 6 x 256, decoder
2 x 256, 8 heads, 16 x 16 = 256 tokens, 1,024 codes in the official 2,025-row vocabulary, dropout 0.1,
batch 16); `mage-cifar10-cpu` is that preset's model at its training batch (128); `--quick` uses a tiny model
(64 tokens, width 64) so that the whole run takes well under a minute (for tests and `checks/perf`).
- train step: forward loss + backward + AdamW step (train mode, dropout on, the paper's masking, tokens
  given, no gradient clipping). Reference: `reference_loss` and `torch.optim.AdamW` as built before issue 18;
  new: `mage_loss` and `maskgen.engine.optim.build_optimizer`. Both models start from the same weights.
- generation: the MaskGIT sampler, 12 iterations from scratch (what `maskgen generate` runs), tokens only (the
  tokenizer decode is the same code in both and is left out), new in fp32 and with `--precision bf16`.
  Reference: `ReferenceMaskGIT` (torch.multinomial draws) calling `reference_token_logits`, in fp32 (the only
  precision it had).
Timing: `--rounds` alternating rounds (reference, then new) of `--steps` timed calls after a warm-up; a
cell's time is the median over rounds of each round's median, so that drift of the machine hits both sides.
MFU = FLOPs of one call / seconds / the matmul peak of the precision. FLOPs are counted with FlopCounterMode
on each implementation's own fp32 call (matmuls and attention; the reference computes more of them: the
2,025-way output layer at every position), so each side's MFU is that side's work rate.
`--profile` adds torch.profiler tables of the new and reference steps by category (where the time goes).
The scaling table (new implementation, the precision `train.precision=auto` picks) varies the token count
(64, 256, 1,024) at batch 16 and the batch (4, 16, 64) at 256 tokens, issue architecture.
JSON: DIR/mage_speed.json (default DIR runs/benchmarks).
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, report, timeit  # noqa: E402
from mage_reference import ReferenceMaskGIT, ReferenceSampling, reference_loss  # noqa: E402
from mage_throughput import count_flops, matmul_peak  # noqa: E402

from maskgen.api import build_config  # noqa: E402
from maskgen.config import OptimConfig  # noqa: E402
from maskgen.engine.optim import build_optimizer, param_groups  # noqa: E402
from maskgen.precision import autocast as autocast_for  # noqa: E402
from maskgen.precision import resolve_precision  # noqa: E402
from maskgen.methods.mage import MAGEMasking, MAGEObjective, mage_loss  # noqa: E402
from maskgen.models.mage import MAGE, MAGEConfig  # noqa: E402
from maskgen.sampling.maskgit import MaskGITScheduler  # noqa: E402

NUM_ITER = 12
LR = 1.5e-4


def issue_config(token_grid: int = 16) -> MAGEConfig:
    return MAGEConfig(image_size=16 * token_grid, token_grid=token_grid, codebook_size=1024, embed_dim=256, depth=6,
                      num_heads=8, decoder_embed_dim=256, decoder_depth=2, decoder_num_heads=8, dropout=0.1)


def quick_config() -> MAGEConfig:
    return MAGEConfig(image_size=32, token_grid=8, codebook_size=64, vocab_layout="compact", embed_dim=64, depth=2,
                      num_heads=4, decoder_embed_dim=64, decoder_depth=1, decoder_num_heads=4, dropout=0.1)


def cells(quick: bool) -> list[tuple[str, MAGEConfig, int, int]]:
    """(name, model config, train batch, generation batch)."""
    if quick:
        return [("quick", quick_config(), 8, 4)]
    cifar = build_config("mage", "mage-cifar10-cpu")
    return [("issue", issue_config(), 16, 16), ("mage-cifar10-cpu", cifar.model, cifar.train.batch_size, 64)]


# ------------------------------------------------------------------------------------------ steps
def make_train_steps(cfg: MAGEConfig, batch: int, precision: str, device):
    """(reference step, new step, reference fp32 step, new fp32 step): zero-argument callables."""
    torch.manual_seed(0)
    ref_model = MAGE(cfg).to(device).train()
    new_model = copy.deepcopy(ref_model)
    objective = MAGEObjective()
    masking = MAGEMasking(objective, cfg.num_tokens)
    ref_opt = torch.optim.AdamW(param_groups(ref_model, 0.05), lr=LR, betas=(0.9, 0.95), eps=1e-8)
    new_opt = build_optimizer(new_model, OptimConfig(), LR)
    tokens = torch.randint(0, cfg.codebook_size, (batch, cfg.num_tokens), device=device)

    def ref_step(precision=precision):
        with autocast_for(precision, device):
            _, drop_mask, mask = masking.sample(batch, device=device)
            loss = reference_loss(ref_model, tokens, mask, drop_mask, objective.label_smoothing)
        loss.backward()
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)

    def new_step(precision=precision):
        with autocast_for(precision, device):
            loss, _, _ = mage_loss(new_model, tokens, masking, objective.label_smoothing)
        loss.backward()
        new_opt.step()
        new_opt.zero_grad(set_to_none=True)

    return ref_step, new_step, lambda: ref_step("fp32"), lambda: new_step("fp32")


def make_gen_calls(cfg: MAGEConfig, batch: int, precision: str, device):
    torch.manual_seed(0)
    model = MAGE(cfg).to(device).eval()
    # the sampler of `maskgen generate` (its `precision` option), without the tokenizer decode
    new_sampler, new32 = MaskGITScheduler(num_iter=NUM_ITER, precision=precision), MaskGITScheduler(num_iter=NUM_ITER)
    ref_sampler, ref_model = ReferenceMaskGIT(num_iter=NUM_ITER), ReferenceSampling(model)

    def call(sampler, m):
        sampler.generate(m, batch, generator=torch.Generator(device).manual_seed(0))

    return (lambda: call(ref_sampler, ref_model), lambda: call(new_sampler, model),
            lambda: call(ref_sampler, ref_model), lambda: call(new32, model))


def side_by_side(ref, new, rounds: int, steps: int) -> tuple[float, float]:
    """Seconds per call of (ref, new): median over alternating rounds of each round's median of `steps` calls."""
    ref(), new()  # warm-up (allocator, first-call costs)
    per = {"ref": [], "new": []}
    for _ in range(rounds):
        for name, fn in (("ref", ref), ("new", new)):
            times = []
            for _ in range(steps):
                t0 = time.perf_counter()
                fn()
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            per[name].append(statistics.median(times))
    return statistics.median(per["ref"]), statistics.median(per["new"])


# ------------------------------------------------------------------------------------------ profile
CATEGORIES = [  # (category, aten op names; a trailing * matches a prefix), first match wins
    ("matmul (mm, addmm, bmm)", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")),
    ("attention kernels (SDPA flash, softmax)", ("aten::_scaled_dot_product*", "aten::_softmax",
                                                 "aten::_softmax_backward_data")),
    ("cross-entropy (log_softmax, nll)", ("aten::_log_softmax", "aten::_log_softmax_backward_data",
                                          "aten::nll_loss*")),
    ("dropout masks (bernoulli_, randint, compare)", ("aten::bernoulli_", "aten::random_", "aten::ge", "aten::lt")),
    ("LayerNorm / GELU (+ backward)", ("aten::native_layer_norm*", "aten::gelu", "aten::gelu_backward")),
    ("element-wise mul / add / where", ("aten::mul", "aten::mul_", "aten::add", "aten::add_", "aten::where",
                                        "aten::div", "aten::div_", "aten::sub")),
    ("dtype casts / copies", ("aten::copy_", "aten::_to_copy", "aten::clone")),
    ("optimizer (AdamW)", ("aten::_foreach*", "aten::_fused_adam*", "aten::lerp_", "aten::sqrt", "aten::addcdiv_",
                           "aten::addcmul_")),
    ("gather / index / scatter / embedding", ("aten::index*", "aten::_index_put_impl_", "aten::gather",
                                              "aten::scatter*", "aten::embedding*", "aten::nonzero", "aten::cat",
                                              "aten::cumsum", "aten::masked_fill_")),
    ("fill / sum / argmax / other reductions", ("aten::fill_", "aten::zero_", "aten::sum", "aten::argmax",
                                                "aten::all", "aten::isneginf", "aten::clamp*")),
]


def _category(op: str) -> str:
    for cat, names in CATEGORIES:
        if any(op == n or (n.endswith("*") and op.startswith(n[:-1])) for n in names):
            return cat
    return "other (framework overhead, small ops)"


def profile_step(fn, steps: int = 3) -> list[dict]:
    """torch.profiler self CPU time of `steps` calls of fn, by category -> rows {category, ms/step, %, top ops}."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            fn()
    by_cat: dict[str, float] = {}
    ops: dict[str, dict[str, float]] = {}
    for e in prof.key_averages():
        t = e.self_cpu_time_total / 1e3 / steps
        if t <= 0:
            continue
        cat = _category(e.key)
        by_cat[cat] = by_cat.get(cat, 0.0) + t
        ops.setdefault(cat, {})[e.key] = t
    total = sum(by_cat.values())
    rows = []
    for cat, t in sorted(by_cat.items(), key=lambda kv: -kv[1]):
        top = sorted(ops[cat].items(), key=lambda kv: -kv[1])[:3]
        rows.append({"category": cat, "ms/step": t, "%": 100 * t / total,
                     "top ops": ", ".join(f"{k.replace('aten::', '')} {v:.1f}" for k, v in top)})
    return rows


# ------------------------------------------------------------------------------------------ main
def run(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    min_time = 0.2 if args.quick else 2.0
    peak = {}
    for p, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        peak[p] = max(matmul_peak(dtype, device, min_time, 512 if args.quick else None, t)[0] for t in (False, True))
    native_bf16 = device.type == "cuda" or peak["bf16"] > peak["fp32"]
    precisions = ["fp32", "bf16"] if native_bf16 else ["fp32"]
    rounds, steps = (2, 2) if args.quick else (args.rounds, args.steps)
    rows, profiles = [], {}

    def add(what, cell, precision, batch, ref_s, new_s, ref_flops, new_flops, ref_precision=None):
        ref_precision = ref_precision or precision
        rows.append({"what": what, "cell": cell, "precision": precision if ref_precision == precision else
                     f"{precision} (reference {ref_precision})", "batch": batch,
                     "reference img/s": batch / ref_s, "new img/s": batch / new_s, "speed-up": ref_s / new_s,
                     "reference MFU %": 100 * ref_flops / ref_s / 1e9 / peak[ref_precision],
                     "new MFU %": 100 * new_flops / new_s / 1e9 / peak[precision],
                     "reference GFLOP": ref_flops / 1e9, "new GFLOP": new_flops / 1e9})
        print({k: (round(v, 2) if isinstance(v, float) else v) for k, v in rows[-1].items()}, file=sys.stderr,
              flush=True)

    for name, cfg, batch, gen_batch in cells(args.quick):
        if args.cells and name not in args.cells:
            continue
        for p in precisions:
            ref, new, ref32, new32 = make_train_steps(cfg, batch, p, device)
            f_ref, f_new = count_flops(ref32), count_flops(new32)
            ref_s, new_s = side_by_side(ref, new, rounds, steps)
            add("train step", name, p, batch, ref_s, new_s, f_ref, f_new)
            if args.profile:
                profiles[f"train {name} {p} new"] = profile_step(new)
                profiles[f"train {name} {p} reference"] = profile_step(ref)
            del ref, new, ref32, new32
        for p in precisions if args.generation else ():  # the reference sampled in fp32 only
            ref, new, ref32, new32 = make_gen_calls(cfg, gen_batch, p, device)
            f_ref, f_new = count_flops(ref32), count_flops(new32)
            ref_s, new_s = side_by_side(ref, new, rounds, max(1, steps // 2))
            add(f"generation ({NUM_ITER} it.)", name, p, gen_batch, ref_s, new_s, f_ref, f_new, "fp32")

    scaling = []
    if not args.quick and args.scaling:
        p = resolve_precision("auto", device)
        for grid, batch in ((8, 16), (16, 16), (32, 16), (16, 4), (16, 64)):
            cfg = issue_config(grid)
            _, new, _, new32 = make_train_steps(cfg, batch, p, device)
            f = count_flops(new32)
            sec = timeit(new, 0.0, warmup=1, min_calls=3)
            scaling.append({"tokens": cfg.num_tokens, "batch": batch, "precision": p, "ms/step": 1e3 * sec,
                            "img/s": batch / sec, "ms/img": 1e3 * sec / batch, "GFLOP/step": f / 1e9,
                            f"MFU % (of {p} peak)": 100 * f / sec / 1e9 / peak[p]})
            print(scaling[-1], file=sys.stderr, flush=True)
    return {"rows": rows, "peak GFLOP/s": peak, "scaling": scaling, "profiles": profiles}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a tiny model, 2 rounds of 2 calls: well under a minute")
    ap.add_argument("--out", type=Path, default=Path("runs") / "benchmarks",
                    help="folder of mage_speed.json (default runs/benchmarks)")
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds per cell (default 5)")
    ap.add_argument("--steps", type=int, default=3, help="timed calls per side per round (default 3)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's default)")
    ap.add_argument("--cells", nargs="*", default=None, metavar="NAME",
                    help="time only these cells (issue, mage-cifar10-cpu; default: all)")
    ap.add_argument("--no-generation", dest="generation", action="store_false", help="skip the generation rows")
    ap.add_argument("--profile", action="store_true", help="add torch.profiler tables (where the time goes)")
    ap.add_argument("--no-scaling", dest="scaling", action="store_false",
                    help="skip the tokens x batch scaling table")
    return ap.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    result = run(args)
    command = "python benchmarks/mage_speed.py " + " ".join(sys.argv[1:] if argv is None else argv)
    out = args.out / "mage_speed.json"
    report(out, result["rows"], command, extra={k: v for k, v in result.items() if k != "rows"})
    print("matmul peak GFLOP/s: " + ", ".join(f"{k} {v:.0f}" for k, v in result["peak GFLOP/s"].items()))
    if result["scaling"]:
        print_table(result["scaling"], "scaling (new implementation)")
    for key, prof in result["profiles"].items():
        print_table(prof, f"profile: {key}")


if __name__ == "__main__":
    main()
