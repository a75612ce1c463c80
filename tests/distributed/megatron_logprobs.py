"""Rank function: the Megatron actor's log-probs of given (prompt, response) pairs."""

from __future__ import annotations

import torch


def megatron_logprobs(rank: int, world: int, model_dir: str, pairs: list, temperature: float,
                      tp: int = 1, sequence_parallel: bool = False) -> list[list[float]]:
    """Load the HF directory into a Megatron actor (TP=tp) and score each pair's response
    tokens with the vocab-parallel op: ``log_softmax(logits / T)`` at the sampled ids.
    Under sequence parallelism each sequence is padded at its end to a multiple of ``tp``
    (the causal model's earlier positions do not see the padding)."""
    from megatron_erc.trainer.config import TrainConfig
    from megatron_erc.trainer.run import build_actor, setup_parallel

    cfg = TrainConfig()
    cfg.model.path = model_dir
    cfg.parallel.tp, cfg.parallel.pad_vocab_multiple = tp, 1
    cfg.parallel.sequence_parallel = sequence_parallel
    setup_parallel(cfg)
    actor = build_actor(cfg)
    out = []
    with torch.no_grad():
        for prompt, response in pairs:
            ids = torch.tensor([prompt + response])
            n = ids.shape[1]
            pad = -n % tp if sequence_parallel else 0
            padded = torch.cat([ids, ids.new_zeros(1, pad)], dim=1)
            pos = torch.arange(n + pad)[None]
            logits = actor.model[0].module(padded, pos, None)[:, :n]
            logp, _ = actor.logprobs(logits[:, :-1], ids[:, 1:], temperature=temperature)
            out.append(logp[0, len(prompt) - 1:].tolist())
    return out
