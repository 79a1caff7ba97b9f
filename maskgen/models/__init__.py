"""Models. Each file holds one architecture; `registry.create_model(name)` builds any of them."""
from .registry import create_model, model_class, register_model  # noqa: F401
