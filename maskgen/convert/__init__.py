"""Converters from official checkpoints to maskgen weights directories (safetensors + config.json)."""
