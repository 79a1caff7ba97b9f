import logging
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from maskgen.data.decode import decode_image
from maskgen.data.loader import ResumableLoader
from maskgen.seeding import mix_seed
from maskgen.data.sources import open_source
from maskgen.data.token_cache import (CachedTokens, TokenCache, cache_tokens, tokenizer_hash,
                                      write_token_cache)
from maskgen.data.transforms import EvalTransform, PretrainTransform
from maskgen.errors import UserError
from maskgen.models.vqgan import VQGAN, VQGANConfig
from maskgen.models import from_pretrained, save_pretrained
from maskgen.weights import WEIGHTS_FILE

from conftest import REPO, make_folder

SIZE, VIEWS, N = 16, 3, 12


def _tokenizer(seed: int = 0) -> VQGAN:
    torch.manual_seed(seed)
    return VQGAN(VQGANConfig(ch=32, ch_mult=[1, 2], num_res_blocks=1, z_channels=16, codebook_size=16,
                             norm_groups=8)).eval()


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    return save_pretrained(_tokenizer(), tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("data") / "images", N)


@pytest.fixture(scope="module")
def cache_path(tok_dir, images, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cache") / "tokens.safetensors"
    return cache_tokens(tok_dir, str(images), out, image_size=SIZE, views=VIEWS, batch_size=16, progress=False)


def _encode(tok, x: torch.Tensor) -> torch.Tensor:
    return tok.encode(x[None])[0]


def test_stored_tokens_are_the_encoded_views(tok_dir, images, cache_path):
    tok, src, cache = from_pretrained(tok_dir), open_source(str(images)), TokenCache(cache_path)
    assert len(cache) == N and cache.views == VIEWS and cache.grid == (8, 8) and cache.codebook_size == 16
    assert cache.labels.tolist() == [src[i].label for i in range(N)] and len(set(cache.labels.tolist())) > 1
    crop = PretrainTransform(SIZE, (0.2, 1.0), hflip=False)
    for i in (0, 5, N - 1):
        img = decode_image(src[i].data)
        centre = EvalTransform(SIZE)(img)
        rand = crop(img, torch.Generator().manual_seed(mix_seed(0, i, 2)))  # view 2 of image i, seed 0
        for view, x in ((0, centre), (2, rand)):
            got, got_flip = cache.tokens(i, view, False), cache.tokens(i, view, True)
            assert got.dtype == torch.long and got.shape == (8, 8)
            assert torch.equal(got, _encode(tok, x))
            assert torch.equal(got_flip, _encode(tok, x.flip(-1)))
            assert not torch.equal(got, got_flip)


def test_channels_last_encoding_gives_the_same_cache(tok_dir, images, cache_path, tmp_path):
    nhwc = cache_tokens(tok_dir, str(images), tmp_path / "nhwc.st", image_size=SIZE, views=VIEWS, batch_size=16,
                        progress=False, memory_format="channels_last")
    assert torch.equal(load_file(nhwc)["tokens"], load_file(cache_path)["tokens"])
    with pytest.raises(UserError, match="memory_format"):
        cache_tokens(tok_dir, str(images), tmp_path / "bad.st", image_size=SIZE, views=VIEWS, progress=False,
                     memory_format="nhwc")


def test_reproducible_and_random_views_differ(tok_dir, images, cache_path, tmp_path):
    tok, src = from_pretrained(tok_dir), open_source(str(images))
    # same seed (and another batch size): the same tensors and metadata (safetensors orders metadata keys at random)
    again = write_token_cache(tok, src, tmp_path / "again.st", VIEWS, SIZE, batch_size=5, progress=False)
    assert load_file(again).keys() == load_file(cache_path).keys() == {"tokens", "labels", "source_index"}
    assert all(torch.equal(v, load_file(cache_path)[k]) for k, v in load_file(again).items())
    assert TokenCache(again).metadata == TokenCache(cache_path).metadata
    other = TokenCache(write_token_cache(tok, src, tmp_path / "s1.st", VIEWS, SIZE, seed=1, progress=False))
    cache = TokenCache(cache_path)
    for i in range(N):
        assert torch.equal(other.tokens(i, 0), cache.tokens(i, 0))  # the centre view has no randomness
    differ = lambda a, b, v, w: sum(not torch.equal(a.tokens(i, v), b.tokens(i, w)) for i in range(N))
    assert differ(cache, other, 1, 1) >= N - 1  # another seed, other crops
    assert differ(cache, cache, 1, 2) >= N - 1  # two random views of one image
    assert differ(cache, cache, 0, 1) >= N - 1


def test_metadata_records_tokenizer_transform_and_source(tok_dir, cache_path):
    meta = TokenCache(cache_path).metadata
    assert meta["tokenizer_hash"] == tokenizer_hash(from_pretrained(tok_dir))
    assert meta["format"] == "maskgen-token-cache" and meta["format_version"] == "1"
    assert (meta["views"], meta["image_size"], meta["grid_h"], meta["skipped"]) == ("3", "16", "8", "0")
    assert '"crop_scale": [0.2, 1.0]' in meta["transform"] and '"seed": 0' in meta["transform"]
    assert len(meta["transform_hash"]) == 64 and meta["source"].startswith("image folder")


def test_tokenizer_hash_stable_across_save_load_and_processes(tmp_path):
    tok = _tokenizer()
    h = tokenizer_hash(tok)
    assert tokenizer_hash(from_pretrained(save_pretrained(tok, tmp_path / "a"))) == h
    code = ("import sys; from maskgen.models import from_pretrained; from maskgen.data.token_cache import "
            "tokenizer_hash; print(tokenizer_hash(from_pretrained(sys.argv[1])))")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "a")], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout.strip()
    assert out == h
    with torch.no_grad():
        tok.decoder.conv_out.bias[0] += 1e-3  # one weight, not even used by encode
    assert tokenizer_hash(tok) != h


def test_check_refuses_another_tokenizer_or_image_size(tok_dir, cache_path):
    cache = TokenCache(cache_path)
    cache.check(from_pretrained(tok_dir), image_size=SIZE, crop_scale=(0.2, 1.0), interpolation="bicubic")
    other = _tokenizer(seed=1)
    mine, theirs = cache.tokenizer_hash[:12], tokenizer_hash(other)[:12]
    with pytest.raises(UserError, match=rf"made with tokenizer {mine}.*configured tokenizer is {theirs}.*cache-tokens"):
        cache.check(other)
    with pytest.raises(UserError, match=r"holds 16 px images \(8x8 tokens\).*image size is 32"):
        cache.check(image_size=32)
    with pytest.raises(UserError, match=r"crop scale is \[0.08, 1.0\]"):
        cache.check(crop_scale=[0.08, 1.0])


def test_files_that_are_not_token_caches_are_refused(tok_dir, tmp_path):
    junk = tmp_path / "junk.st"
    junk.write_bytes(b"not a safetensors file at all")
    with pytest.raises(UserError, match="junk.st is not a token cache"):
        TokenCache(junk)
    with pytest.raises(UserError, match="is not a token cache.*without maskgen token-cache metadata"):
        TokenCache(tok_dir / WEIGHTS_FILE)
    save_file({"tokens": torch.zeros(1)}, str(tmp_path / "fake.st"), metadata={"format": "other"})
    with pytest.raises(UserError, match="fake.st is not a token cache"):
        TokenCache(tmp_path / "fake.st")
    with pytest.raises(UserError, match="no such token cache"):
        TokenCache(tmp_path / "missing.st")


def _batches(dataset, seed=0, workers=0, n=6):
    it = iter(ResumableLoader(dataset, 4, seed, num_workers=workers))
    return [next(it) for _ in range(n)]  # 3 batches per epoch: two epochs


def test_cached_tokens_feed_the_loader(cache_path):
    cache = TokenCache(cache_path)
    batches = _batches(CachedTokens(cache, seed=0))
    b = batches[0]
    assert b["tokens"].shape == (4, 8, 8) and b["tokens"].dtype == torch.long
    assert torch.equal(b["label"], cache.labels[b["index"]])
    for x, y in zip(batches, _batches(CachedTokens(cache, seed=0))):
        assert torch.equal(x["tokens"], y["tokens"]) and torch.equal(x["index"], y["index"])
    pickled = CachedTokens(pickle.loads(pickle.dumps(cache)), seed=0)  # what a spawned worker receives
    assert torch.equal(pickled[(3, 7)]["tokens"], CachedTokens(cache, 0)[(3, 7)]["tokens"])
    other = _batches(CachedTokens(cache, seed=1), seed=0)
    assert any(not torch.equal(x["tokens"], y["tokens"]) for x, y in zip(batches, other))


def test_cached_tokens_with_workers(cache_path):
    ds = CachedTokens(TokenCache(cache_path), seed=0)
    for x, y in zip(_batches(ds), _batches(ds, workers=2)):
        assert torch.equal(x["tokens"], y["tokens"]) and torch.equal(x["label"], y["label"])


def test_all_views_and_flips_are_used_over_epochs(cache_path):
    cache = TokenCache(cache_path)
    ds = CachedTokens(cache, seed=0)
    for i in (0, 4):
        stored = {tuple(cache.tokens(i, v, f).flatten().tolist()) for v in range(VIEWS) for f in (False, True)}
        seen = {tuple(ds[(e, i)]["tokens"].flatten().tolist()) for e in range(100)}
        assert seen == stored and len(stored) == 2 * VIEWS


def test_unreadable_images_are_skipped_and_counted(tok_dir, tmp_path, caplog):
    root = make_folder(tmp_path / "imgs", 6, labeled=False)
    (root / "0002.jpg").write_bytes(b"\xff\xd8 truncated")
    with caplog.at_level(logging.WARNING, logger="maskgen"):
        out = write_token_cache(from_pretrained(tok_dir), open_source(str(root)), tmp_path / "c.st", 2, SIZE,
                                progress=False)
    assert "skipped unreadable image" in caplog.text and "0002.jpg" in caplog.text
    cache = TokenCache(out)
    assert len(cache) == 5 and cache.skipped == 1 and cache.metadata["skipped"] == "1"
    assert cache.source_index.tolist() == [0, 1, 3, 4, 5] and cache.labels.tolist() == [-1] * 5


def test_file_is_memory_mapped(cache_path):
    maps = Path("/proc/self/maps")
    if not maps.is_file():
        pytest.skip("needs /proc/self/maps")
    cache = TokenCache(cache_path)
    assert str(cache_path.resolve()) in maps.read_text()
    assert cache.tokens(N - 1, VIEWS - 1, True).shape == (8, 8)


def test_user_errors_are_one_line(tok_dir, images, tmp_path):
    ok = dict(image_size=SIZE, views=2, progress=False)
    cases = [
        ((tmp_path / "no-tok", str(images)), ok, "no such checkpoint directory"),
        ((tok_dir, str(tmp_path / "no-data")), ok, "data path not found"),
        ((tok_dir, str(images)), {**ok, "views": 0}, "views must be >= 1"),
        ((tok_dir, str(images)), {**ok, "image_size": 15},
         "not a positive multiple of the tokenizer's downsample factor 2"),
        ((tok_dir, str(images)), {**ok, "crop_scale": (0.5, 0.2)}, "crop scale"),
    ]
    for (tok, data), kwargs, msg in cases:
        with pytest.raises(UserError, match=msg) as e:
            cache_tokens(tok, data, tmp_path / "x.st", **kwargs)
        assert "\n" not in str(e.value)
    assert not (tmp_path / "x.st").exists()
    big = VQGAN(VQGANConfig(ch=8, ch_mult=[1], num_res_blocks=1, z_channels=2, codebook_size=70000, norm_groups=8))
    with pytest.raises(UserError, match="codebook_size 70000 exceeds 65536"):
        write_token_cache(big, open_source(str(images)), tmp_path / "x.st", 1, SIZE, progress=False)
