"""Moved to :mod:`megatron_erc.config`; this alias remains for ``slurm/train.sbatch`` until it
imports ``megatron_erc.config`` (then delete this file)."""

from megatron_erc.config import ConfigError, from_dict, load_config, to_dict

__all__ = ["ConfigError", "from_dict", "load_config", "to_dict"]
