"""The method-agnostic training engine: optimisation, checkpoints, distribution, logging."""
