"""megatron-erc: Megatron-core RL post-training with Entropy Ratio Clipping."""

__version__ = "0.1.0"
