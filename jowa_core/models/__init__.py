"""Neural networks: the VQ-VAE frame tokenizer and the world-action transformer."""

from jowa_core.models.tokenizer import Tokenizer
from jowa_core.models.world_action import KVCache, WorldActionModel, WorldActionOutput

__all__ = ["KVCache", "Tokenizer", "WorldActionModel", "WorldActionOutput"]
