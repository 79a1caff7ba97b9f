import math

import pytest
import torch

from maskgen.models.mage import MAGE, MAGEConfig
from maskgen.sampling import UNKNOWN, MaskGITScheduler, generate, inpaint_tokens, token_region

# measured on the official gen_img_uncond.py: tokens still masked after each step, L = 256
REF_12 = [253, 247, 236, 221, 203, 181, 155, 128, 97, 66, 33, 1]


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def tiny_mage(grid: int = 4, codebook: int = 32) -> MAGE:
    torch.manual_seed(0)
    cfg = MAGEConfig(image_size=grid * 8, token_grid=grid, codebook_size=codebook, vocab_layout="compact",
                     embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)
    m = MAGE(cfg)
    # larger logits than at init, so that samples depend on the input
    torch.nn.init.normal_(m.token_emb.word_embeddings.weight, std=0.5)
    return m


def run_schedule(num_iter: int, length: int = 256, batch: int = 2, seed: int = 0) -> list[list[int]]:
    """Still-masked counts per step, driving the scheduler with random logits."""
    sched = MaskGITScheduler(num_iter=num_iter)
    tokens = torch.full((batch, length), UNKNOWN)
    unknown = torch.ones(batch, length, dtype=torch.bool)
    g = gen(seed)
    counts = []
    for step in sched.timesteps:
        logits = torch.randn(batch, length, 16, generator=g)
        out = sched.step(logits, step, tokens, unknown, generator=g)
        assert torch.all((out.sampled >= 0) & (out.sampled < 16))
        assert not (out.unknown & ~unknown).any()  # a known token is never masked again
        assert torch.equal(out.sampled[~unknown], tokens[~unknown])
        counts.append(out.unknown.sum(1).tolist())
        tokens, unknown = out.sampled.masked_fill(out.unknown, UNKNOWN), out.unknown
    return counts


def test_schedule_matches_the_official_counts():
    assert [c[0] for c in run_schedule(12)] == REF_12
    counts20 = [c[0] for c in run_schedule(20)]
    assert counts20[:3] == [255, 252, 248] and counts20[-3:] == [40, 20, 1]
    assert all(len(set(c)) == 1 for c in run_schedule(12, batch=3))  # one value for the whole batch
    sched = MaskGITScheduler(num_iter=12)
    assert sched.mask_ratio(0) == pytest.approx(math.cos(math.pi / 24)) and abs(sched.mask_ratio(11)) < 1e-12


def test_generate_with_a_model_follows_the_schedule():
    m = tiny_mage(grid=16)
    seen = []
    codes = generate(m, 2, num_iter=12, generator=gen(), callback=lambda s, out: seen.append(out.unknown.sum(1)))
    assert codes.shape == (2, 16, 16) and codes.dtype == torch.long
    assert int(codes.min()) >= 0 and int(codes.max()) < 32
    assert [c.tolist() for c in seen] == [[n, n] for n in REF_12]


def test_same_seed_same_images_and_mode_restored():
    m = tiny_mage().train()
    a = generate(m, 3, num_iter=4, generator=gen(1))
    assert m.training  # generation runs in eval mode and restores the mode
    assert torch.equal(a, generate(m, 3, num_iter=4, generator=gen(1)))
    assert not torch.equal(a, generate(m, 3, num_iter=4, generator=gen(2)))
    torch.manual_seed(5)
    b = generate(m, 2, num_iter=4)
    torch.manual_seed(5)
    assert torch.equal(b, generate(m, 2, num_iter=4))  # global RNG when no generator


def test_batch_equals_one_by_one_with_one_generator_per_image():
    """With a generator per image, each row draws only from its own generator: a batch gives the images of
    one-by-one calls (the schedule is shared: every row has the same counts)."""
    m = tiny_mage()
    batched = generate(m, 3, num_iter=6, generator=[gen(10), gen(11), gen(12)])
    singles = torch.cat([generate(m, 1, num_iter=6, generator=[gen(s)]) for s in (10, 11, 12)])
    assert torch.equal(batched, singles)
    assert torch.equal(generate(m, 1, num_iter=6, generator=gen(11)), singles[1:2])  # same draws as a list of one
    with pytest.raises(ValueError, match="generators"):
        generate(m, 2, generator=[gen()])


def test_inpainting_keeps_known_tokens():
    m = tiny_mage(grid=8)
    codes = torch.randint(0, 32, (2, 8, 8), generator=gen(3))
    region = torch.zeros(2, 8, 8, dtype=torch.bool)
    region[0, 2:5, 2:6] = True  # 12 tokens
    region[1, :, :3] = True  # 24 tokens: per-row schedules
    seen = []
    out = inpaint_tokens(m, codes, region, num_iter=5, generator=gen(),
                         callback=lambda s, o: seen.append(o.unknown.sum(1).tolist()))
    assert torch.equal(out[~region], codes[~region])
    assert int(out.min()) >= 0 and int(out.max()) < 32
    sched = MaskGITScheduler(num_iter=5)
    for step, counts in enumerate(seen):
        expect = [max(1, math.floor(u * sched.mask_ratio(step))) for u in (12, 24)]
        assert counts == expect
    assert not torch.equal(out[region], codes[region])
    # a broadcast [h, w] region and a region-free canvas
    shared = inpaint_tokens(m, codes, region[0], num_iter=3, generator=gen())
    assert torch.equal(shared[:, ~region[0]], codes[:, ~region[0]])
    assert torch.equal(inpaint_tokens(m, codes, torch.zeros(8, 8, dtype=torch.bool)), codes)


def test_editing_mixed_rows_with_nothing_to_do():
    m = tiny_mage()
    canvas = torch.randint(0, 32, (2, 4, 4), generator=gen())
    canvas[1, 0, 0] = UNKNOWN
    out = generate(m, canvas, num_iter=3, generator=gen())
    assert torch.equal(out[0], canvas[0]) and torch.equal(out[1].flatten()[1:], canvas[1].flatten()[1:])
    assert 0 <= int(out[1, 0, 0]) < 32


def test_canvas_validation():
    m = tiny_mage()
    with pytest.raises(ValueError, match="canvas codes"):
        generate(m, torch.full((1, 4, 4), 40))
    with pytest.raises(ValueError, match="canvas must be"):
        generate(m, torch.zeros(1, 5, 5, dtype=torch.long))


def test_greedy_sampling_with_zero_temperature():
    m = tiny_mage()
    a = generate(m, 1, num_iter=3, temperature=0.0, generator=gen(1))
    assert torch.equal(a, generate(m, 1, num_iter=3, temperature=0.0, generator=gen(1)))


def box_mask(x0: int, y0: int, x1: int, y1: int, size: int) -> torch.Tensor:
    """Pixel mask [size, size], True inside the end-exclusive box."""
    m = torch.zeros(size, size, dtype=torch.bool)
    m[y0:y1, x0:x1] = True
    return m


def test_token_region_matches_the_maintainers_example():
    """LTH14/mage issue #3: a 128x128 hole at pixels 64..191 of a 256 image covers tokens 4..11, and the
    maintainer masked one token beyond it (3..12)."""
    hole = box_mask(64, 64, 192, 192, 256)
    overlap = token_region(hole, 16)
    assert overlap.shape == (16, 16) and overlap.sum() == 64 and overlap[4:12, 4:12].all()
    grown = token_region(hole, 16, dilate=1)
    assert grown.sum() == 100 and grown[3:13, 3:13].all()
    pixel = torch.zeros(2, 32, 32, dtype=torch.bool)
    pixel[1, 0, 17] = True  # one pixel selects its whole token
    t = token_region(pixel, 8)
    assert t.shape == (2, 4, 4) and t.sum() == 1 and t[1, 0, 2]
    with pytest.raises(ValueError, match="multiple of the token size"):
        token_region(torch.zeros(30, 32, dtype=torch.bool), 16)
