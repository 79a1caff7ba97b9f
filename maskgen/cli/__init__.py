"""The `maskgen` command line. Each subcommand is a thin wrapper over a function of the `maskgen` package.

User mistakes (bad config, bad flag values, missing or corrupt files) end with one line on stderr and exit code 2;
environment faults (full disk, read-only folder, a run directory in use) and failed runs with one line and exit
code 1 (`main`, the error boundary). `--debug` shows the traceback.
"""
from __future__ import annotations

import argparse
import errno
import os
import sys

from .. import api
from ..data.teacher_cache import cache_teacher
from ..data.token_cache import cache_tokens
from ..bench import publish, run_bench
from ..bench.plan import METHODS as BENCH_METHODS, parse_methods
from ..demo import run_demo
from ..distributed import check_device
from ..errors import MaskgenError, disk_full_message, is_disk_full, os_error_message
from ..eval.features import extract_features
from ..generation import edit_image, generate_images
from ..options import flag_type
from ..registry import METHODS
from ..sampling import add_sampler_arguments, sampler_options_from_args
from .eval import T_HELP, add_eval_parser, run_eval

TRAIN_EPILOG = """\
examples:
  maskgen train tokenizer --config tokenizer-tiny
  maskgen train tokenizer --config tokenizer-cifar10 data.path=cifar10 train.max_steps=2000
  maskgen train tokenizer --config my.yaml --run-dir runs/tok --resume auto
  torchrun --nproc_per_node=2 $(which maskgen) train tokenizer --config tokenizer-tiny

key=value overrides address section.key (sections: model, METHOD (the method's own options, e.g. mage.tokenizer),
data, optim, schedule, train, dist, log, vis);
`maskgen config show PRESET` lists every key with its value. data.path accepts an image folder (class
sub-folders give labels), WebDataset shards ('shards/train-{000000..000009}.tar'), 'cifar10' or 'mnist5k'.
"""


# OS errors that are the environment's or the request's, never maskgen's: one line, no traceback
EXPECTED_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT, errno.ENOTDIR,
                   errno.EISDIR, errno.EEXIST, errno.ENAMETOOLONG, errno.EIO, errno.EMFILE, errno.ENFILE, errno.EFBIG,
                   errno.ENODEV, errno.ENXIO}


def _methods() -> list[str]:
    return METHODS.names()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="maskgen",
        description="Masked generative encoders: pre-train, generate, edit, evaluate.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `maskgen COMMAND --help` for the options of a command. Errors are one line (exit code 2: a "
               "usage error, 1: the run failed); --debug anywhere on the line (or MASKGEN_DEBUG=1) shows the "
               "traceback.")
    p.add_argument("--debug", action="store_true", help="show the Python traceback of an error")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    t = sub.add_parser("train", help="train a method (pre-training or tokenizer)", description=(
        "Train METHOD from a preset or YAML config plus key=value overrides. The run directory receives "
        "config.yaml, metrics.jsonl, tensorboard/, checkpoints/ and samples/."),
        epilog=TRAIN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("method", choices=_methods(), help="what to train")
    t.add_argument("--config", "-c", help="preset name (see `maskgen config list`) or path to a YAML file")
    t.add_argument("--run-dir", help="output directory (default: runs/METHOD-DATE-TIME)")
    t.add_argument("--resume", metavar="auto|DIR",
                   help="'auto': continue from the latest checkpoint of --run-dir (start fresh if none); "
                        "or a checkpoint / run directory")
    t.add_argument("--init-from", metavar="DIR",
                   help="start from the weights of another run (a later stage, e.g. UMD's class-conditional "
                        "fine-tuning; sets train.init_from): new modules keep their initialisation, the optimizer "
                        "starts fresh")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.max_steps=100")

    c = sub.add_parser("config", help="list or show configuration presets")
    csub = c.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    csub.add_parser("list", help="list the shipped presets")
    show = csub.add_parser("show", help="print a preset, resolved with its defaults, as YAML")
    show.add_argument("preset", help="preset name or YAML path")
    show.add_argument("overrides", nargs="*", metavar="key=value")

    ct = sub.add_parser("cache-tokens", help="pre-tokenize a dataset (K augmented views + flips) for MAGE",
                        description="Encode every image of --data with a tokenizer into one memory-mappable "
                                    "file: K views (view 0 = centre crop, the others RandomResizedCrop) and their "
                                    "horizontal flips, with labels. MAGE training reads it with "
                                    "mage.token_cache=FILE instead of running the tokenizer every step. The file "
                                    "records hashes of the tokenizer and the transform; a mismatch is refused.")
    ct.add_argument("--tokenizer", required=True, help="tokenizer weights / checkpoint / run directory")
    ct.add_argument("--data", required=True, help="image folder, shards, 'cifar10' or 'mnist5k'")
    ct.add_argument("--out", required=True, help="output file (.safetensors)")
    ct.add_argument("--views", type=flag_type(int, min=1), default=10, help="augmented views per image (default 10)")
    ct.add_argument("--image-size", type=flag_type(int, min=8), required=True,
                    help="image side the tokenizer sees, e.g. 32")
    ct.add_argument("--split", default="train", help="split of a named dataset (default train)")
    ct.add_argument("--crop-scale", type=flag_type(float, gt=0.0, max=1.0), nargs=2,
                    default=(0.2, 1.0), metavar=("MIN", "MAX"),
                    help="RandomResizedCrop area range of views 1..K-1 (default 0.2 1.0)")
    ct.add_argument("--batch-size", type=flag_type(int, min=1), default=64, help="views encoded per batch")
    ct.add_argument("--seed", type=flag_type(int, min=0), default=0)
    ct.add_argument("--device", default="cpu", help="cpu or cuda")
    ct.add_argument("--memory-format", choices=("contiguous", "channels_last"), default="contiguous",
                    help="layout of the tokenizer's convolutions: channels_last gives the same codes, a cache "
                         "1.04-1.5x faster on a Xeon with AMX (fp32; BENCHMARKS.md); elsewhere time both "
                         "(default contiguous)")

    cf = sub.add_parser("cache-teacher", help="pre-compute a frozen teacher's features of K views of a dataset "
                                              "(MR-MAE)",
                        description="Run a frozen teacher on K augmented views (view 0 = centre crop, the others "
                                    "RandomResizedCrop) and their horizontal flips of every image of --data, and "
                                    "store the views' pixels with the teacher's feature maps in one file. MR-MAE "
                                    "trains from it with mrmae.teacher_caches=[FILE] instead of running the teacher "
                                    "every step (on that finite set of crops). The file records the teacher and the "
                                    "crop policy; a mismatch is refused.")
    cf.add_argument("--teacher", required=True, help="efficientnet-lite0, a maskgen checkpoint folder (MAGE, MAE) or "
                                                     "timm:MODEL@WEIGHTS_FILE")
    cf.add_argument("--data", required=True, help="image folder, shards, 'cifar10' or 'mnist5k'")
    cf.add_argument("--out", required=True, help="output file (.safetensors)")
    cf.add_argument("--image-size", type=flag_type(int, min=8), required=True,
                    help="image side the student sees (data.image_size), e.g. 32")
    cf.add_argument("--teacher-image-size", type=flag_type(int, min=0), default=0,
                    help="side a convolutional teacher reads (mrmae.teacher_image_size; 0: its own)")
    cf.add_argument("--views", type=flag_type(int, min=1), default=1, help="augmented views per image (default 1: "
                                                                           "the centre view and its flip)")
    cf.add_argument("--split", default="train", help="split of a named dataset (default train)")
    cf.add_argument("--crop-scale", type=flag_type(float, gt=0.0, max=1.0), nargs=2, default=(0.2, 1.0),
                    metavar=("MIN", "MAX"), help="RandomResizedCrop area range of views 1..K-1 (default 0.2 1.0)")
    cf.add_argument("--batch-size", type=flag_type(int, min=1), default=64, help="views per teacher batch")
    cf.add_argument("--seed", type=flag_type(int, min=0), default=0)
    cf.add_argument("--device", default="cpu", help="cpu or cuda")

    gen = sub.add_parser("generate", help="generate images with a generative model (MAGE: iterative decoding; "
                                          "UMD: DDIM)",
                         description="Generate images from scratch with the sampler the model declares (MAGE: "
                                     "every token starts masked and is filled in num-iter MaskGIT steps, cosine "
                                     "schedule, Gumbel-noised confidence; UMD: DDIM over --steps steps with "
                                     "classifier-free guidance --cfg on class --class). A checkpoint's EMA weights "
                                     "are used where it has them (--weights). Image i depends only on (--seed, i). "
                                     "Writes OUT/000000.png ... and OUT-grid.png (the first 64, beside the folder, so "
                                     "that OUT holds only samples for FID tools). Unset sampler options keep the "
                                     "sampler's defaults.")
    gen.add_argument("--ckpt", required=True, help="weights / checkpoint / run directory of a generative model")
    gen.add_argument("--out", required=True, help="output folder")
    gen.add_argument("--num-images", type=flag_type(int, min=1), default=16)
    _sampling_args(gen)
    gen.add_argument("--batch-size", type=flag_type(int, min=1), default=16)
    gen.add_argument("--weights", choices=("auto", "ema", "raw"), default="auto",
                     help="auto: the checkpoint's EMA weights where it has them, else the trained ones; ema; raw: the "
                          "trained weights (e.g. after a fine-tuning too short for its EMA) (default auto)")

    ed = sub.add_parser("edit", help="inpaint, outpaint or uncrop an image with a generative model (MAGE)",
                        description="Regenerate part of an image: its tokens start masked (one token beyond the "
                                    "pixel region), the others stay fixed. The image is resized to the model's "
                                    "resolution; OUT and OUT_panel.png (input | masked | result) are written.")
    ed.add_argument("kind", choices=("inpaint", "outpaint", "uncrop"),
                    help="inpaint: regenerate --box or --mask; outpaint: add --pad pixels on every side; "
                         "uncrop: keep --box, regenerate the rest")
    ed.add_argument("--ckpt", required=True, help="weights / checkpoint / run directory of a model that edits "
                                                  "(MAGE)")
    ed.add_argument("--image", required=True, help="input image file")
    ed.add_argument("--out", required=True, help="output PNG file")
    ed.add_argument("--box", help="x0,y0,x1,y1 in pixels of the input image (end-exclusive)")
    ed.add_argument("--mask", help="mask image of the input's size; white = regenerate (inpaint)")
    ed.add_argument("--pad", type=flag_type(int, min=1), help="pixels added on every side (outpaint)")
    ed.add_argument("--dilate", type=flag_type(int, min=0), default=1,
                    help="grow the token region by this many tokens (default 1)")
    _sampling_args(ed)

    ft = sub.add_parser("features", help="extract features of a dataset with a pre-trained encoder",
                        description="Encoder features (nothing masked) of every image, after resize + centre crop, "
                                    "into a safetensors file with 'features' [N, D] and 'labels' [N].")
    ft.add_argument("--ckpt", required=True, help="weights / checkpoint / run directory")
    ft.add_argument("--data", required=True, help="image folder, shards, 'cifar10' or 'mnist5k'")
    ft.add_argument("--out", required=True, help="output .safetensors file")
    ft.add_argument("--split", default="train")
    ft.add_argument("--pool", choices=("mean", "cls"),
                    help="mean: LayerNorm of the mean image-token output (MAGE's official linear probe); cls: the "
                         "class token ([C0] of MAGE, [CLS] of MAE's official probe, the mean of UMD's 4 CLS "
                         "outputs). Default: the model's official one")
    ft.add_argument("--layer", type=flag_type(int, min=1),
                    help="features of this encoder block (1 = the first; default: the last); ViT encoders (MAGE, MAE) only")
    ft.add_argument("--t", type=flag_type(int, min=0), metavar="T", help=T_HELP)
    ft.add_argument("--batch-size", type=flag_type(int, min=1), default=64)
    ft.add_argument("--limit", type=flag_type(int, min=0), default=0, help="a fixed random subset of N images (0: all)")
    ft.add_argument("--image-size", type=flag_type(int, min=8),
                    help="image side fed to the model (default: the model's; needed for a tokenizer)")
    ft.add_argument("--device", default="cpu")

    cv = sub.add_parser("convert", help="import an official checkpoint as a maskgen weights folder")
    cvsub = cv.add_subparsers(dest="convert_command", metavar="KIND", required=True)
    vq = cvsub.add_parser("vqgan", help="the official MAGE VQGAN tokenizer (vqgan_jax_strongaug.ckpt)",
                          description="Convert the MAGE tokenizer file (or the vqgan.* part of a MAGE checkpoint) "
                                      "into DIR (model.safetensors + config.json); maskgen.from_pretrained(DIR) "
                                      "then returns the tokenizer. The file is read without unpickling code.")
    vq.add_argument("--src", required=True, help="official .ckpt / .pth file")
    vq.add_argument("--out", required=True, help="output weights folder")
    mg = cvsub.add_parser("mage", help="an official MAGE pre-training checkpoint (checkpoint['model'], ViT-B/L/H)",
                          description="Convert an official MAGE checkpoint (with its vqgan.* tokenizer) into DIR; "
                                      "the 9 tensors the official model never uses are dropped. "
                                      "maskgen.from_pretrained(DIR) returns MAGE with its tokenizer attached.")
    mg.add_argument("--src", required=True, help="official .pth file")
    mg.add_argument("--out", required=True, help="output weights folder")
    ma = cvsub.add_parser("mae", help="an official MAE checkpoint: the encoder-only release or the full model with "
                                      "its decoder",
                          description="Convert an official MAE checkpoint (facebookresearch/mae, checkpoint['model']) "
                                      "into DIR: the encoder-only release (mae_pretrain_vit_*.pth) gives an encoder "
                                      "for features and probes, the full files (*_full.pth, mae_visualize_*.pth) the "
                                      "whole MAE, which `maskgen reconstruct` uses.")
    ma.add_argument("--src", required=True, help="official .pth file")
    ma.add_argument("--out", required=True, help="output weights folder")
    ma.add_argument("--target", choices=("norm-pix", "pixels"), default="norm-pix",
                    help="what the decoder predicts: norm-pix (the pre-training releases, default) or pixels (the "
                         "mae_visualize_* files); only the reconstruction's un-normalisation depends on it")

    rc = sub.add_parser("reconstruct", help="mask an image and reconstruct it (MAE)",
                        description="Resize the image to the model's resolution, remove --mask-ratio of its patches "
                                    "at random (seeded), reconstruct them and write a panel: input | masked input | "
                                    "reconstruction | reconstruction with the visible patches pasted back. With a "
                                    "norm-pix model each predicted patch is un-normalised with the mean and std of "
                                    "the same input patch, as the official visualisation does.")
    rc.add_argument("--ckpt", required=True, help="weights / checkpoint / run directory of a model with a decoder "
                                                  "(MAE)")
    rc.add_argument("--image", required=True, help="input image file")
    rc.add_argument("--out", required=True, help="output PNG file (the panel)")
    rc.add_argument("--mask-ratio", type=flag_type(float, min=0.0, lt=1.0), default=0.75,
                    help="fraction of the patches removed (default 0.75)")
    rc.add_argument("--seed", type=flag_type(int, min=0), default=0, help="seed of the random mask (default 0)")
    rc.add_argument("--device", default="cpu", help="cpu or cuda")


    add_eval_parser(sub)

    bn = sub.add_parser("bench", help="train and evaluate every method at equal budget on a dataset (CIFAR-10)",
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        description="Train MAGE, MAGE-C, MAE, MR-MAE and UMD on CIFAR-10 (JPEG) through their "
                                    "*-cifar10-cpu presets, at the same encoder size (6 x 192) and the same number of "
                                    "images seen, then evaluate each by kNN, linear probe and 1/5/10-shot on the test "
                                    "split, FD-lite0 of samples for the generative ones, beside raw pixels, the "
                                    "tokenizer's latent (and its reconstructions' FD-lite0, MAGE's floor) and each "
                                    "architecture untrained. Writes OUT/results/NAME.json (one per method and "
                                    "baseline), OUT/bench.md and OUT/plots/*.png. Resumable: run the same command "
                                    "again after an interruption; finished parts are not redone.",
                        epilog="examples:\n"
                               "  maskgen bench cifar10 --quick --out runs/bench-quick      # tiny models, minutes\n"
                               "  maskgen bench cifar10 --budget-hours 1                    # ~1 h of training per method\n"
                               "  maskgen bench cifar10 --methods mage,mae --images 400000\n"
                               "  maskgen bench cifar10 --out runs/bench-cifar10 --publish BENCHMARKS.md")
    bn.add_argument("dataset", choices=("cifar10",), help="the benchmark's dataset")
    bn.add_argument("--methods", default=",".join(BENCH_METHODS), type=_bench_methods,
                    help=f"comma-separated, from {','.join(BENCH_METHODS)} (default: all)")
    bn.add_argument("--budget-hours", type=flag_type(float, gt=0.0), default=1.0,
                    help="training time of the slowest method on this machine: images seen per method = budget x "
                         "its measured speed (default 1.0)")
    bn.add_argument("--images", type=flag_type(int, min=1),
                    help="images seen per method, instead of deriving them from --budget-hours")
    bn.add_argument("--quick", action="store_true",
                    help="tiny presets, a few hundred images and a small evaluation: minutes (what the tests run)")
    bn.add_argument("--out", default="runs/bench-cifar10", help="output folder (default runs/bench-cifar10)")
    bn.add_argument("--publish", metavar="MARKDOWN",
                    help="then copy the JSON files and plots to benchmarks/results/bench_cifar10/ beside MARKDOWN and "
                         "replace its rendered block (between the 'bench cifar10' markers) with the table")
    bn.add_argument("--device", default="cpu", help="cpu or cuda")

    dm = sub.add_parser("demo", help="end-to-end demo: tokenizer + MAGE on the embedded MNIST digits (~8 min on 2 CPU cores)",
                        description="Train a small VQGAN tokenizer and a small MAGE from scratch on the embedded "
                                    "MNIST digits (mnist5k), then generate digits, inpaint test digits, run a "
                                    "linear probe and write RUN_DIR/report.md with the images, the probe accuracy "
                                    "and the loss curves. About 8 minutes on 2 CPU cores. Run it again with the "
                                    "same --run-dir to resume an interrupted demo.",
                        epilog="presets: tokenizer-demo, mage-demo (`maskgen config show mage-demo`)")
    dm.add_argument("--run-dir", default="runs/demo", help="output directory (default runs/demo)")
    dm.add_argument("--max-steps", type=flag_type(int, min=0), default=0,
                    help="cap each training run at N steps: a smoke test (the images are then noise); 0: full demo")
    dm.add_argument("--num-images", type=flag_type(int, min=1), default=64, help="digits to generate (default 64)")
    dm.add_argument("--device", default="cpu", help="cpu or cuda")
    return p


def _bench_methods(text: str) -> list[str]:
    try:
        return parse_methods(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _sampling_args(p: argparse.ArgumentParser) -> None:
    """--seed, --device and one flag per option of every registered sampler (`sampler_options_from_args`)."""

    p.add_argument("--seed", type=flag_type(int, min=0), default=0,
                   help="image i depends only on (seed, i) (default 0)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    add_sampler_arguments(p)


def run(args: argparse.Namespace) -> int:
    if getattr(args, "device", None) is not None:
        check_device(args.device)
    if args.command == "train":
        overrides = [*args.overrides, *([f"train.init_from={args.init_from}"] if args.init_from else [])]
        api.train(args.method, args.config, overrides, run_dir=args.run_dir, resume=args.resume)
    elif args.command == "config":
        if args.config_command == "list":
            for name in api.list_presets():
                print(f"{name:24s} {api.read_preset(name).get('method', '?')}")
        else:
            print(api.show_config(args.preset, args.overrides), end="")
    elif args.command == "cache-tokens":
        out = cache_tokens(args.tokenizer, args.data, args.out, image_size=args.image_size, views=args.views,
                           split=args.split, crop_scale=tuple(args.crop_scale), batch_size=args.batch_size,
                           seed=args.seed, device=args.device, memory_format=args.memory_format)
        print(f"wrote {out}")
    elif args.command == "cache-teacher":
        out = cache_teacher(args.teacher, args.data, args.out, image_size=args.image_size, views=args.views,
                            teacher_image_size=args.teacher_image_size, split=args.split,
                            crop_scale=tuple(args.crop_scale), batch_size=args.batch_size, seed=args.seed,
                            device=args.device)
        print(f"wrote {out}")
    elif args.command == "generate":
        out = generate_images(args.ckpt, args.out, args.num_images, args.seed, args.batch_size, args.device,
                              weights=args.weights, **sampler_options_from_args(args))
        print(f"wrote {args.num_images} images to {out}")
    elif args.command == "edit":
        out = edit_image(args.kind, args.ckpt, args.image, args.out, box=args.box, mask=args.mask, pad=args.pad,
                         seed=args.seed, dilate=args.dilate, device=args.device, **sampler_options_from_args(args))
        print(f"wrote {out}")
    elif args.command == "features":
        out = extract_features(args.ckpt, args.data, args.out, args.split, args.pool, image_size=args.image_size,
                               batch_size=args.batch_size, limit=args.limit, device=args.device, layer=args.layer,
                               t=args.t)
        print(f"wrote {out}")
    elif args.command == "convert":
        options = {"norm_pix_loss": args.target == "norm-pix"} if args.convert_command == "mae" else {}
        out = api.convert(args.convert_command, args.src, args.out, **options)
        print(f"wrote {out}")
    elif args.command == "reconstruct":
        out = api.reconstruct_image(args.ckpt, args.image, args.out, args.mask_ratio, args.seed, args.device)
        print(f"wrote {out}")
    elif args.command == "demo":
        run_demo(args.run_dir, args.max_steps, args.num_images, args.device)
    elif args.command == "eval":
        return run_eval(args)
    elif args.command == "bench":
        out = run_bench(args.out, args.methods, args.budget_hours, args.quick, args.images, args.device)
        print(f"wrote {out}")
        if args.publish:
            print(f"updated {publish(args.out, args.publish)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command line's error boundary: expected failures (`MaskgenError`, and OS errors such as a full disk, a
    read-only folder or a missing file) print one line and return their exit code (2: usage, 1: the run failed);
    `--debug` anywhere on the line, or MASKGEN_DEBUG=1, shows the traceback instead."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("MASKGEN_DEBUG", "").lower() in ("1", "true", "yes")
    argv = [a for a in argv if a != "--debug"]
    try:
        return _main(argv)
    except KeyboardInterrupt:
        print("maskgen: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        failure = expected_failure(e)
        if failure is None or debug:
            raise
        message, code = failure
        print(f"maskgen: error: {message}", file=sys.stderr)
        return code


def expected_failure(e: BaseException) -> tuple[str, int] | None:
    """(one-line message, exit code) of a failure that is not a bug of maskgen, else None."""
    if isinstance(e, MaskgenError):
        return str(e), e.exit_code
    if isinstance(e, OSError) and e.errno in EXPECTED_ERRNOS:
        return os_error_message(e), 1
    if is_disk_full(e):
        return disk_full_message(e), 1
    return None


def _main(argv: list[str] | None) -> int:
    parser = build_parser()  # loads the plugins: a broken one is a UserError
    # overrides may come before or after options: `train tokenizer key=v --config X key2=v2`
    args, extra = parser.parse_known_args(argv)
    unknown = [e for e in extra if "=" not in e or e.startswith("-") or not hasattr(args, "overrides")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    if args.command is None:
        parser.print_help()
        return 2
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
