"""Importing this module registers every model class."""
from . import vqgan  # noqa: F401
