"""A frozen tokenizer carried by a model (MAGE, the fine-tuned MAGE classifier) without being part of it.

`model.tokenizer` is NOT a registered sub-module: it is absent from `state_dict()` / `parameters()` (never
trained, never in the optimizer), kept in eval mode, moved by `.to()` / `.cuda()` / `.float()` with the model,
and saved by `models.save_pretrained` in the `tokenizer/` sub-folder of a weights directory (re-attached by
`maskgen.from_pretrained`).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from torch import nn

from .pretrained import from_pretrained, save_pretrained

TOKENIZER_DIR = "tokenizer"


class FrozenTokenizerMixin:
    """Mix into an nn.Module (before nn.Module in the bases); call nothing in __init__."""

    @property
    def tokenizer(self) -> nn.Module | None:
        """The frozen tokenizer (encode(images) -> codes [B, h, w], decode(codes) -> images), or None."""
        return self.__dict__.get("_tokenizer")

    @tokenizer.setter
    def tokenizer(self, tok: nn.Module | None) -> None:
        self.set_tokenizer(tok)

    def check_tokenizer(self, tok: nn.Module) -> None:
        """Raise UserError when `tok` does not fit the model (override; default: anything goes)."""

    def set_tokenizer(self, tok: nn.Module | None):
        """Attach (or detach with None) a tokenizer, frozen and on the model's device. Returns self."""
        if tok is not None:
            self.check_tokenizer(tok)
            tok.requires_grad_(False).eval()
            ref = next(iter(self.parameters()), None)
            if ref is not None and ref.device.type != "meta":
                tok.to(ref.device)
        self.__dict__["_tokenizer"] = tok
        return self

    def __setattr__(self, name, value):
        if name == "tokenizer":  # nn.Module.__setattr__ would register a Module value as a sub-module
            self.set_tokenizer(value)
        else:
            super().__setattr__(name, value)

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        if self.tokenizer is not None:
            self.tokenizer._apply(fn, *args, **kwargs)
        return self

    def save_attachments(self, directory: str | os.PathLike) -> None:
        """Write the tokenizer (if any) as a weights directory `directory/tokenizer/`, replacing an old one."""
        sub = Path(directory) / TOKENIZER_DIR
        if sub.exists():
            shutil.rmtree(sub)
        if self.tokenizer is not None:
            save_pretrained(self.tokenizer, sub)

    def load_attachments(self, directory: str | os.PathLike) -> None:
        """Attach the tokenizer saved in `directory/tokenizer/`, if there is one."""
        sub = Path(directory) / TOKENIZER_DIR
        if (sub / "config.json").is_file():
            self.set_tokenizer(from_pretrained(sub))
