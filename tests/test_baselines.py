"""The baselines a pre-training must beat (`--untrained`, `--ckpt pixels`) and split handling that never takes the
wrong images: folders with train/ and test/ are read as splits; other splits of data without them are errors."""
import json

import pytest
import torch

from maskgen.cli import main
from maskgen.data.sources import folder_splits, open_source
from maskgen.data.transforms import EvalTransform
from maskgen.data.decode import decode_image
from maskgen.errors import UserError
from maskgen.eval.features import compute_features, load_encoder
from maskgen.models import from_pretrained
from maskgen.models.pretrained import build_from_config
from maskgen.weights import read_model_config

from conftest import make_folder


def invoke(capsys, *args) -> tuple[int, str]:
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def split_folder(root, n_train: int, n_test: int):
    make_folder(root / "train", n_train)
    make_folder(root / "test", n_test)
    return root


def test_untrained_is_the_seeded_initialisation_with_the_trained_tokenizer(tiny_models):
    trained = from_pretrained(tiny_models["mage"])
    a = load_encoder(tiny_models["mage"], untrained=True, seed=3)
    b = load_encoder(tiny_models["mage"], untrained=True, seed=3)
    c = load_encoder(tiny_models["mage"], untrained=True, seed=4)
    torch.manual_seed(3)
    fresh = build_from_config(read_model_config(tiny_models["mage"]))
    for name, t in a.state_dict().items():
        assert torch.equal(t, b.state_dict()[name]) and torch.equal(t, fresh.state_dict()[name]), name
    differs = [n for n, t in a.state_dict().items() if not torch.equal(t, c.state_dict()[n])]
    assert differs, "another seed gave the same weights"
    # the tokenizer is an attachment: the untrained encoder reads the same tokens as the trained one
    for name, t in trained.tokenizer.state_dict().items():
        assert torch.equal(t, a.tokenizer.state_dict()[name]), name
    assert a.weights_id["untrained_seed"] == 3 and "untrained_seed" not in load_encoder(tiny_models["mage"]).weights_id


def test_pixels_baseline_is_the_flattened_eval_image(tmp_path):
    folder = make_folder(tmp_path / "f", 6)
    x, y = compute_features(load_encoder("pixels", image_size=16), str(folder), "train", progress=False)
    first = open_source(str(folder))[0]
    assert x.shape == (6, 3 * 16 * 16) and y[0] == first.label
    assert torch.equal(x[0], EvalTransform(16)(decode_image(first.data)).flatten())
    with pytest.raises(Exception, match="needs a checkpoint"):
        load_encoder("pixels", untrained=True)


def test_eval_cli_untrained_and_pixels(tiny_models, tmp_path, capsys):
    cache = tmp_path / "cache"
    common = ["--data", "mnist5k", "--limit", 60, "--test-limit", 30, "--feature-cache", cache]
    assert invoke(capsys, "eval", "knn", "--ckpt", tiny_models["mage"], *common)[0] == 0
    assert invoke(capsys, "eval", "knn", "--ckpt", tiny_models["mage"], "--untrained", *common)[0] == 0
    trained = json.loads((tiny_models["mage"] / "eval" / "knn.json").read_text())
    untrained = json.loads((tiny_models["mage"] / "eval" / "knn-untrained.json").read_text())
    assert not trained["untrained"] and untrained["untrained"]
    assert len(list(cache.glob("features-*.safetensors"))) == 4  # train + test, trained + untrained: never reused
    code, _ = invoke(capsys, "eval", "knn", "--ckpt", "pixels", "--image-size", 16, *common,
                     "--json", tmp_path / "px.json")
    r = json.loads((tmp_path / "px.json").read_text())
    assert code == 0 and r["model"] == "pixels" and r["num_train"] == 60 and r["num_test"] == 30
    assert r["top1"] > 30  # chance 10 %: raw digit pixels separate classes well under kNN


def test_layer_reads_an_earlier_block(tiny_models, tmp_path, capsys):
    full = load_encoder(tiny_models["mage"])
    depth = len(full.blocks)
    assert depth >= 2
    x = torch.rand(3, 3, full.config.image_size, full.config.image_size)
    with torch.no_grad():
        h = full.embed(x)
        h = full.blocks[0](h)
        want = torch.nn.functional.layer_norm(h[:, 1:].mean(1), (h.shape[-1],), eps=1e-6)
        first = load_encoder(tiny_models["mage"], layer=1)
        assert torch.allclose(first.forward_features(x), want, atol=1e-6)
        assert torch.equal(load_encoder(tiny_models["mage"], layer=depth).forward_features(x), full.forward_features(x))
        assert not torch.allclose(first.forward_features(x), full.forward_features(x), atol=1e-3)
    for ckpt, layer, match in ((tiny_models["mage"], depth + 1, f"between 1 and {depth}"),
                               (tiny_models["tok"], 1, "ViT encoders"), ("pixels", 1, "needs a checkpoint")):
        with pytest.raises(UserError, match=match):
            load_encoder(ckpt, layer=layer)
    cache = tmp_path / "cache"
    common = ["--ckpt", tiny_models["mage"], "--data", "mnist5k", "--limit", 40, "--test-limit", 20,
              "--feature-cache", cache]
    assert invoke(capsys, "eval", "knn", *common, "--json", tmp_path / "a.json")[0] == 0
    assert invoke(capsys, "eval", "knn", *common, "--layer", 1, "--json", tmp_path / "b.json")[0] == 0
    assert len(list(cache.glob("features-*.safetensors"))) == 4  # block 1 is never served block `depth`'s features
    assert json.loads((tmp_path / "b.json").read_text())["layer"] == 1
    code, err = invoke(capsys, "eval", "knn", *common, "--layer", depth + 1)
    assert code == 2 and "--layer must be between" in err and err.count("\n") == 1, err


def test_split_folder_is_read_as_splits(tmp_path):
    root = split_folder(tmp_path / "d", 12, 5)
    assert folder_splits(root) == ["test", "train"]
    assert len(open_source(str(root), "train")) == 12 and len(open_source(str(root), "test")) == 5
    classes = set(open_source(str(root), "test").classes)
    assert classes and not classes & {"train", "test"}
    mixed = make_folder(tmp_path / "mixed" / "train", 4).parent
    make_folder(mixed / "cat", 3, labeled=False)  # a class folder beside train/: not a split folder
    assert folder_splits(mixed) == []


def test_split_errors_are_usage_errors(tiny_models, tmp_path, capsys):
    flat = make_folder(tmp_path / "flat", 10)
    split = split_folder(tmp_path / "split", 10, 4)
    for data, split_name, match in ((flat, "test", "has no splits"), (split, "val", "has no split 'val'"),
                                    ("mnist5k", "val", "has no split 'val'")):
        code, err = invoke(capsys, "eval", "knn", "--ckpt", tiny_models["tok"], "--data", data, "--split",
                           split_name, "--test-data", flat, "--image-size", 32)
        assert code == 2 and match in err and err.count("\n") == 1, err
    code, err = invoke(capsys, "features", "--ckpt", tiny_models["tok"], "--data", flat, "--split", "test",
                       "--image-size", 32, "--out", tmp_path / "f.safetensors")
    assert code == 2 and "has no splits" in err
    code, err = invoke(capsys, "eval", "knn", "--ckpt", tiny_models["tok"], "--data", flat, "--image-size", 32)
    assert code == 2 and "--test-data is required" in err
    code, err = invoke(capsys, "eval", "fid", "--input1", flat, "--input2", split, "--extractor", "lite0")
    assert code == 2 and f"e.g. {split / 'test'}" in err and err.count("\n") == 1, err  # not its train/ silently


def test_eval_on_a_split_folder_takes_its_test_split(tiny_models, tmp_path, capsys):
    split = split_folder(tmp_path / "split", 24, 8)
    code, err = invoke(capsys, "eval", "knn", "--ckpt", tiny_models["mage"], "--data", split, "--json",
                       tmp_path / "k.json")
    r = json.loads((tmp_path / "k.json").read_text())
    assert code == 0 and r["num_train"] == 24 and r["num_test"] == 8 and r["test_split"] == "test", err
