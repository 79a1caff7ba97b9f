import math

import pytest
import torch

from maskgen.masking import TruncatedNormalRatio, num_masked, token_masks


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- truncated normal ratio
def test_ratio_statistics_match_the_reference():
    """official MAGE (models_mage.py): mu 0.55, std 0.25 on [0.5, 1] has mean 0.694 and std 0.129."""
    s = TruncatedNormalRatio()
    assert s.mean() == pytest.approx(0.694, abs=1e-3)
    assert s.stddev() == pytest.approx(0.129, abs=1e-3)
    x = s.sample(500_000, generator=gen(0))
    assert x.shape == (500_000,) and x.dtype == torch.float64
    assert float(x.min()) >= 0.5 and float(x.max()) <= 1.0
    assert float(x.min()) < 0.5005 and float(x.max()) > 0.9995  # the whole support is reached
    assert float(x.mean()) == pytest.approx(s.mean(), abs=1e-3)
    assert float(x.std()) == pytest.approx(s.stddev(), abs=1e-3)


def test_ratio_matches_scipy_truncnorm():
    stats = pytest.importorskip("scipy.stats")
    for mu, std, low, high in [(0.55, 0.25, 0.5, 1.0), (0.0, 1.0, -0.5, 2.0), (0.8, 0.05, 0.0, 1.0)]:
        s = TruncatedNormalRatio(mu, std, low, high)
        ref = stats.truncnorm((low - mu) / std, (high - mu) / std, loc=mu, scale=std)
        assert s.mean() == pytest.approx(ref.mean(), abs=1e-9)
        assert s.stddev() == pytest.approx(ref.std(), abs=1e-9)
        # inverse-CDF sampling: the sample of uniform u is truncnorm's ppf(u)
        u = torch.rand(10_000, generator=gen(3), dtype=torch.float64).numpy()
        x = s.sample(10_000, generator=gen(3)).numpy()
        assert abs(x - ref.ppf(u)).max() < 1e-9
        ks = stats.kstest(s.sample(20_000, generator=gen(4)).numpy(), ref.cdf)
        assert ks.pvalue > 1e-3


def test_ratio_generator_and_degenerate_cases():
    s = TruncatedNormalRatio()
    assert torch.equal(s.sample(8, gen(1)), s.sample(8, gen(1)))
    assert not torch.equal(s.sample(8, gen(1)), s.sample(8, gen(2)))
    torch.manual_seed(0)
    a = s.sample(4)
    torch.manual_seed(0)
    assert torch.equal(a, s.sample(4))  # global RNG when no generator
    fixed = TruncatedNormalRatio(0.7, 0.0, 0.5, 1.0)
    assert torch.equal(fixed.sample(3, gen()), torch.full((3,), 0.7, dtype=torch.float64)) and fixed.mean() == 0.7
    assert TruncatedNormalRatio(0.2, 0.0, 0.5, 1.0).sample(1)[0] == 0.5  # clipped into the support
    with pytest.raises(ValueError):
        TruncatedNormalRatio(low=0.9, high=0.5)
    with pytest.raises(ValueError):
        TruncatedNormalRatio(std=-1.0)


# ----------------------------------------------------------------------------------------- masks
def test_token_masks_exact_counts_and_subset():
    ratios = torch.tensor([0.5, 0.6, 0.75, 1.0, 0.51], dtype=torch.float64)
    drop, mask = token_masks(5, 64, ratios, 32, generator=gen())
    assert drop.dtype == mask.dtype == torch.bool and drop.shape == mask.shape == (5, 64)
    assert mask.sum(1).tolist() == [math.ceil(64 * r) for r in ratios.tolist()] == [32, 39, 48, 64, 33]
    assert drop.sum(1).tolist() == [32] * 5
    assert not (drop & ~mask).any()  # dropped ⊂ masked
    # a single float ratio is shared by every row; the rows still differ
    drop, mask = token_masks(3, 256, 0.7, 128, generator=gen())
    assert mask.sum(1).tolist() == [180] * 3 and drop.sum(1).tolist() == [128] * 3
    assert not torch.equal(mask[0], mask[1])


def test_token_masks_one_noise_draw_per_row():
    """Drop and mask come from the same ranking: dropped = the drop_count lowest noise, masked = a prefix."""
    drop, mask = token_masks(2, 32, 0.75, 8, generator=gen(5))
    noise = torch.rand(2, 32, generator=gen(5))
    order = noise.argsort(1)
    for i in range(2):
        assert set(order[i, :24].tolist()) == set(mask[i].nonzero().flatten().tolist())
        assert set(order[i, :8].tolist()) == set(drop[i].nonzero().flatten().tolist())
    assert torch.equal(token_masks(2, 32, 0.75, 8, generator=gen(5))[1], mask)


def test_token_masks_are_uniform_over_positions():
    _, mask = token_masks(4000, 16, 0.25, 0, generator=gen())
    freq = mask.float().mean(0)
    assert torch.allclose(freq, torch.full_like(freq, 0.25), atol=0.03)


def test_num_masked_statistics_for_256_tokens():
    """measured on the official code: over 200k draws num_masked ranged 129..256 with mean 178."""
    n = num_masked(256, TruncatedNormalRatio().sample(200_000, generator=gen(0)))
    assert int(n.min()) == 129 and int(n.max()) == 256
    assert float(n.double().mean()) == pytest.approx(178.0, abs=0.3)
    assert num_masked(256, 0.5).item() == 128 and num_masked(256, 0.7).item() == 180


def test_token_masks_errors():
    with pytest.raises(ValueError, match="dropped tokens must be masked"):
        token_masks(2, 16, 0.25, 8)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        token_masks(2, 16, 1.5, 0)
    with pytest.raises(ValueError, match="Tensor"):
        token_masks(2, 16, torch.tensor([0.5, 0.6, 0.7]), 0)
    drop, mask = token_masks(2, 16, 0.0, 0)
    assert not drop.any() and not mask.any()
