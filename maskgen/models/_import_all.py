"""Importing this module registers every model class."""
from . import mage, vqgan  # noqa: F401
