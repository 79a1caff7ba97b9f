"""Trainable methods, each registered in `maskgen.registry.METHODS`: `maskgen train NAME` looks NAME up there.

Importing this package registers the built-in methods. A method is a `maskgen.engine.method.Method`: it owns
its objective (`forward_loss`) and its data path (`build_dataset`); see that class for the contract.
"""
from . import finetune, mae, mage, mrmae, tokenizer, umd  # noqa: F401  (registers the built-in methods)
