"""Hundreds of invalid invocations, run in-process: each ends in one line on stderr and the right exit code, never a
traceback. The cases are generated from the option declarations and the argument parser, so a new config key or
flag is fuzzed without being listed here."""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import time
import typing

import pytest

from maskgen.cli import build_parser, main
from maskgen.config import section_classes
from maskgen.registry import METHODS

PRESETS = {"tokenizer": "tokenizer-tiny", "mage": "mage-tiny", "finetune": "finetune-cifar10"}
BAD_FLAG_VALUES = ("nan", "inf", "-inf", "abc", "-5", "1e999")


def invoke(argv: list[str]) -> tuple[int, str]:
    """(exit code, stderr) of `maskgen ARGV` in this process; an escaping exception fails the test."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as e:  # argparse usage errors
            code = e.code
    return code, err.getvalue()


def bad_values(f: dataclasses.Field, tp) -> list[str]:
    """Values of a config field that its declaration must refuse."""
    tp = next((a for a in typing.get_args(tp) if a is not type(None)), tp)  # Optional[X] -> X
    m = f.metadata
    out: list[str] = []
    if tp is float:
        out += ["nan", "inf", "-inf", "abc"]
    elif tp is int:
        out += ["1.5", "abc", "99999999999999999999999"]
    elif tp is bool:
        out += ["maybe"]
    elif tp is dict:
        out += ["{", "[1, 2]"]
    elif typing.get_origin(tp) is list:
        out += ["[nan, 1]", "[inf]"] if typing.get_args(tp)[0] is float else []
    elif tp is str and m.get("choices"):
        out += ["bogus"]
    for bound, delta in (("min", -1), ("gt", 0), ("max", 1), ("lt", 0)):
        if m.get(bound) is not None and tp in (int, float):
            out.append(str(tp(m[bound] + delta)))
    return out


def config_cases() -> list[list[str]]:
    cases = []
    for method, preset in PRESETS.items():
        cls = METHODS.get(method)
        for section, options in section_classes(cls).items():
            hints = typing.get_type_hints(options)
            for f in dataclasses.fields(options):
                for value in bad_values(f, hints[f.name]):
                    cases.append(["train", method, "--config", preset, "--run-dir", "/nonexistent/never-written",
                                  f"{section}.{f.name}={value}"])
    return cases


def typed_flags(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(subcommand path, flag) for every option with a `type` in every subcommand."""
    for action in parser._actions:  # noqa: SLF001 (argparse has no public accessor)
        if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
            for name, sub in action.choices.items():
                yield from typed_flags(sub, (*path, name))
        elif action.option_strings and action.type is not None:
            yield path, action.option_strings[-1]


def test_every_invalid_config_value_is_a_one_line_usage_error():
    cases = config_cases()
    assert len(cases) > 250  # every section of three methods
    t0 = time.perf_counter()
    for argv in cases:
        code, err = invoke(argv)
        assert code == 2 and "Traceback" not in err, (argv, code, err[-500:])
        assert err.count("\n") == 1 and argv[-1].split("=")[0] in err, (argv, err)
    assert time.perf_counter() - t0 < 60


def test_every_invalid_flag_value_is_a_usage_error_naming_the_flag():
    flags = list(typed_flags(build_parser()))
    assert {"--num-images", "--temperature", "--num-iter", "--dilate", "--seed", "--k"} <= {f for _, f in flags}
    n = 0
    for path, flag in flags:
        for value in BAD_FLAG_VALUES:
            code, err = invoke([*path, flag, value])
            assert code == 2 and "Traceback" not in err, (path, flag, value, err[-500:])
            assert f"argument {flag}" in err or flag in err, (path, flag, value, err)
            n += 1
    assert n > 200


@pytest.mark.parametrize("argv, message", [
    (["generate", "--ckpt", "/nonexistent", "--out", "{out}", "--num-images", "0"], "--num-images"),
    (["edit", "inpaint", "--ckpt", "{mage}", "--image", "{image}", "--box", "nan,0,10,10", "--out", "{out}/o.png"],
     "--box"),
    (["edit", "inpaint", "--ckpt", "{mage}", "--image", "{text}", "--box", "0,0,8,8", "--out", "{out}/o.png"],
     "cannot read image"),
    (["generate", "--ckpt", "{mage}", "--out", "{file}", "--num-images", "1"], "is a file"),
    (["generate", "--ckpt", "{mage}", "--out", "{out}", "--num-images", "1", "--device", "cuda:7"], "cuda:7"),
    (["generate", "--ckpt", "{mage}", "--out", "{out}", "--num-images", "1", "--device", "toaster"], "toaster"),
    (["features", "--ckpt", "{tok}", "--data", "mnist5k", "--out", "{file}/x.safetensors"], "is a file"),
    (["generate", "--ckpt", "{tok}", "--out", "{out}"], "cannot generate"),
    (["train", "mage", "--config", "mage-tiny", "--run-dir", "{out}/r", "mage.tokenizer={mage}"], "not a tokenizer"),
    (["train", "tokenizer", "--config", "tokenizer-tiny", "--run-dir", "{out}/r", "data.image_size=30"],
     "not a multiple"),
    (["train", "tokenizer", "--config", "tokenizer-tiny", "--run-dir", "{out}/r", "data.path=a{1..3"], "braces"),
    (["train", "mage", "--config", "mage-tiny", "--run-dir", "{out}/r", "mage.tokenizer={tok}",
      "data.image_size=16"], "data.image_size"),
    (["cache-tokens", "--tokenizer", "{tok}", "--data", "mnist5k", "--split", "val", "--image-size", "32",
      "--out", "{out}/c.safetensors"], "val"),
])
def test_bad_requests_are_one_line_usage_errors(tiny_models, tmp_path, argv, message):
    files = {"out": tmp_path / "out", "file": tiny_models["file"], "mage": tiny_models["mage"],
             "tok": tiny_models["tok"], "image": tiny_models["image"], "text": tiny_models["text"]}
    code, err = invoke([a.format(**files) if "{" in a and "{1.." not in a else a for a in argv])
    assert code == 2 and "Traceback" not in err and message in err, err


def corrupt_weights(src, dst, how: str):
    """A copy of the weights folder `src` at `dst`, broken in one way."""
    import json
    import shutil

    shutil.copytree(src, dst)
    meta = json.loads((dst / "config.json").read_text())
    if how == "extra-key":
        meta["config"]["bogus"] = 1
    elif how == "wrong-shape":
        meta["config"]["codebook_size"] = meta["config"]["codebook_size"] * 2
    elif how == "bad-json":
        (dst / "config.json").write_text("{not json")
        return dst
    elif how == "truncated":
        data = (dst / "model.safetensors").read_bytes()
        (dst / "model.safetensors").write_bytes(data[: len(data) // 3])
    elif how == "empty":
        (dst / "model.safetensors").write_bytes(b"")
    elif how == "pickle":
        import torch

        torch.save({"w": torch.ones(2)}, dst / "model.safetensors")
    elif how == "no-weights":
        (dst / "model.safetensors").unlink()
    (dst / "config.json").write_text(json.dumps(meta))
    return dst


CORRUPTIONS = ("extra-key", "wrong-shape", "bad-json", "truncated", "empty", "pickle", "no-weights")
BAD_CONFIGS = {"cycle-a.yaml": "base: {dir}/cycle-b.yaml\n", "cycle-b.yaml": "base: {dir}/cycle-a.yaml\n",
               "base-list.yaml": "base: [1, 2]\n", "latin1.yaml": b"train:\n  seed: \xe9\n",
               "invalid.yaml": "train: [\n", "a-list.yaml": "- 1\n- 2\n", "unknown.yaml": "trian:\n  seed: 1\n",
               "missing-base.yaml": "base: no-such-preset\n", "wrong-method.yaml": "method: mage\n"}


def test_bad_files_are_one_line_usage_errors(tiny_models, tmp_path):
    """Every broken checkpoint folder with every command that reads one, and every broken config file."""
    cases = []
    for how in CORRUPTIONS:
        for name in ("mage", "tok"):
            bad = str(corrupt_weights(tiny_models[name], tmp_path / f"{name}-{how}", how))
            out = str(tmp_path / "out" / f"{name}-{how}")
            cases += [["generate", "--ckpt", bad, "--out", out, "--num-images", "1"],
                      ["edit", "inpaint", "--ckpt", bad, "--image", str(tiny_models["image"]), "--box", "0,0,8,8",
                       "--out", out + ".png"],
                      ["features", "--ckpt", bad, "--data", "mnist5k", "--limit", "4", "--image-size", "32",
                       "--out", out + ".safetensors"],
                      ["eval", "knn", "--ckpt", bad, "--data", "mnist5k", "--limit", "8", "--test-limit", "8",
                       "--image-size", "32", "--json", out + ".json"],
                      ["cache-tokens", "--tokenizer", bad, "--data", "mnist5k", "--image-size", "32",
                       "--out", out + ".cache"]]
    for name, text in BAD_CONFIGS.items():
        path = tmp_path / name
        path.write_bytes(text if isinstance(text, bytes) else text.format(dir=tmp_path).encode())
        if not name.startswith("cycle-b"):  # a valid mage config is a bad tokenizer config only
            cases += [["config", "show", str(path)]] * (name != "wrong-method.yaml")
            cases += [["train", "tokenizer", "--config", str(path), "--run-dir", str(tmp_path / "never")]]
    assert len(cases) >= 80
    for argv in cases:
        code, err = invoke(argv)
        assert code == 2 and "Traceback" not in err and err.startswith("maskgen: error:"), (argv, err[-800:])
        assert err.count("\n") == 1, (argv, err)
    assert not (tmp_path / "never").exists()
