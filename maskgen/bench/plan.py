"""What `maskgen bench cifar10` runs: the methods with their presets, and the protocol of the full and quick runs.

Every method trains through its own `*-cifar10-cpu` preset (`quick`: its `*-tiny` preset) and the usual
`maskgen train`, with only the schedule length changed so that every method sees the same number of images. An
"image" is one encoder input: MAGE-C trains on two views of each image per step, so it sees each image twice
as often and runs half the epochs (the compute its preset was tuned at).
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class MethodSpec:
    """One method of the comparison: `method` is the registered training method, `preset` / `quick_preset` its
    presets, `extra` / `quick_extra` overrides on top of them, `views` encoder inputs per image and step,
    `tokens`: it trains on the tokenizer's codes, `arch`: the architecture its untrained baseline stands for."""

    name: str
    method: str
    preset: str
    quick_preset: str
    arch: str
    views: int = 1
    tokens: bool = False
    extra: tuple[str, ...] = ()
    quick_extra: tuple[str, ...] = ()
    label: str = ""


METHODS: dict[str, MethodSpec] = {s.name: s for s in (
    MethodSpec("mage", "mage", "mage-cifar10-cpu", "mage-tiny", "mage", tokens=True, label="MAGE"),
    MethodSpec("mage-c", "mage", "mage-c-cifar10-cpu", "mage-tiny", "mage", views=2, tokens=True, label="MAGE-C",
               quick_extra=("mage.contrastive_weight=0.1", "mage.contrastive_temperature=0.2",
                            "mage.contrastive_hidden_dim=64", "mage.contrastive_dim=32", "data.views=2")),
    MethodSpec("mae", "mae", "mae-cifar10-cpu", "mae-tiny", "mae", label="MAE"),
    MethodSpec("mrmae", "mrmae", "mrmae-cifar10-cpu", "mrmae-tiny", "mae", label="MR-MAE"),
    MethodSpec("umd", "umd", "umd-cifar10-cpu", "umd-tiny", "umd", label="UMD"),
)}

TOKENIZER = MethodSpec("tokenizer", "tokenizer", "tokenizer-cifar10", "tokenizer-tiny", "tokenizer",
                       label="VQGAN tokenizer latent (MAGE's input)")


@dataclass(frozen=True)
class Protocol:
    """How much of everything a run does. `images`: images seen per method (None: from the budget, calibrated);
    `train_limit`: a fixed subset of the training images (0: all); `eval_*_limit`: images the final evaluation fits
    on / tests on (0: all); `curve_*`: the cheaper evaluation of the checkpoints along the way (kNN and linear
    probe on a fixed subset of training images against the test images); `fd_images`: samples (and test images)
    of FD-lite0; `token_views`: views per image of the token cache (0: tokenize on the fly)."""

    quick: bool
    images: int | None = None
    train_limit: int = 0
    tokenizer_overrides: tuple[str, ...] = ("vis.every=0",)
    token_views: int = 2
    eval_train_limit: int = 0
    eval_test_limit: int = 0
    curve_points: int = 4
    curve_train_limit: int = 10_000
    curve_test_limit: int = 0
    probe_epochs: int = 100
    shots: tuple[int, ...] = (1, 5, 10)
    seeds: tuple[int, ...] = (0, 1, 2)
    fd_images: int = 2000
    panel_images: int = 8
    calibration_steps: int = 30
    sampler_options: dict = field(default_factory=dict)


FULL = Protocol(quick=False)
QUICK = Protocol(quick=True, images=384, train_limit=256, tokenizer_overrides=("train.max_steps=16",),
                 token_views=0, eval_train_limit=300, eval_test_limit=100, curve_points=2, curve_train_limit=150,
                 curve_test_limit=100, probe_epochs=20, fd_images=24, panel_images=4,
                 sampler_options={"umd": {"steps": 4}, "mage": {"num_iter": 4}})


def parse_methods(text: str) -> list[str]:
    """'mage,mae' -> ['mage', 'mae'] in the table's order; unknown names are a ValueError naming the choices."""
    names = [n.strip().lower() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in METHODS]
    if bad or not names:
        raise ValueError(f"unknown method(s) {', '.join(bad) or '(none)'}: choose from {', '.join(METHODS)}")
    return [n for n in METHODS if n in names]


def images_for_budget(budget_hours: float, rates: dict[str, float]) -> int:
    """Images seen per method so that the slowest of `rates` (images per second, measured here) trains for
    `budget_hours`: the others finish sooner. Rounded down to a multiple of 1,000 (at least 1,000)."""
    slowest = min(rates.values())
    return max(1000, int(budget_hours * 3600 * slowest) // 1000 * 1000)
