"""Greedy decoding straight on the megatron actor (TP=1/PP=1; no KV cache).

Only for the smoke demo and checks on a tiny model; rollouts use an engine from
``megatron_erc.rollout``.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def greedy_generate(model, tokenizer, prompts: list[str], max_new_tokens: int,
                    vocab_size: int) -> list[str]:
    """Left-padded batch greedy decoding with the full sequence re-run each step."""
    module = model.module if hasattr(model, "module") else model
    module.eval()
    ids = [tokenizer.encode(p) for p in prompts]
    outs: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    for _ in range(max_new_tokens):
        seqs = [a + o for a, o in zip(ids, outs, strict=True)]
        width = max(len(s) for s in seqs)
        # Right-pad and read each row's logits at its own last position (causal attention
        # makes padding after it irrelevant).
        tokens = torch.full((len(seqs), width), tokenizer.pad_token_id, dtype=torch.long)
        for i, s in enumerate(seqs):
            tokens[i, : len(s)] = torch.tensor(s)
        pos = torch.arange(width).expand_as(tokens)
        logits = module(tokens, pos, None)[..., :vocab_size]
        for i, s in enumerate(seqs):
            if done[i]:
                continue
            nxt = int(logits[i, len(s) - 1].argmax())
            if nxt == tokenizer.eos_token_id:
                done[i] = True
            else:
                outs[i].append(nxt)
        if all(done):
            break
    module.train()
    return [tokenizer.decode(o) for o in outs]
