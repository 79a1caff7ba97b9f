"""`maskgen eval ...`: the argparse code of the evaluation commands and what each runs.

Every command prints a table on stdout and writes its result as JSON (--json, or a default file named in the
table). Under torchrun, rank 0 does the work of the feature-based commands and the others exit at once;
`eval finetune` runs through the training engine, which is distributed.
"""
from __future__ import annotations

import argparse
import json
import os
from datetime import datetime
from pathlib import Path

from .. import api, distributed
from ..data.sources import has_split
from ..engine.optim import scaled_lr
from ..errors import UserError
from ..eval.features import PIXELS, cached_features, default_pool, load_encoder, require_labels
from ..eval.fewshot import fewshot_eval
from ..eval.fid import evaluate_fid
from ..eval.image_sets import is_checkpoint
from ..eval.knn import knn_classify
from ..eval.linear_probe import train_linear_probe, train_linear_probe_augmented
from ..eval.report import format_table, write_json
from ..methods.finetune import RESULT_FILE
from ..options import flag_type
from ..outputs import prepare_file
from ..registry import MODELS
from ..sampling import add_sampler_arguments, sampler_options_from_args
from ..weights import read_model_config, resolve_weights_dir

DATA_HELP = "image folder (class sub-folders), WebDataset shards, 'cifar10' or 'mnist5k'"


T_HELP = ("features of the images noised to diffusion step T (0..T-1) and told T + 1, for models with a noise "
          "level (UMD; the reference reads its DiT and MaskDiT baselines at 50); default: the clean images (time 0)")


def _feature_args(p: argparse.ArgumentParser, batch_default: int) -> None:
    p.add_argument("--ckpt", required=True, help="MAGE, MAE, UMD or tokenizer weights / checkpoint / run directory, or "
                                                 "'pixels': the raw pixels of --image-size images (default 32), the "
                                                 "baseline any encoder must beat")
    p.add_argument("--untrained", action="store_true",
                   help="evaluate the architecture of --ckpt at its random initialisation (seed --seed) instead of "
                        "its trained weights: what the pre-training added (a MAGE keeps its trained tokenizer)")
    p.add_argument("--data", required=True, help=f"training data: {DATA_HELP}")
    p.add_argument("--split", default="train", help="split of --data: 'cifar10', 'mnist5k' and folders with "
                                                    "train/ and test/ sub-folders have splits (default train)")
    p.add_argument("--test-data", help="evaluation data (default: --data with --test-split; required for data "
                                       "without splits)")
    p.add_argument("--test-split", help="split of the test data (default: 'test'; all of a --test-data without "
                                        "splits)")
    p.add_argument("--pool", choices=("mean", "cls"),
                   help="mean: parameter-free LayerNorm of the mean token output (MAGE official; the tokenizer: "
                        "mean latent); cls: the class token ([C0] of MAGE, [CLS] of MAE). Default: the model's "
                        "official probe pooling (MAGE mean, MAE cls)")
    p.add_argument("--layer", type=flag_type(int, min=1),
                   help="features of this encoder block (1 = the first; default: the last), pooled as --pool; "
                        "ViT encoders (MAGE, MAE) only")
    p.add_argument("--image-size", type=flag_type(int, min=8),
                   help="image side fed to the model (default: the model's)")
    p.add_argument("--t", type=flag_type(int, min=0), metavar="T", help=T_HELP)
    p.add_argument("--limit", type=flag_type(int, min=0), default=0,
                   help="a fixed random subset of N training images (0: all)")
    p.add_argument("--test-limit", type=flag_type(int, min=0), default=0,
                   help="a fixed random subset of N test images (0: all)")
    p.add_argument("--batch-size", type=flag_type(int, min=1), default=batch_default, help=f"default {batch_default}")
    p.add_argument("--feature-batch-size", type=flag_type(int, min=1), default=64,
                   help="images per forward pass (default 64)")
    p.add_argument("--feature-cache", metavar="DIR",
                   help="cache the features in DIR (safetensors, keyed by checkpoint, data, split, pool, size, limit)")
    p.add_argument("--seed", type=flag_type(int, min=0), default=0,
                   help="seed of the evaluation (and of the --untrained weights) (default 0)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--json", help="result file (default: CKPT/eval/COMMAND.json, COMMAND-untrained.json with "
                                  "--untrained, runs/eval/COMMAND-pixels.json for pixels)")


def add_eval_parser(subparsers) -> None:
    """Add `eval` and its five commands to the top-level subparsers."""

    ev = subparsers.add_parser("eval", help="evaluate: linear probe, kNN, few-shot, fine-tuning, FID",
                               description="Evaluate representations (linear-probe, knn, fewshot, finetune) or "
                                           "generated images (fid). Each prints a table and writes JSON.")
    sub = ev.add_subparsers(dest="eval_command", metavar="EVAL", required=True)

    lp = sub.add_parser("linear-probe", help="linear probe on frozen features (LARS, MAE/MAGE protocol)",
                        description="Train BatchNorm1d(affine=False) + Linear on frozen features and report "
                                    "top-1/top-5. Default (fast): features of centre crops computed once; "
                                    "--augment: RandomResizedCrop + flip views every epoch (the paper protocol).")
    _feature_args(lp, 256)
    lp.add_argument("--epochs", type=flag_type(int, min=1), default=90, help="default 90 (MAE/MAGE)")
    lp.add_argument("--optimizer", default="lars", choices=("lars", "sgd", "adamw"))
    lp.add_argument("--lr", type=flag_type(float, gt=0.0), help="absolute lr (default: blr x batch / 256)")
    lp.add_argument("--blr", type=flag_type(float, gt=0.0),
                    help="base lr (default: lars/sgd 0.1 as MAGE ViT-B, adamw 1e-3)")
    lp.add_argument("--weight-decay", type=flag_type(float, min=0.0), default=0.0)
    lp.add_argument("--warmup-epochs", type=flag_type(float, min=0.0), help="default epochs / 9 (10 of 90)")
    lp.add_argument("--augment", action="store_true", help="train on augmented views through the frozen encoder")
    lp.add_argument("--num-workers", type=flag_type(int, min=0), default=0, help="data-loading workers of --augment")

    kn = sub.add_parser("knn", help="weighted kNN on L2-normalised frozen features (k=20, T=0.07)",
                        description="Each test image takes the k most cosine-similar training images, weighted "
                                    "by exp(similarity / T), and predicts the class with the largest total weight.")
    _feature_args(kn, 64)
    kn.add_argument("--k", type=flag_type(int, min=1), default=20)
    kn.add_argument("--temperature", "-T", type=flag_type(float, gt=0.0), default=0.07)

    fs = sub.add_parser("fewshot", help="N-shot ridge regression on frozen features (UMD protocol)",
                        description="For each N of --shots and each seed: N images per class, features whitened "
                                    "by the shots' mean/std, a bias feature, +-1 targets, closed-form ridge "
                                    "(l2 1024); top-1 mean +- std over seeds.")
    _feature_args(fs, 64)
    fs.add_argument("--shots", type=flag_type(int, min=1), nargs="+", default=[1, 5, 10])
    fs.add_argument("--seeds", type=flag_type(int, min=0), nargs="+", default=[0, 1, 2])
    fs.add_argument("--l2", type=flag_type(float, min=0.0), default=1024.0, help="ridge penalty (UMD: 1024)")

    ft = sub.add_parser("finetune", help="fine-tune a MAGE or MAE encoder end to end (training method 'finetune')",
                        description="Fine-tune --ckpt on --data with layer-wise lr decay, drop path, label "
                                    "smoothing and optional mixup/cutmix/RandAugment, through the training engine "
                                    "(checkpoints, --resume auto, torchrun). The test set is evaluated at the end.",
                        epilog="Every key of the 'finetune' method can be overridden: `maskgen config show "
                               "finetune-tiny` lists them (model.layer_decay, model.drop_path, finetune.mixup, ...).")
    ft.add_argument("--ckpt", required=True, help="pre-trained MAGE or MAE weights / checkpoint / run directory")
    ft.add_argument("--data", required=True, help=f"training data: {DATA_HELP}")
    ft.add_argument("--split", default="train")
    ft.add_argument("--test-data", help="evaluation data (default: --data with --test-split for named sets)")
    ft.add_argument("--test-split", help="split of the test data (default: 'test'; all of a --test-data without "
                                         "splits)")
    ft.add_argument("--config", "-c", default="finetune-cifar10", help="preset or YAML (default finetune-cifar10; "
                                                                      "finetune-tiny for a smoke run)")
    ft.add_argument("--run-dir", help="output directory (default: runs/finetune-DATE-TIME)")
    ft.add_argument("--resume", metavar="auto|DIR", help="'auto': continue the latest checkpoint of --run-dir")
    ft.add_argument("--json", help="result file (default: RUN_DIR/eval/finetune.json)")
    ft.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.epochs=50")

    fd = sub.add_parser("fid", help="Frechet distance, IS, KID, precision/recall between two image sets",
                        description="Compare --input1 (generated) with --input2 (reference). Standard FID/IS/KID "
                                    "need the Inception weights locally (--inception-weights or torch-fidelity's "
                                    "cache; nothing is downloaded); otherwise the offline EfficientNet-Lite0 "
                                    "extractor is used and the numbers are named FD-lite0 / IS-lite0 / KD-lite0, "
                                    "which are not comparable with FID.")
    fd.add_argument("--input1", required=True, help="generated images: folder, shards, named set or a MAGE "
                                                    "checkpoint (generates --num-gen images)")
    fd.add_argument("--input2", required=True, help="reference: folder, shards, or cifar10-test, cifar10-train, "
                                                    "mnist5k-test, ... (decoded losslessly, features cached)")
    fd.add_argument("--extractor", default="auto", choices=("auto", "inception", "lite0"),
                    help="auto: inception when its weights are available locally, else lite0")
    fd.add_argument("--inception-weights", metavar="PATH", help="torch-fidelity's " 
                    "weights-inception-2015-12-05-6726825d.pth")
    fd.add_argument("--metrics", nargs="+", default=["fd", "is", "kid", "prc"], choices=("fd", "is", "kid", "prc"))
    fd.add_argument("--image-size", type=flag_type(int, min=8),
                    help="resize (shorter side) + centre crop both sets to this size "
                                                   "(default: as they are)")
    fd.add_argument("--limit", type=flag_type(int, min=0), default=0,
                    help="a fixed random subset of N images of each set (0: all)")
    fd.add_argument("--num-gen", type=flag_type(int, min=1), default=1000,
                    help="images generated from a checkpoint input")
    fd.add_argument("--seed", type=flag_type(int, min=0), default=0, help="seed of generated images")
    fd.add_argument("--batch-size", type=flag_type(int, min=1), default=64)
    fd.add_argument("--cache-dir", help="reference feature cache (default ~/.cache/maskgen/fid)")
    fd.add_argument("--device", default="cpu")
    fd.add_argument("--json", help="result file (default: INPUT1/eval/fid.json for a checkpoint, else "
                                   "runs/eval/fid-DATE-TIME.json)")
    add_sampler_arguments(fd)  # options of the sampler of a checkpoint input, e.g. --num-iter


def run_eval(args: argparse.Namespace) -> int:
    """Run the `maskgen eval` command of `args`; returns the exit code."""
    if args.eval_command == "finetune":
        return _finetune(args)
    if int(os.environ.get("RANK", "0")) != 0:  # torchrun: rank 0 evaluates, the others have nothing to do
        return 0
    if args.eval_command == "fid":
        return _fid(args)
    return _feature_eval(args)


def _test_source(args) -> tuple[str, str]:
    """(test data, split): --test-data at --test-split (all of it when it has no splits and no --test-split was
    given; sources without splits read split 'train' as all their images), else the test split of --data."""
    data, split = args.test_data or args.data, args.test_split or "test"
    if has_split(data, split) or (args.test_data and args.test_split):  # open_source refuses a missing split
        return data, split
    if args.test_data:
        return data, "train"
    raise UserError(f"--test-data is required for {args.data}: it has no {split!r} split (only 'cifar10', "
                    f"'mnist5k' and folders with train/ and test/ sub-folders have one)")


def _finish(title: str, rows: list, result: dict, json_path: str | Path) -> int:
    path = write_json(json_path, result)
    print(format_table(title, rows + [("json", str(path))]))
    return 0


def _encoder_name(args) -> str:
    name = f"{args.ckpt} untrained (seed {args.seed})" if args.untrained else str(args.ckpt)
    return f"{name}, block {args.layer}" if args.layer else name


def _default_json(args) -> Path:
    if args.ckpt == PIXELS and not Path(args.ckpt).exists():
        return Path("runs") / "eval" / f"{args.eval_command}-pixels.json"
    resolve_weights_dir(args.ckpt)  # a missing checkpoint is reported as such, before its eval/ folder is made
    return Path(args.ckpt) / "eval" / f"{args.eval_command}{'-untrained' if args.untrained else ''}.json"


def _feature_eval(args) -> int:
    test_data, test_split = _test_source(args)
    json_path = prepare_file(args.json or _default_json(args), "result file")
    model = load_encoder(args.ckpt, args.device, untrained=args.untrained, seed=args.seed, image_size=args.image_size,
                         layer=args.layer, t=args.t)
    args.pool = args.pool or default_pool(model)
    common = dict(pool=args.pool, image_size=args.image_size, batch_size=args.feature_batch_size, device=args.device)
    test_x, test_y = cached_features(args.ckpt, model, test_data, test_split, args.feature_cache,
                                     limit=args.test_limit, **common)
    require_labels(test_y, test_data)
    info = {"ckpt": str(args.ckpt), "untrained": args.untrained, "model": model.model_name, "data": args.data,
            "split": args.split, "test_data": test_data,
            "test_split": test_split if has_split(test_data, test_split) else None, "pool": args.pool,
            "layer": args.layer, "t": args.t}
    if args.eval_command == "linear-probe" and args.augment:
        r = train_linear_probe_augmented(model, args.data, args.split, test_x, test_y, **_probe_opts(args),
                                         pool=args.pool, image_size=args.image_size, limit=args.limit,
                                         num_workers=args.num_workers, device=args.device)
        return _probe_report(args, r, info, json_path, "augmented views")
    train_x, train_y = cached_features(args.ckpt, model, args.data, args.split, args.feature_cache, limit=args.limit,
                                       **common)
    require_labels(train_y, args.data)
    if args.eval_command == "linear-probe":
        r = train_linear_probe(train_x, train_y, test_x, test_y, **_probe_opts(args))
        return _probe_report(args, r, info, json_path, "centre-crop features")
    if args.eval_command == "knn":
        r = knn_classify(train_x, train_y, test_x, test_y, k=args.k, T=args.temperature)
        rows = [("top1 (%)", r["top1"]), ("top5 (%)", r["top5"]), ("k / T", f"{r['k']} / {r['T']}"),
                ("train / test images", f"{r['num_train']} / {r['num_test']}")]
        return _finish(f"kNN of {_encoder_name(args)} ({args.pool} pool) on {args.data}", rows, {**info, **r}, json_path)

    r = fewshot_eval(train_x, train_y, test_x, test_y, shots=args.shots, seeds=args.seeds, l2=args.l2)
    rows = [(f"{n}-shot top1 (%)", f"{v['mean']:.2f} +- {v['std']:.2f}") for n, v in r["results"].items()]
    rows += [("seeds / l2", f"{len(r['seeds'])} / {r['l2']:g}"), ("test images", len(test_y))]
    return _finish(f"few-shot ridge of {_encoder_name(args)} ({args.pool} pool) on {args.data}", rows, {**info, **r}, json_path)


def _probe_opts(args) -> dict:
    lr = args.lr if args.lr is not None or args.blr is None else scaled_lr(args.blr, args.batch_size)
    return dict(epochs=args.epochs, batch_size=args.batch_size, lr=lr, optimizer=args.optimizer,
                weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs, seed=args.seed)


def _probe_report(args, r: dict, info: dict, json_path, path_name: str) -> int:
    rows = [("top1 (%)", r["top1"]), ("top5 (%)", r["top5"]), ("train loss", r["train_loss"]),
            ("epochs / batch / lr", f"{r['epochs']} / {r['batch_size']} / {r['lr']:.4g} ({r['optimizer']})"),
            ("train / test images", f"{r['num_train']} / {r['num_test']}"),
            ("classes / dim", f"{r['num_classes']} / {r['dim']}"), ("path", path_name)]
    return _finish(f"linear probe of {_encoder_name(args)} ({args.pool} pool) on {args.data}", rows,
                   {**info, "augment": args.augment, **r}, json_path)


def _finetune(args) -> int:
    test_data, test_split = _test_source(args)
    if args.json:
        prepare_file(args.json, "result file")
    meta = read_model_config(resolve_weights_dir(args.ckpt))
    if not callable(getattr(MODELS.get(str(meta.get("model"))), "as_classifier", None)):
        raise UserError(f"{args.ckpt} holds a '{meta.get('model')}' model: fine-tuning needs a pre-trained encoder "
                        f"(MAGE, MAE)")
    overrides = [f"model.pretrained={args.ckpt}", f"data.path={args.data}", f"data.split={args.split}",
                 f"data.image_size={meta['config']['image_size']}", f"finetune.eval_data={test_data}",
                 f"finetune.eval_split={test_split}", *args.overrides]
    run_dir = api.train("finetune", args.config, overrides, run_dir=args.run_dir, resume=args.resume)
    if distributed.env_world()[0] != 0:
        return 0
    result_file = run_dir / RESULT_FILE
    if not result_file.is_file():  # stopped by a signal before the final evaluation
        print(f"fine-tuning stopped before its evaluation; resume with --resume auto --run-dir {run_dir}")
        return 0
    r = json.loads(result_file.read_text())
    if args.json:
        write_json(args.json, r)

    print(format_table(f"fine-tuning of {args.ckpt} on {args.data}", [
        ("top1 (%)", r["top1"]), ("top5 (%)", r["top5"]), ("steps", r["step"]),
        ("eval images", f"{r['num_eval']} ({r['eval_data']}:{r['eval_split']})"), ("run dir", str(run_dir)),
        ("json", str(args.json or result_file))]))
    return 0


def _fid(args) -> int:
    default = (Path(args.input1) / "eval" / "fid.json" if is_checkpoint(args.input1) else
               Path("runs") / "eval" / f"fid-{datetime.now().strftime('%Y%m%d-%H%M%S')}.json")
    json_path = prepare_file(args.json or default, "result file")
    r = evaluate_fid(args.input1, args.input2, extractor=args.extractor, inception_weights=args.inception_weights,
                     metrics=args.metrics, image_size=args.image_size, limit=args.limit, num_gen=args.num_gen,
                     seed=args.seed, batch_size=args.batch_size, cache_dir=args.cache_dir, device=args.device,
                     sampler_options=sampler_options_from_args(args))
    names = {"inception": "Inception-V3 (standard FID)", "lite0": "EfficientNet-Lite0 (FD-lite0, not FID)"}
    rows = [(k, v) for k, v in r.items() if isinstance(v, float)]
    rows += [("extractor", names[r["extractor"]]), ("images", f"{r['num1']} vs {r['num2']}")]
    return _finish(f"{args.input1} vs {args.input2}", rows, r, json_path)
