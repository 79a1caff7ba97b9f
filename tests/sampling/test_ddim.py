"""UMD's diffusion maths pinned to the reference's formulas: schedules, q_sample, the DDIM grid and update, CFG."""
import math

import numpy as np
import pytest
import torch

from maskgen.diffusion_schedule import DiffusionSchedule, network_time
from maskgen.errors import UserError
from maskgen.models.umd import UMD, UMDConfig
from maskgen.sampling import DDIMScheduler, ddim_grid


def f(u: float, s: float = 0.008) -> float:
    return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2


def test_cosine_alphas_cumprod_is_the_telescoped_alpha_bar():
    a = DiffusionSchedule("cosine", 1000).alphas_cumprod
    for t in (0, 1, 50, 500, 998):  # prod_{i<=t} f((i+1)/T) / f(i/T) = f((t+1)/T) / f(0): no beta is clipped yet
        assert a[t].item() == pytest.approx(f((t + 1) / 1000) / f(0), rel=1e-9)
    assert a[999].item() == pytest.approx(a[998].item() * 0.001, rel=1e-9)  # the last beta is capped at 0.999


def test_linear_schedule_values():
    s = DiffusionSchedule("linear", 1000)
    assert s.betas[0].item() == pytest.approx(1e-4) and s.betas[-1].item() == pytest.approx(0.02)
    ref = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000, dtype=np.float64))
    for t in (0, 100, 500, 999):
        assert s.alphas_cumprod[t].item() == pytest.approx(ref[t], rel=1e-12)


def test_q_sample_and_the_x0_eps_conversions():
    s = DiffusionSchedule("cosine")
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.rand(2, 3, 4, 4, generator=g) * 2 - 1, torch.randn(2, 3, 4, 4, generator=g)
    t = torch.tensor([10, 700])
    xt = s.q_sample(x0.double(), t, eps.double())
    a = s.alphas_cumprod[t].view(2, 1, 1, 1)
    torch.testing.assert_close(xt, a.sqrt() * x0.double() + (1 - a).sqrt() * eps.double())
    torch.testing.assert_close(s.x0_from_eps(xt, t, eps.double()), x0.double())
    torch.testing.assert_close(s.eps_from_x0(xt, t, x0.double()), eps.double())
    assert network_time(torch.tensor([0, 999])).tolist() == [1, 1000]  # 0 stays the clean step's


def test_ddim_grid_is_the_references():
    grid = ddim_grid(1000, 125)
    assert grid[:3] == [999, 991, 983] and grid[-2:] == [7, 0] and len(grid) == 126
    assert ddim_grid(1000, 1) == [999, 0]
    assert ddim_grid(1000, 1000) == list(range(999, 0, -1)) + [0]
    with pytest.raises(UserError, match="--steps"):
        ddim_grid(1000, 1001)


def one_step(eta: float, clip: bool, x: float, eps: float, t: int = 991, z: float = 0.0) -> float:
    """The reference's DDIM update on one number, written out."""
    s = DiffusionSchedule("cosine")
    a, ap = s.alphas_cumprod[t].item(), s.alphas_cumprod[t - 8].item()
    x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
    if clip:
        x0 = max(-1.0, min(1.0, x0))
    e = (x / math.sqrt(a) - x0) / math.sqrt(1 / a - 1)
    sigma = eta * math.sqrt((1 - ap) / (1 - a)) * math.sqrt(1 - a / ap)
    return math.sqrt(ap) * x0 + math.sqrt(1 - ap - sigma ** 2) * e + sigma * z


@pytest.mark.parametrize("x, eps", [(0.3, 0.2), (0.9, -0.95)])  # the second clips x0 (about 16 before clipping)
def test_ddim_step_matches_a_hand_computed_update(x, eps):
    sched = DDIMScheduler(steps=125, eta=0.0)
    sched.set_schedule(DiffusionSchedule("cosine"), clip=True)
    out = torch.tensor([[[[0.0]], [[eps]]]], dtype=torch.float64)  # [x0 head | eps head], C = 1
    sample = torch.tensor([[[[x]]]], dtype=torch.float64)
    got = sched.step(out, 991, sample).prev_sample.item()
    assert got == pytest.approx(one_step(0.0, True, x, eps), rel=1e-10)
    sched = DDIMScheduler(steps=125, eta=1.0)
    sched.set_schedule(DiffusionSchedule("cosine"), clip=True)
    g = torch.Generator().manual_seed(3)
    z = torch.randn((1, 1, 1, 1), generator=torch.Generator().manual_seed(3), dtype=torch.float64).item()
    got = sched.step(out, 991, sample, generator=g).prev_sample.item()
    assert got == pytest.approx(one_step(1.0, True, x, eps, z=z), rel=1e-10)


def test_the_last_grid_step_returns_x0_and_eta0_ignores_the_generator():
    sched = DDIMScheduler(steps=4, eta=0.0)
    sched.set_schedule(DiffusionSchedule("cosine"), clip=True)
    out, x = torch.randn(2, 6, 4, 4), torch.randn(2, 3, 4, 4)
    last = sched.step(out, 0, x)
    torch.testing.assert_close(last.prev_sample, last.pred_original_sample)
    assert last.prev_sample.abs().max() <= 1.0
    a = sched.step(out, 999, x, generator=torch.Generator().manual_seed(0)).prev_sample
    b = sched.step(out, 999, x, generator=torch.Generator().manual_seed(1)).prev_sample
    assert torch.equal(a, b)  # eta = 0: deterministic DDIM


def tiny_umd(num_classes: int = 0, seed: int = 0) -> UMD:
    torch.manual_seed(seed)
    m = UMD(UMDConfig(image_size=16, patch_size=4, embed_dim=32, depth=1, decoder_depth=1, num_heads=2,
                      num_classes=num_classes))
    for p in m.parameters():  # away from the zero init, so that time and labels matter
        torch.nn.init.normal_(p, std=0.1)
    return m.eval()


def test_cfg_is_uncond_plus_scale_times_the_difference_on_the_whole_output():
    m = tiny_umd(num_classes=3)
    x = torch.randn(2, 3, 16, 16)
    labels = torch.tensor([0, 2])
    time = network_time(torch.full((2,), 500))
    cond = m(x, time, labels)[0]
    uncond = m(x, time, torch.full_like(labels, m.null_class))[0]
    with torch.no_grad():
        guided = DDIMScheduler.model_output(m, x, 500, labels, 2.5)
        torch.testing.assert_close(guided, uncond + 2.5 * (cond - uncond), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(DDIMScheduler.model_output(m, x, 500, labels, 1.0), cond)
        torch.testing.assert_close(DDIMScheduler.model_output(m, x, 500, labels, 0.0), uncond, atol=1e-6, rtol=1e-5)


def test_generate_is_per_image_deterministic_and_class_balanced():
    m = tiny_umd(num_classes=3)
    sched = DDIMScheduler(steps=5, cfg=2.0)
    gens = lambda first, n: [torch.Generator().manual_seed(100 + first + i) for i in range(n)]  # noqa: E731
    assert sched.labels(m, 5, start=0).tolist() == [0, 1, 2, 0, 1]
    assert sched.labels(m, 2, start=4).tolist() == [1, 2]
    whole = sched.generate(m, 5, generator=gens(0, 5))
    parts = torch.cat([sched.generate(m, 3, generator=gens(0, 3)), sched.generate(m, 2, generator=gens(3, 2), start=3)])
    torch.testing.assert_close(whole, parts, atol=1e-5, rtol=1e-5)
    assert whole.shape == (5, 3, 16, 16) and whole.abs().max() <= 1.0
    assert DDIMScheduler(steps=5, class_label="1,2").labels(m, 3, start=1).tolist() == [2, 1, 2]


def test_bf16_sampling_runs_the_model_in_bf16_and_stays_near_fp32():
    m = tiny_umd(num_classes=3)
    seen = []
    m.register_forward_hook(lambda mod, args, out: seen.append(out[0].dtype))
    gens = lambda: [torch.Generator().manual_seed(7 + i) for i in range(2)]  # noqa: E731
    fp32 = DDIMScheduler(steps=4, eta=0.0).generate(m, 2, generator=gens())
    assert set(seen) == {torch.float32}
    seen.clear()
    bf16 = DDIMScheduler(steps=4, eta=0.0, precision="bf16").generate(m, 2, generator=gens())
    assert set(seen) == {torch.bfloat16} and bf16.dtype == torch.float32
    assert (bf16 - fp32).abs().mean() < 0.05 and not torch.equal(bf16, fp32)  # a few clipped pixels may flip


def test_class_and_guidance_options_are_checked_against_the_model():
    uncond, cond = tiny_umd(), tiny_umd(num_classes=3)
    with pytest.raises(UserError, match="unconditional"):
        DDIMScheduler(class_label="1").labels(uncond, 2)
    with pytest.raises(UserError, match="--cfg"):
        DDIMScheduler(cfg=2.0).guidance(uncond)
    with pytest.raises(UserError, match="0..2"):
        DDIMScheduler(class_label="3").labels(cond, 2)
    with pytest.raises(UserError, match="--class"):
        DDIMScheduler(class_label="cat").labels(cond, 2)
    assert DDIMScheduler().guidance(cond) == 1.5 and DDIMScheduler().guidance(uncond) == 1.0


@pytest.mark.parametrize("t", [999, 503, 15])
def test_a_step_off_the_ends_equals_diffusers_ddim_with_clipped_eps(t):
    """diffusers' DDIMScheduler (cosine betas, trailing spacing, x0 clipping, ε re-derived from the clipped x0) takes
    the same step as ours wherever the grids agree: everywhere but the final t = 0 call, which it lacks."""
    diffusers = pytest.importorskip("diffusers")
    theirs = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=True,
                                     set_alpha_to_one=False, timestep_spacing="trailing")
    theirs.set_timesteps(125)
    ours = DDIMScheduler(steps=125, eta=1.0)
    ours.set_schedule(DiffusionSchedule("cosine"), clip=True)
    assert theirs.timesteps.tolist() == ours.timesteps[:-1]
    t = ours.timesteps[min(range(125), key=lambda i: abs(ours.timesteps[i] - t))]
    g = torch.Generator().manual_seed(0)
    x, out = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 6, 8, 8, generator=g) * 1.5
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
    mine = ours.step(out, t, x, generator=torch.Generator().manual_seed(7)).prev_sample
    ref = theirs.step(out[:, 3:], t, x, eta=1.0, use_clipped_model_output=True, variance_noise=z).prev_sample
    torch.testing.assert_close(mine, ref, atol=2e-4, rtol=1e-4)
