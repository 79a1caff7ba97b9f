"""maskgen: masked generative encoders for representation learning and image generation (MAGE and MAGE-C, MAE and
MR-MAE, UMD). Every CLI command is a function here; `from_pretrained(DIR)` returns a saved
model.

Attributes are loaded on first use, so that `import maskgen.models` (or any lower layer) does not import the
training engine or the evaluations.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {"from_pretrained": "maskgen.models", "save_pretrained": "maskgen.models",
            **{name: "maskgen.api" for name in ("build_config", "train", "show_config", "list_presets", "convert",
                                                "cache_tokens", "cache_teacher", "generate_images", "edit_image",
                                                "reconstruct_image", "extract_features", "compute_features",
                                                "train_linear_probe", "knn_classify", "fewshot_eval",
                                                "evaluate_fid")},
            "run_demo": "maskgen.demo", "run_bench": "maskgen.bench"}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'maskgen' has no attribute {name!r}")
