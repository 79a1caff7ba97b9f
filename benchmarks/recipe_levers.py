"""One lever at a time: train a method's CPU preset for a short budget with one change each, and score every run
by the benchmark's checkpoint protocol (kNN and linear probe fitted on 10,000 CIFAR-10 training images, tested on
all 10,000 test images; --eval-train / --eval-test change that). Each run is an ordinary `maskgen train` run under OUT/NAME; results go to OUT/levers.json
stage by stage (resumable: finished levers are not redone) and, at the end, to --json.

    python benchmarks/recipe_levers.py --method mae --preset mae-cifar10-cpu --images 100000 --out runs/levers/mae \\
        --lever base= --lever mask0.5=mae.mask_ratio=0.5 --lever pixels=model.norm_pix_loss=false \\
        --json benchmarks/results/levers_mae.json

A lever is NAME=OVERRIDES (space-separated key=value; empty: the preset as it is). `--pools cls mean` also scores
each run with the other pooling.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import print_table, report  # noqa: E402

from maskgen import api  # noqa: E402
from maskgen.bench.cifar10 import epochs_override, training_summary  # noqa: E402
from maskgen.bench.measure import feature_scores  # noqa: E402
from maskgen.bench.record import Record  # noqa: E402
from maskgen.eval.features import load_encoder  # noqa: E402


def parse_lever(text: str) -> tuple[str, list[str]]:
    name, _, overrides = text.partition("=")
    if not name:
        raise argparse.ArgumentTypeError(f"a lever is NAME=OVERRIDES, got {text!r}")
    return name, overrides.split()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", required=True)
    ap.add_argument("--preset", required=True)
    ap.add_argument("--images", type=int, default=100_000, help="images seen per run (encoder inputs)")
    ap.add_argument("--views", type=int, default=1, help="encoder inputs per image and step (MAGE-C: 2)")
    ap.add_argument("--lever", type=parse_lever, action="append", required=True, metavar="NAME=OVERRIDES")
    ap.add_argument("--common", default="", help="overrides of every run, e.g. 'mage.tokenizer=DIR'")
    ap.add_argument("--pools", nargs="+", default=[], choices=("cls", "mean"),
                    help="score with these poolings (default: the model's official one)")
    ap.add_argument("--eval-train", type=int, default=10_000, help="training images the scores fit on (default 10,000)")
    ap.add_argument("--eval-test", type=int, default=0, help="test images scored (default 0: all 10,000)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--json", help="write the table here too (e.g. benchmarks/results/levers_NAME.json)")
    args = ap.parse_args()

    rec = Record(args.out / "levers.json", "levers", method=args.method, preset=args.preset, images=args.images)
    rows = []
    for name, overrides in args.lever:
        run_dir = args.out / name
        o = [*args.common.split(), "vis.every=0", "train.keep_last=1", *overrides]
        cfg = api.build_config(args.method, args.preset, o)  # the batch size does not depend on the epochs
        o.append(epochs_override(args.images, cfg, args.views))

        def run():
            api.train(args.method, args.preset, o, run_dir=run_dir, resume="auto")
            summary = training_summary(run_dir, cfg.train.batch_size, args.views)
            model = load_encoder(run_dir)
            scores = {}
            for pool in args.pools or [None]:
                if pool is not None:
                    model.default_pool = pool
                scores[pool or "official"] = feature_scores(model, train_limit=args.eval_train,
                                                              test_limit=args.eval_test, probe_epochs=100)
            command = f"maskgen train {args.method} --config {args.preset} --run-dir {run_dir} {' '.join(o)}"
            return {"overrides": overrides, "command": command, "scores": scores,
                    **{k: summary[k] for k in ("steps", "images", "train_seconds", "img_per_s_median", "final_loss",
                                               "machine")}}

        r = rec.stage(name, run)
        for pool, s in r["scores"].items():
            rows.append({"lever": name, "overrides": " ".join(r["overrides"]) or "(preset)", "pool": s["pool"],
                         "kNN": s["knn"], "probe": s["probe"], "img/s": r["img_per_s_median"],
                         "train min": r["train_seconds"] / 60, "final loss": r["final_loss"]})
    print_table(rows, f"{args.method} ({args.preset}), {args.images:,} images per run; kNN / probe fitted on "
                      f"{args.eval_train or 'all'} training images, tested on {args.eval_test or 'all'} test images")
    if args.json:
        report(args.json, rows, " ".join(sys.argv), extra={"runs": rec.data["stages"]})


if __name__ == "__main__":
    main()
