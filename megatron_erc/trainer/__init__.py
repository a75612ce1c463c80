"""The RL trainer: actor (megatron model, optimizer, pipeline schedule), SFT warm start."""
