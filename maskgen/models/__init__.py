"""Models: one architecture per file, each registered in `maskgen.registry.MODELS` by name.

Importing this package registers every built-in model; `from_pretrained(DIR)` rebuilds any registered model
from a weights directory, `create_model(name, **config)` builds one from scratch.
"""
from . import classifier, diffusers_vae, mae, mae_classifier, mage, umd, umd_classifier, vqgan  # noqa: F401  (registers the built-in models)
from .pretrained import (create_model, from_pretrained, model_config_dict, save_pretrained,  # noqa: F401
                         untrained_model)
