"""Damaged data never ends in a traceback: broken shards, bad labels and unreadable images are skipped, counted
once and named in a warning; compressed shards and unknown splits are one-line UserErrors."""
import gzip
import io
import json
import tarfile

import pytest
import torch

from maskgen.data.loader import AugmentedImages, ResumableLoader
from maskgen.data.sources import FolderSource, ShardSource, open_source
from maskgen.data.transforms import PretrainTransform
from maskgen.eval.features import compute_features
from maskgen.eval.image_sets import SourceImages
from maskgen.errors import UserError

from conftest import CIFAR, cifar_jpegs, make_folder

SHARD = CIFAR / "test-000000.tar"


def _shard(path, n=40, labels=None):
    """A WebDataset shard of the first `n` CIFAR test images; `labels` maps an image number to its .cls text."""
    with tarfile.open(path, "w") as tf:
        for i, (jpg, label) in enumerate(cifar_jpegs(n)):
            for ext, data in (("jpg", jpg), ("cls", (labels or {}).get(i, str(label).encode()))):
                info = tarfile.TarInfo(f"{i:05d}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return path


def _complete_pairs(cut: int) -> int:
    """How many (jpg, cls) pairs of SHARD lie wholly in its first `cut` bytes."""
    with tarfile.open(SHARD) as tf:
        ends = {}
        for m in tf:
            if m.offset_data + m.size > cut:
                break
            ends.setdefault(m.name.rsplit(".", 1)[0], set()).add(m.name.rsplit(".", 1)[1])
    return sum(exts == {"jpg", "cls"} for exts in ends.values())


def test_truncated_shard_keeps_what_was_readable(tmp_path, caplog):
    data = SHARD.read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: len(data) // 30 + 77])
    with caplog.at_level("WARNING", logger="maskgen"):
        src = open_source(str(cut))
    assert len(src) == _complete_pairs(cut.stat().st_size) > 300
    (shard, why), = src.damaged
    assert shard == str(cut) and why.startswith("cut short after member ") and "(unexpected end of data)" in why
    assert f"shard {cut}: {why}; keeping the" in caplog.text
    assert all(offset + size <= cut.stat().st_size for _, offset, size, _, _ in src.items)
    assert src[len(src) - 1].data[-2:] == b"\xff\xd9"  # the last indexed JPEG is whole


def test_member_data_beyond_the_end_is_not_indexed(tmp_path, caplog):
    with tarfile.open(SHARD) as tf:
        tenth_jpg = [m for m in tf.getmembers()[:20] if m.name.endswith(".jpg")][9]
    cut = tmp_path / "cut.tar"
    cut.write_bytes(SHARD.read_bytes()[: tenth_jpg.offset_data + tenth_jpg.size // 2])
    with caplog.at_level("WARNING", logger="maskgen"):
        src = ShardSource([str(cut)])
    assert len(src) == 9 and src.skipped == 1
    assert f"{cut}:{tenth_jpg.name}: its data lies beyond the end of the file" in caplog.text


@pytest.mark.parametrize("content, reason", [(b"", "empty file"), (b"not a tar\n", "truncated header")])
def test_unreadable_shard_is_a_counted_skip(tmp_path, caplog, content, reason):
    bad = tmp_path / "x.tar"
    bad.write_bytes(content)
    with pytest.raises(UserError) as e:
        open_source(str(bad))
    assert str(e.value) == (f"no images found in data path: {bad}; 1 of 1 shard(s) damaged or unreadable "
                            f"({bad}: not a readable tar ({reason}))")
    good = _shard(tmp_path / "good.tar", 12)
    with caplog.at_level("WARNING", logger="maskgen"):
        src = open_source(str(tmp_path / "{good,x}.tar"))
    assert len(src) == 12 and src.damaged == [(str(bad), f"not a readable tar ({reason})")]
    assert f"shard {bad}: not a readable tar ({reason}); skipped" in caplog.text and str(good) not in caplog.text


@pytest.mark.parametrize("value", [b"99999999999999999999", b"2147483648", b"-3", b"cat", b"", b"1" * 40])
def test_bad_label_skips_its_image(tmp_path, caplog, value):
    shard = _shard(tmp_path / "s.tar", 40, labels={3: value})
    with caplog.at_level("WARNING", logger="maskgen"):
        src = open_source(str(shard))
    assert len(src) == 39 and src.skipped == 1 and "00003.jpg" not in {name.split(":")[1] for *_, name, _ in src.items}
    shown = value.decode()[:32] + ("..." if len(value) > 32 else "")
    assert f"skipped {shard}:00003.jpg: label {shown!r} is not an integer in [0, 2**31)" in caplog.text
    assert src.classes == sorted(set(src.classes)) and max(src.classes) < 10
    batch = next(iter(ResumableLoader(AugmentedImages(src, PretrainTransform(16), 0), 39, 0)))
    assert batch["label"].dtype == torch.int64 and len(batch["label"]) == 39


def test_largest_label_is_kept(tmp_path):
    src = open_source(str(_shard(tmp_path / "s.tar", 4, labels={0: b" 2147483647\n"})))
    assert len(src) == 4 and src[0].label == 2**31 - 1


@pytest.mark.parametrize("name", ["s.tar.gz", "s.tgz", "gzipped.tar"])
def test_compressed_shard_is_refused(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(gzip.compress(_shard(tmp_path / "plain.tar", 4).read_bytes()))
    with pytest.raises(UserError, match=rf"shard {path} is gzip-compressed.*\(gunzip -k {path}\)"):
        open_source(str(path))


def _bad_folder(root):
    """12 CIFAR images in class folders + 2 unreadable files: 14 files."""
    make_folder(root, 12)
    good = next(root.rglob("*.jpg")).read_bytes()
    (root / "0").mkdir(exist_ok=True)
    (root / "0" / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (root / "0" / "notes.jpg").write_text("not an image")
    return root


def _epochs(loader, n):
    it = iter(loader)
    for _ in range(n * loader.batches_per_epoch):
        next(it)


def test_skip_count_counts_files_not_visits(tmp_path, caplog):
    source = FolderSource(_bad_folder(tmp_path / "imgs"))
    loader = ResumableLoader(AugmentedImages(source, PretrainTransform(16), 0), 7, 0)  # 2 batches = all 14 files
    with caplog.at_level("WARNING", logger="maskgen"):
        _epochs(loader, 2)
    assert loader.skipped == 2 and caplog.text.count("truncated.jpg") == caplog.text.count("notes.jpg") == 1
    state = json.loads(json.dumps(loader.state_dict()))  # as a checkpoint's trainer.json stores it
    resumed = ResumableLoader(AugmentedImages(source, PretrainTransform(16), 0), 7, 0)
    resumed.load_state_dict(state)
    caplog.clear()
    with caplog.at_level("WARNING", logger="maskgen"):
        _epochs(resumed, 1)
    assert resumed.skipped == 2 and "skipped unreadable" not in caplog.text
    resumed.load_state_dict({"epoch": 1, "batch": 0, "skipped": 9})  # an older state: a visit count only
    assert (resumed.epoch, resumed.skipped) == (1, 0)


def test_features_and_image_sets_count_unreadable_images(tmp_path, caplog):
    class Mean(torch.nn.Module):
        config = type("Config", (), {"image_size": 16})()

        def forward_features(self, x, pool="mean"):
            return x.mean((2, 3))

    data = str(_bad_folder(tmp_path / "imgs"))
    with caplog.at_level("WARNING", logger="maskgen"):
        x, y = compute_features(Mean(), data, "train", batch_size=5, progress=False)
    assert x.shape == (12, 3) and len(y) == 12
    assert f"{data}: 2 unreadable images were skipped" in caplog.text
    images = SourceImages(data, image_size=16)
    assert sum(len(b) for b in images.batches(5)) == 12 and images.skipped == 2
    assert caplog.text.count("2 unreadable images were skipped") == 2


@pytest.mark.parametrize("name", ["mnist5k", "cifar10"])
def test_unknown_split_names_the_splits(name):
    with pytest.raises(UserError, match=rf"{name}.* has no split 'val': it has test, train$"):
        open_source(name, "val")
