"""Importing this module registers every model class."""
from . import mage, vqgan  # noqa: F401
from ..eval import classifier  # noqa: F401,E402  (the fine-tuned MAGE classifier, 'mage-classifier')
