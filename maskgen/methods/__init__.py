"""Trainable methods: `maskgen train METHOD` looks METHOD up here.

A method is an `nn.Module` with `forward_loss(batch) -> (loss, logs)` (see `base.Method`); its spec
names the config dataclasses of its `model` and `loss` sections and how to build it from a `Config`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..errors import UserError


@dataclass(frozen=True)
class MethodSpec:
    name: str
    summary: str
    model_config: type
    loss_config: type
    build: Callable  # (Config) -> Method


def _specs() -> dict[str, MethodSpec]:
    from ..eval import finetune
    from . import mage, tokenizer

    return {s.name: s for s in (tokenizer.SPEC, mage.SPEC, finetune.SPEC)}


def method_names() -> list[str]:
    return list(_specs())


def get_method(name: str) -> MethodSpec:
    specs = _specs()
    if name not in specs:
        raise UserError(f"unknown method '{name}' (available: {', '.join(specs)})")
    return specs[name]
