from pathlib import Path

import pytest
import torch
from PIL import Image

from maskgen.data.loader import AugmentedImages, ResumableLoader, subset
from maskgen.data.sources import FolderSource, ShardSource, open_source
from maskgen.data.transforms import EvalTransform, PretrainTransform
from maskgen.errors import UserError

from conftest import CIFAR, make_folder, png_bytes


def _loader(source, batch_size, rank=0, world=1, seed=0, workers=0, limit=0):
    ds = AugmentedImages(source, PretrainTransform(16), seed)
    return ResumableLoader(ds, batch_size, seed, rank, world, workers, limit)


def _take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def test_folder_labels_and_flat_folder(tmp_path):
    labeled = FolderSource(make_folder(tmp_path / "a", 20))
    assert len(labeled) == 20 and labeled.classes == sorted(labeled.classes)
    assert {labeled[i].label for i in range(20)} == set(range(len(labeled.classes)))
    flat = FolderSource(make_folder(tmp_path / "b", 10, labeled=False))
    assert len(flat) == 10 and {flat[i].label for i in range(10)} == {-1}


def test_shards_and_brace_patterns():
    one = ShardSource([str(CIFAR / "test-000000.tar")])
    assert len(one) == 10000 and one.classes == list(range(10))
    both = open_source(str(CIFAR / "train-{000000..000001}.tar"))
    assert len(both) == 20000
    assert open_source("cifar10", "test").description.startswith("CIFAR-10 (JPEG) test, 10000 images")


def test_embedded_demo_set():
    src = open_source("mnist5k")
    assert len(src) == 4000 and src.classes == list(range(10))
    assert src[0].data.size == (28, 28)


def test_missing_or_empty_paths_name_the_path(tmp_path):
    with pytest.raises(UserError, match="data path not found: /nope/x"):
        open_source("/nope/x")
    with pytest.raises(UserError, match=r"data path not found: .*missing-000000.tar \(and 1 more\)"):
        open_source(str(tmp_path / "missing-{000000..000001}.tar"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=f"no images found in data path: {tmp_path / 'empty'}"):
        open_source(str(tmp_path / "empty"))


def test_deterministic_and_workers_do_not_change_batches():
    src = ShardSource([str(CIFAR / "test-000000.tar")])
    a = _take(_loader(src, 8, limit=64), 3)
    b = _take(_loader(src, 8, limit=64, workers=2), 3)
    for x, y in zip(a, b):
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["index"], y["index"])
    c = _take(_loader(src, 8, limit=64, seed=1), 1)
    assert not torch.equal(a[0]["index"], c[0]["index"])


def test_ranks_are_disjoint_and_union_equals_single_process():
    src = ShardSource([str(CIFAR / "test-000000.tar")])
    single = _take(_loader(src, 8, limit=40), 5)  # 5 batches = one epoch of 40, then epoch 2 starts
    r0 = _take(_loader(src, 4, rank=0, world=2, limit=40), 5)
    r1 = _take(_loader(src, 4, rank=1, world=2, limit=40), 5)
    for s, a, b in zip(single, r0, r1):
        assert not set(a["index"].tolist()) & set(b["index"].tolist())
        assert torch.equal(torch.cat([a["index"], b["index"]]), s["index"])
        assert torch.equal(torch.cat([a["image"], b["image"]]), s["image"])
    seen = torch.cat([s["index"] for s in single])
    assert sorted(seen.tolist()) == subset(10000, 40)  # one epoch covers every sample of the subset once


def test_resume_at_exact_position():
    src = ShardSource([str(CIFAR / "test-000000.tar")])
    straight = _take(_loader(src, 8, limit=32), 7)  # crosses an epoch boundary (4 batches/epoch)
    first = _loader(src, 8, limit=32)
    _take(first, 5)
    state = first.state_dict()
    assert state["epoch"] == 1 and state["batch"] == 1
    resumed = _loader(src, 8, limit=32)
    resumed.load_state_dict(state)
    for x, y in zip(straight[5:], _take(resumed, 2)):
        assert torch.equal(x["image"], y["image"])


def test_bad_files_are_skipped_and_counted(tmp_path, caplog):
    root = make_folder(tmp_path / "imgs", 12)
    good = next(root.rglob("*.jpg")).read_bytes()
    (root / "0").mkdir(exist_ok=True)
    (root / "0" / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (root / "0" / "notes.jpg").write_text("not an image")
    (root / "0" / "gray16.png").write_bytes(png_bytes(Image.new("I;16", (40, 40), 1000)))
    (root / "0" / "tiny.png").write_bytes(png_bytes(Image.new("RGBA", (4, 4), (1, 2, 3, 4))))
    loader = _loader(FolderSource(root), 4)
    seen = 0
    with caplog.at_level("WARNING", logger="maskgen"):
        for batch in _take(loader, loader.batches_per_epoch):
            seen += len(batch.get("image", []))
    assert seen == 16 - loader.skipped and loader.skipped == 2
    assert "truncated.jpg" in caplog.text and "notes.jpg" in caplog.text


def test_limit_is_a_fixed_random_subset():
    assert len(subset(5000, 256)) == 256 and subset(5000, 256) == subset(5000, 256)
    # a class-sorted source of 500 per class (as mnist5k) still gives every class
    assert len({i // 500 for i in subset(5000, 256)}) == 10
    assert subset(30, 0) == list(range(30)) and subset(30, 50) == list(range(30))


def test_batch_larger_than_data_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="fewer than one global batch"):
        _loader(FolderSource(make_folder(tmp_path / "x", 5)), 8)


def test_two_views_are_independent_augmentations_and_jitter_is_seeded():
    src = ShardSource([str(CIFAR / "test-000000.tar")])
    one = AugmentedImages(src, PretrainTransform(16), seed=0)[(0, 5)]
    two = AugmentedImages(src, PretrainTransform(16), seed=0, views=2)[(0, 5)]
    assert torch.equal(one["image"], two["image"])  # view 1 is the single-view sample
    assert two["image2"].shape == (3, 16, 16) and not torch.equal(two["image"], two["image2"])
    jitter = PretrainTransform(16, color_jitter=1.0, grayscale=1.0)
    a = AugmentedImages(src, jitter, seed=0)[(0, 5)]["image"]
    assert torch.equal(a, AugmentedImages(src, jitter, seed=0)[(0, 5)]["image"])
    assert torch.equal(a[0], a[1]) and torch.equal(a[1], a[2])  # grayscale with p = 1
