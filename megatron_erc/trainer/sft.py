"""Supervised warm start on prompt/completion pairs, through the same actor as RL.

Sequences are ``prompt + completion + eos``; only completion tokens (and eos) enter the
loss, a token-mean over the whole mini-batch.
"""

from __future__ import annotations

import torch

from megatron_erc.trainer.actor import Actor


def pack_sft_batch(tokenizer, prompts: list[str], completions: list[str], seq_len: int) -> dict:
    """``tokens``, ``labels``, ``loss_mask`` ``[b, seq_len]`` for prompt/completion pairs.

    Raises if a pair does not fit in ``seq_len`` (say which, so the caller can raise it).
    """
    b = len(prompts)
    pad = tokenizer.pad_token_id
    tokens = torch.full((b, seq_len + 1), pad, dtype=torch.long)
    mask = torch.zeros(b, seq_len + 1)
    for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        p_ids = tokenizer.encode(p)
        c_ids = tokenizer.encode(c) + [tokenizer.eos_token_id]
        ids = p_ids + c_ids
        if len(ids) > seq_len + 1:
            raise ValueError(f"example {i} has {len(ids)} tokens > seq_len+1={seq_len + 1}; "
                             "raise seq_len")
        tokens[i, : len(ids)] = torch.tensor(ids)
        mask[i, len(p_ids): len(ids)] = 1.0
    return {"tokens": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous(),
            "loss_mask": mask[:, 1:].contiguous()}


def sft_step(actor: Actor, micro_batches: list[dict]) -> dict:
    """One optimizer step of token-mean NLL over ``micro_batches`` (this DP rank's share)."""
    num_tokens = _global_tokens(actor, micro_batches)

    def loss_fn(logits, batch):
        logp, _ = actor.logprobs(logits, batch["labels"])
        mask = batch["loss_mask"]
        loss = -(logp * mask).sum() / num_tokens
        return loss, {"sft/loss": loss.detach().clone()}

    metrics = actor.forward_backward(micro_batches, loss_fn)
    applied, grad_norm = actor.step()
    loss = float(sum(m["sft/loss"] for m in metrics)) if metrics else float("nan")
    return {"sft/loss": loss, "grad_norm": grad_norm, "skipped": not applied}


def _global_tokens(actor: Actor, micro_batches: list[dict]) -> float:
    """Response tokens of the mini-batch summed over micro-batches and data-parallel ranks."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    n = torch.tensor(sum(float(mb["loss_mask"].sum()) for mb in micro_batches),
                     dtype=torch.float64)
    if dist.is_initialized() and ps.get_data_parallel_world_size() > 1:
        dist.all_reduce(n, group=ps.get_data_parallel_group())
    return max(float(n), 1.0)
