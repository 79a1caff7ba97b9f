"""maskgen: masked generative encoders (MAGE, MAGE-C, MAE, MR-MAE, UMD) for representation learning and
image generation. Every CLI command is a function here; `from_pretrained(DIR)` returns a saved model."""
from .api import list_presets, show_config, train
from .weights import from_pretrained

__version__ = "0.1.0"
__all__ = ["from_pretrained", "train", "show_config", "list_presets", "__version__"]
