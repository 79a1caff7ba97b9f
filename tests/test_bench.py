"""`maskgen bench cifar10`: the quick run end to end (results, table, plots, resume), and its parts on their own."""
from __future__ import annotations

import json
import re
import time

import pytest
from PIL import Image

from maskgen.bench import cifar10
from maskgen.bench.cifar10 import Bench, training_summary
from maskgen.bench.plan import METHODS, QUICK, images_for_budget, parse_methods
from maskgen.bench.record import Record
from maskgen.bench.report import BEGIN, END, markdown, publish
from maskgen.cli import main
from maskgen.errors import UserError

from conftest import run_cli


@pytest.fixture(scope="module")
def quick_bench(tmp_path_factory):
    """One `maskgen bench cifar10 --quick` over every method (about two minutes on 2 cores)."""
    out = tmp_path_factory.mktemp("bench") / "b"
    start = time.perf_counter()
    assert main(["bench", "cifar10", "--quick", "--out", str(out)]) == 0
    return out, time.perf_counter() - start


def _results(out):
    return {p.stem: json.loads(p.read_text()) for p in (out / "results").glob("*.json")}


def _md_rows(md: str) -> dict[str, list[str]]:
    rows = {}
    for line in md.splitlines():
        if line.startswith("| ") and not line.startswith("| features") and not line.startswith("| ---"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0].strip("*")] = cells
    return rows


@pytest.mark.slow
def test_quick_bench_trains_every_method_at_equal_images_with_baselines(quick_bench):
    out, _ = quick_bench
    res = _results(out)
    assert {*METHODS, "pixels", "tokenizer", "untrained-mage", "untrained-mae", "untrained-umd", "plan"} <= set(res)
    images = res["plan"]["stages"]["images"]["images"]
    assert images == QUICK.images
    for name, spec in METHODS.items():
        st = res[name]["stages"]
        # the same images seen by every method (MAGE-C: two views per image, half the steps)
        assert st["training"]["images"] == images, name
        assert st["training"]["steps"] * res[name]["images_per_step"] == images
        points = [st[f"checkpoint {k}/{QUICK.curve_points}"] for k in range(1, QUICK.curve_points + 1)]
        assert [p["images"] for p in points] == [images // 2, images]
        ev = st["eval"]
        assert ev["num_train"] == QUICK.eval_train_limit and ev["num_test"] == QUICK.eval_test_limit
        assert set(ev["fewshot"]) == {"1", "5", "10"} and 0 <= ev["knn"] <= 100 and 0 <= ev["probe"] <= 100
        assert ev["pool"] == ("mean" if spec.method == "mage" else "cls")
        # generative methods have FD-lite0 of their samples; MAE and MR-MAE a reconstruction panel
        assert ("samples" in st) == (spec.method in ("mage", "umd")), name
        assert ("reconstructions" in st) == (spec.method in ("mae", "mrmae")), name
    assert res["mage-c"]["images_per_step"] == 2 * res["mage"]["images_per_step"]
    assert res["tokenizer"]["stages"]["reconstruction FD"]["fd_lite0"] > 0
    assert res["tokenizer"]["stages"]["reconstruction FD"]["psnr"] > 10
    # the trained runs are ordinary `maskgen train` runs
    assert (out / "mage" / "config.yaml").is_file() and (out / "umd" / "metrics.jsonl").is_file()


@pytest.mark.slow
def test_quick_bench_table_is_read_from_the_json_and_plots_exist(quick_bench):
    out, _ = quick_bench
    res = _results(out)
    md = (out / "bench.md").read_text()
    rows = _md_rows(md)
    for name in [*METHODS, "pixels", "tokenizer", "untrained-mae"]:
        ev = res[name]["stages"]["eval"]
        cells = rows[res[name]["label"]]
        assert cells[5] == f"{ev['knn']:.1f}" and cells[6] == f"{ev['probe']:.1f}", name
        assert cells[9].startswith(f"{ev['fewshot']['10']['mean']:.1f} ±"), name
    assert rows["MAGE"][10] == f"{res['mage']['stages']['samples']['fd_lite0']:.1f}"
    assert rows["MAGE"][1] == f"{res['mage']['stages']['training']['images']:,}"
    for png in ("probe_vs_images", "loss_curves", "mage_samples", "umd_samples", "mae_reconstructions"):
        path = out / "plots" / f"{png}.png"
        assert Image.open(path).size[0] > 100, png
        assert f"(plots/{png}.png)" in md
    assert "maskgen train mage --config mage-tiny" in md


@pytest.mark.slow
def test_quick_bench_resumes_and_redoes_only_what_is_missing(quick_bench):
    out, _ = quick_bench
    before = {p.name: p.read_text() for p in (out / "results").glob("*.json") if p.name != "plan.json"}
    # a second call redoes nothing
    start = time.perf_counter()
    assert main(["bench", "cifar10", "--quick", "--out", str(out)]) == 0
    assert time.perf_counter() - start < 30
    assert {p.name: p.read_text() for p in (out / "results").glob("*.json") if p.name != "plan.json"} == before
    # a stage that is missing (an interrupted run) is redone, to the same numbers, and nothing else is
    mae = json.loads(before["mae.json"])
    del mae["stages"]["eval"]
    (out / "results" / "mae.json").write_text(json.dumps(mae))
    assert main(["bench", "cifar10", "--quick", "--out", str(out), "--methods", "mae"]) == 0
    after = json.loads((out / "results" / "mae.json").read_text())
    old = json.loads(before["mae.json"])["stages"]["eval"]
    assert {k: v for k, v in after["stages"]["eval"].items() if k != "seconds"} == \
        {k: v for k, v in old.items() if k != "seconds"}
    assert (out / "results" / "mage.json").read_text() == before["mage.json"]


@pytest.mark.slow
def test_a_folder_planned_otherwise_is_refused_in_one_line(quick_bench):
    out, _ = quick_bench
    proc = run_cli("bench", "cifar10", "--out", out, "--budget-hours", "2")
    assert proc.returncode == 2 and "planned with --quick" in proc.stderr and "Traceback" not in proc.stderr


def test_bad_bench_arguments_are_one_line_errors(tmp_path):
    for args, needle in ((["--methods", "mage,dino"], "unknown method(s) dino"),
                         (["--budget-hours", "0"], "--budget-hours"), (["--images", "-3"], "--images")):
        proc = run_cli("bench", "cifar10", "--out", tmp_path / "b", *args)
        assert proc.returncode == 2 and needle in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "b").exists()


def test_methods_are_parsed_into_the_table_order():
    assert parse_methods("umd, MAE,mage") == ["mage", "mae", "umd"]
    with pytest.raises(ValueError, match="choose from mage, mage-c, mae, mrmae, umd"):
        parse_methods("mage,pixels")
    with pytest.raises(ValueError):
        parse_methods(" , ")


def test_budget_gives_the_slowest_method_the_whole_budget():
    # 1 h at 125 img/s (the slowest) = 450,000 images; the faster method finishes in 30 min
    assert images_for_budget(1.0, {"mage": 250.0, "umd": 125.0}) == 450_000
    assert images_for_budget(0.5, {"mae": 193.4}) == 348_000  # 348,120 rounded down to 1,000s
    assert images_for_budget(1e-6, {"mae": 1.0}) == 1000


def test_record_keeps_finished_stages_and_runs_missing_ones(tmp_path):
    calls = []
    rec = Record(tmp_path / "m.json", "m", kind="method")
    assert rec.stage("a", lambda: calls.append("a") or {"x": 1})["x"] == 1
    again = Record(tmp_path / "m.json", "m", kind="method")
    assert again.stage("a", lambda: calls.append("a2") or {"x": 2})["x"] == 1
    again.stage("b", lambda: calls.append("b") or {"y": 3})
    assert calls == ["a", "b"]
    assert set(json.loads((tmp_path / "m.json").read_text())["stages"]) == {"a", "b"}
    # fields of the file that this run does not set are kept (the plan's list of methods grows across calls)
    again.data["methods"] = ["mage"]
    again.save()
    third = Record(tmp_path / "m.json", "m", kind="baseline")
    assert third.data["methods"] == ["mage"] and third.data["kind"] == "baseline" and set(third.data["stages"]) == {"a", "b"}
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UserError, match="delete it"):
        Record(tmp_path / "bad.json", "bad")


def testtraining_summary_counts_time_from_the_logged_speeds(tmp_path):
    lines = [{"step": 10, "loss": 4.0, "img_per_s": 100.0}, {"step": 20, "loss": 3.0, "img_per_s": 200.0},
             {"step": 20, "loss": 2.5, "img_per_s": 160.0},  # logged again after a resume: the last one counts
             {"step": 30, "loss": 2.0, "img_per_s": 80.0}, {"step": 30, "eval": 1.0}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(l) for l in lines) + "\n")
    s = training_summary(tmp_path, batch=16, views=2)
    # 10 steps x 16 images at 100, 160 and 80 img/s
    assert s["train_seconds"] == pytest.approx(160 / 100 + 160 / 160 + 160 / 80, abs=0.05)
    assert s["steps"] == 30 and s["images"] == 30 * 16 * 2
    assert s["img_per_s_median"] == 100.0 * 2  # encoder inputs per second: two views per image
    assert s["loss_curve"] == [[10, 4.0], [20, 2.5], [30, 2.0]]


def test_a_training_stopped_by_a_signal_ends_the_bench_resumably(tmp_path, monkeypatch):
    """The trainer saves and returns when SIGINT / SIGTERM stops it: the bench must not score that checkpoint as the
    end of its segment, but stop (and continue on the next call)."""
    from maskgen.weights import CONFIG_FILE, STATE_FILE, TRAINER_FILE, WEIGHTS_FILE

    ckpt = tmp_path / "run" / "checkpoints" / "step_00000005"
    ckpt.mkdir(parents=True)
    for f in (WEIGHTS_FILE, CONFIG_FILE, STATE_FILE):
        (ckpt / f).write_text("")
    monkeypatch.setattr(cifar10.api, "train", lambda *a, **k: tmp_path / "run")
    bench = Bench(tmp_path / "out", ["mae"], QUICK, 1.0, None, "cpu", False)
    (ckpt / TRAINER_FILE).write_text(json.dumps({"step": 5, "stop_step": 10, "total_steps": 20}))
    with pytest.raises(KeyboardInterrupt):
        bench._train("mae", "mae-tiny", [], tmp_path / "run")
    (ckpt / TRAINER_FILE).write_text(json.dumps({"step": 5, "stop_step": 5, "total_steps": 20}))
    assert bench._train("mae", "mae-tiny", [], tmp_path / "run") == {"step": 5, "total_steps": 20}


def _fake_results():
    def ev(knn, probe, ten):
        return {"pool": "mean", "knn": knn, "probe": probe, "fewshot": {"10": {"mean": ten, "std": 1.0}}}

    def method(label, knn, probe, ten, fd=None):
        st = {"eval": ev(knn, probe, ten), "training": {"images": 1000, "train_seconds": 600.0,
                                                         "img_per_s_median": 2.0, "machine": "cpu X"},
              "checkpoint 1/1": {"images": 1000, "knn": knn, "probe": probe}}
        if fd is not None:
            st["samples"] = {"fd_lite0": fd}
        return {"label": label, "kind": "method", "stages": st, "command": f"maskgen train {label}"}

    return {"pixels": {"label": "pixels", "kind": "baseline", "stages": {"eval": ev(36.3, 36.9, 24.3)}},
            "mage": method("MAGE", 35.6, 45.5, 24.3, fd=100.8), "mae": method("MAE", 34.2, 48.8, 23.0),
            "umd": method("UMD", 36.2, 49.7, 25.5, fd=140.3)}


def test_markdown_names_the_winner_and_its_margins():
    results = {"plan": {"methods": ["mage", "mae", "mrmae", "umd"], "stages": {}}, **_fake_results()}
    md = markdown(results, [])
    assert "Not finished yet (the table holds what is): MR-MAE." in md
    assert "- linear probe: **UMD** 49.7, +0.9 against MAE, +12.8 against the best baseline (pixels)" in md
    assert "- kNN: **UMD** 36.2, +0.6 against MAGE, -0.1 against the best baseline (pixels)" in md
    assert "**MAGE** 100.8, UMD 140.3" in md
    rows = _md_rows(md)
    assert rows["MAE"][6] == "48.8" and rows["MAGE"][10] == "100.8" and rows["MAGE"][2] == "10.0"


def test_publish_replaces_only_the_marked_block(tmp_path):
    out = tmp_path / "out"
    (out / "results").mkdir(parents=True)
    for name, r in _fake_results().items():
        (out / "results" / f"{name}.json").write_text(json.dumps(r))
    target = tmp_path / "BENCHMARKS.md"
    target.write_text(f"# head\n\n{BEGIN}\nold table\n{END}\n\n# tail\n")
    publish(out, target)
    text = target.read_text()
    assert text.startswith("# head\n") and text.endswith("# tail\n") and "old table" not in text
    assert re.search(r"\| \*\*UMD\*\* \| 1,000 \| 10\.0 \|", text)
    assert (tmp_path / "benchmarks" / "results" / "bench_cifar10" / "umd.json").is_file()
    assert "(benchmarks/results/bench_cifar10/probe_vs_images.png)" in text
    (tmp_path / "plain.md").write_text("no markers\n")
    with pytest.raises(UserError, match="no '<!-- bench cifar10"):
        publish(out, tmp_path / "plain.md")
