"""Pure tensor math for RL post-training: policy losses (surrogates: DAPO clip-higher, GPPO /
CE-GPPO, CISPO, GSPO, SAPO, DPPO; dual clip, TIS; regularizers: Clip-Cov, KL-Cov, 80/20,
entropy bonus), the ERC mask, GRPO advantages and DAPO's sampling filters.

No collectives and no Megatron parallel state: callers pass global token counts in.
"""

from megatron_erc.algorithms.advantages import group_index, grpo_advantages
from megatron_erc.algorithms.config import (
    REGULARIZERS,
    SURROGATES,
    ErcConfig,
    OverlongConfig,
    PolicyLossConfig,
)
from megatron_erc.algorithms.erc import entropy_ratio, erc_keep_mask, stop_gradient_outside
from megatron_erc.algorithms.losses import (
    NON_ADDITIVE_METRICS,
    POLICY_LOSS_METRICS,
    policy_loss,
    positive_nll,
    positive_token_mask,
)
from megatron_erc.algorithms.sampling import (
    GroupFilterResult,
    apply_overlong_shaping,
    dynamic_sampling_filter,
    overlong_penalty,
)

__all__ = [
    "NON_ADDITIVE_METRICS",
    "POLICY_LOSS_METRICS",
    "REGULARIZERS",
    "SURROGATES",
    "ErcConfig",
    "GroupFilterResult",
    "OverlongConfig",
    "PolicyLossConfig",
    "apply_overlong_shaping",
    "dynamic_sampling_filter",
    "entropy_ratio",
    "erc_keep_mask",
    "group_index",
    "grpo_advantages",
    "overlong_penalty",
    "policy_loss",
    "positive_nll",
    "positive_token_mask",
    "stop_gradient_outside",
]
