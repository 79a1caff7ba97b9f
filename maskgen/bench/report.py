"""The benchmark's table and plots, rendered from its JSON files alone (OUT/results/*.json): no number is typed.

`render(OUT)` writes OUT/bench.md and OUT/plots/*.png; `publish(OUT, MARKDOWN)` copies the JSON files and plots
beside MARKDOWN (benchmarks/results/bench_cifar10/) and replaces the block between the BEGIN / END markers in it.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..errors import UserError
from ..generation import grid_path
from ..outputs import atomic_write, prepare_dir
from ..plots import line_charts
from .plan import METHODS

BEGIN, END = "<!-- bench cifar10: begin (rendered by maskgen bench) -->", "<!-- bench cifar10: end -->"
ASSETS = Path("benchmarks") / "results" / "bench_cifar10"
SCORES = (("knn", "kNN"), ("probe", "linear probe"))


ORDER = ["plan", "pixels", "tokenizer", *(f"untrained-{a}" for a in dict.fromkeys(s.arch for s in METHODS.values())),
         *METHODS]


def load_results(out: Path) -> dict[str, dict]:
    """{name: result} of OUT/results/*.json in the table's order (baselines, then methods; unknown names last)."""
    found = {p.stem: p for p in (out / "results").glob("*.json")}
    names = [n for n in ORDER if n in found] + sorted(set(found) - set(ORDER))
    return {n: json.loads(found[n].read_text()) for n in names}


def _num(v, fmt: str) -> str:
    return "" if v is None else format(v, fmt)


def _shots(ev: dict, n: str) -> str:
    r = (ev.get("fewshot") or {}).get(n)
    return "" if r is None else f"{r['mean']:.1f} ± {r['std']:.1f}"


def _rows(results: dict[str, dict]) -> list[dict]:
    """One row per finished evaluation: baselines first (pixels, tokenizer, untrained architectures), then methods in
    the table's order."""
    rows = []
    for name, r in results.items():
        ev = r.get("stages", {}).get("eval")
        if ev is None:
            continue
        st = r["stages"]
        train = st.get("training", {})
        fd = st.get("samples", st.get("reconstruction FD", {}))
        rows.append({"name": name, "label": r.get("label", name), "kind": r.get("kind"), "eval": ev,
                     "images": train.get("images"), "minutes": train.get("train_seconds", 0) / 60 if train else None,
                     "speed": train.get("img_per_s_median"), "fd": fd.get("fd_lite0"),
                     "fd_kind": "samples" if "samples" in st else "reconstructions" if fd else None})
    return rows


def _table(rows: list[dict]) -> list[str]:
    lines = ["| features (CIFAR-10 test) | images seen | train min | img/s | pool | kNN | linear probe | 1-shot | "
             "5-shot | 10-shot | FD-lite0 |", "|" + " --- |" * 11]
    for r in rows:
        ev = r["eval"]
        label = f"**{r['label']}**" if r["kind"] == "method" else r["label"]
        fd = _num(r["fd"], ".1f") + (" (recon.)" if r["fd_kind"] == "reconstructions" else "")
        minutes = _num(r["minutes"], ".1f" if (r["minutes"] or 0) >= 1 else ".2f")
        cells = [label, _num(r["images"], ","), minutes, _num(r["speed"], ".0f"), ev.get("pool", ""),
                 _num(ev.get("knn"), ".1f"), _num(ev.get("probe"), ".1f"), *(_shots(ev, n) for n in ("1", "5", "10")), fd]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _winners(rows: list[dict]) -> list[str]:
    """Per score: the best method, its margin over the next method and over the best baseline."""
    methods = [r for r in rows if r["kind"] == "method"]
    baselines = [r for r in rows if r["kind"] != "method"]
    scores = [*SCORES, ("10", "10-shot")]
    lines = []
    for key, name in scores:
        def value(r):
            ev = r["eval"]
            return (ev.get("fewshot") or {}).get(key, {}).get("mean") if key.isdigit() else ev.get(key)
        ranked = sorted((r for r in methods if value(r) is not None), key=value, reverse=True)
        if not ranked:
            continue
        best = ranked[0]
        text = f"- {name}: **{best['label']}** {value(best):.1f}"
        if len(ranked) > 1:
            text += f", {value(best) - value(ranked[1]):+.1f} against {ranked[1]['label']}"
        base = max((r for r in baselines if value(r) is not None), key=value, default=None)
        if base is not None:
            text += f", {value(best) - value(base):+.1f} against the best baseline ({base['label']})"
        lines.append(text)
    gen = sorted((r for r in methods if r["fd"] is not None), key=lambda r: r["fd"])
    if gen:
        text = f"- FD-lite0 of samples (lower is better): **{gen[0]['label']}** {gen[0]['fd']:.1f}"
        text += "".join(f", {r['label']} {r['fd']:.1f}" for r in gen[1:])
        floor = next((r for r in rows if r["fd_kind"] == "reconstructions"), None)
        if floor is not None:
            text += f"; the tokenizer's reconstructions (MAGE's floor) {floor['fd']:.1f}"
        lines.append(text)
    return lines


def plot(out: Path, results: dict[str, dict]) -> list[Path]:
    """probe / kNN against images seen (the checkpoints along the way), the loss curves, and a copy of each sample
    grid, into OUT/plots; returns the files."""
    plots = prepare_dir(out / "plots", "plots folder")
    made = []
    curves = {name: [v for k, v in r["stages"].items() if k.startswith("checkpoint ")] for name, r in results.items()
              if r.get("kind") == "method"}
    curves = {METHODS[n].label if n in METHODS else n: pts for n, pts in curves.items() if pts}
    if curves:
        panels = {f"{title} top-1 (%), checkpoints along the way": {n: [(p["images"], p[key]) for p in pts]
                                                                     for n, pts in curves.items()}
                  for key, title in SCORES}
        made.append(line_charts(panels, plots / "probe_vs_images.png", "images"))
    losses = {r.get("label", n): r["stages"]["training"]["loss_curve"] for n, r in results.items()
              if r.get("stages", {}).get("training", {}).get("loss_curve")}
    if losses:
        made.append(line_charts({f"{n} training loss": {n: [tuple(p) for p in pts]} for n, pts in losses.items()},
                                plots / "loss_curves.png", "step", width=300))
    for name in results:
        grid = grid_path(out / "samples" / name)
        if grid.is_file():
            made.append(Path(shutil.copyfile(grid, plots / f"{name}_samples.png")))
    made += sorted(plots.glob("*_reconstructions.png"))
    return made


def markdown(results: dict[str, dict], images: list[Path], link: str = "plots") -> str:
    """The table, the winners, the plots (linked under `link/`) and how the numbers were made."""
    plan = results.get("plan", {})
    stages = plan.get("stages", {})
    machine, budget = stages.get("machine", {}), stages.get("images", {})
    rows = _rows(results)
    protocol = plan.get("protocol", {})
    machines = sorted({r["stages"]["training"]["machine"] for r in results.values()
                       if "training" in r.get("stages", {})} | ({machine["machine"]} if machine else set()))
    lines = ["### CIFAR-10 at equal budget (`maskgen bench cifar10`)", ""]
    if budget:
        how = (f"{budget['budget_hours']:g} h budget × the slowest method's measured speed "
               f"({', '.join(f'{k} {v:.0f}' for k, v in budget['rates_img_per_s'].items())} img/s)"
               if budget.get("from") == "budget" else "given (--images)")
        lines.append(f"Images seen per method: **{budget['images']:,}** ({how}); MAGE-C's images are views (two per "
                     f"image and step).")
    lines += [f"Machine: {m}." for m in machines]
    if machine:
        lines.append(f"Started {machine['date']}{' (--quick)' if protocol.get('quick') else ''}.")
    pending = [METHODS[m].label for m in plan.get("methods", []) if m in METHODS and
               not any(r["name"] == m for r in rows)]
    if pending:
        lines.append(f"Not finished yet (the table holds what is): {', '.join(pending)}.")
    lines += ["", *_table(rows), "", *_winners(rows), ""]
    lines.append(f"kNN k = 20, T = 0.07; linear probe SGD {protocol.get('probe_epochs')} epochs on centre-crop features;"
                 f" few-shot ridge (l2 1024), seeds {protocol.get('seeds')}; fit on "
                 f"{protocol.get('eval_train_limit') or 'all 50,000'} training images, tested on "
                 f"{protocol.get('eval_test_limit') or 'all 10,000'} test images; each model's official pooling; "
                 f"FD-lite0 of {protocol.get('fd_images')} samples against as many test images. The curves: kNN and "
                 f"probe on {protocol.get('curve_train_limit') or 'all'} training images at each checkpoint.")
    lines.append("")
    for img in images:
        lines.append(f"![{img.stem}]({link}/{img.name})")
    commands = [(r.get("label", n), r["command"]) for n, r in results.items() if r.get("command")]
    if commands:
        lines += ["", "Training commands (run by the benchmark):", "", "```bash",
                  *(f"{c}   # {label}" for label, c in commands), "```"]
    return "\n".join(lines) + "\n"


def render(out: str | Path) -> Path:
    """OUT/bench.md and OUT/plots/ from OUT/results/*.json."""
    out = Path(out)
    results = load_results(out)
    md = out / "bench.md"
    with atomic_write(md) as tmp:
        tmp.write_text(markdown(results, plot(out, results)))
    return md


def publish(out: str | Path, target: str | Path) -> Path:
    """Copy OUT's JSON files and plots to benchmarks/results/bench_cifar10/ beside `target` (BENCHMARKS.md) and
    replace the block between its BEGIN / END markers with the rendered table."""
    out, target = Path(out), Path(target)
    if not target.is_file():
        raise UserError(f"--publish: no such file: {target}")
    text = target.read_text()
    if BEGIN not in text or END not in text:
        raise UserError(f"--publish: {target} has no '{BEGIN}' ... '{END}' block to replace")
    assets = prepare_dir(target.parent / ASSETS, "results folder")
    results = load_results(out)
    for p in (out / "results").glob("*.json"):
        shutil.copyfile(p, assets / p.name)
    images = [Path(shutil.copyfile(p, assets / p.name)) for p in plot(out, results)]
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    with atomic_write(target) as tmp:
        tmp.write_text(f"{head}{BEGIN}\n{markdown(results, images, ASSETS.as_posix())}{END}{tail}")
    return target
