"""Checks shared by the official-checkpoint converters."""
from __future__ import annotations

import torch
from torch import nn

from ..errors import UserError
from ..weights import safe_torch_load


def first_keys(keys: list[str], n: int = 3) -> str:
    """'a, b, c (+2 more)'."""
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def check_state_dict(model: nn.Module, sd: dict[str, torch.Tensor], inferred: str) -> None:
    """Raise UserError unless `sd` has exactly the model's keys, with equal shapes and floating dtypes.
    `inferred` describes the config read off the shapes, for the message (e.g. "VQGAN (ch=128, ...)")."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    wrong = [f"{k} {list(sd[k].shape)} {str(sd[k].dtype).removeprefix('torch.')} "
             f"(expected {list(expected[k].shape)} float)"
             for k in expected if k in sd and (sd[k].shape != expected[k].shape or not sd[k].is_floating_point())]
    problems = [f"{what}: {first_keys(keys)}" for what, keys in
                (("missing", missing), ("unexpected", unexpected), ("wrong shape/dtype", wrong)) if keys]
    if problems:
        raise UserError(f"checkpoint does not match the inferred {inferred}: " + "; ".join(problems))


def tensor_shape(sd: dict, key: str, ndim: int, what: str) -> tuple[int, ...]:
    """The shape of `sd[key]`, which must exist and have `ndim` dimensions (else a UserError saying the file is not
    `what`)."""
    if key not in sd:
        raise UserError(f"missing tensor '{key}': not {what}")
    if sd[key].dim() != ndim:
        raise UserError(f"tensor '{key}' has shape {list(sd[key].shape)}, expected {ndim} dimensions")
    return tuple(sd[key].shape)


def read_state_dict(src, required_key: str, what: str) -> dict[str, torch.Tensor]:
    """The state dict of an official checkpoint file: `checkpoint['model']`, or the file itself when it is a bare
    state dict (read without unpickling code). It must hold only tensors and `required_key` (else a UserError
    saying the file is not `what`)."""
    obj = safe_torch_load(src)
    if not isinstance(obj, dict):
        raise UserError(f"{src}: expected a dict of tensors, got {type(obj).__name__}")
    sd = obj["model"] if isinstance(obj.get("model"), dict) else obj
    not_tensors = [str(k) for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise UserError(f"{src}: not {what}, these entries are not tensors: {first_keys(not_tensors)}")
    if required_key not in sd:
        raise UserError(f"{src}: missing tensor '{required_key}': not {what}")
    return sd
