"""Supervised warm start on prompt/completion pairs, through the same actor as RL.

Sequences are ``prompt + completion + eos``; only completion tokens (and eos) enter the
loss, a token-mean over the whole mini-batch.

megatron-core is imported inside the functions that use it: it takes seconds to
import, and the commands check their inputs before it loads.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import torch

from megatron_erc.checkpoint.hf import SafetensorsWriter
from megatron_erc.checkpoint.io import copy_side_files, publish, staging_dir
from megatron_erc.trainer.actor import Actor
from megatron_erc.trainer.batch import MicroBatch, global_token_count, split
from megatron_erc.trainer.config import SFTConfig
from megatron_erc.trainer.metrics import MetricsWriter
from megatron_erc.trainer.preflight import check_sft
from megatron_erc.trainer.run import build_actor, setup_parallel


def pack_sft_batch(tokenizer, prompts: list[str], completions: list[str], seq_len: int,
                   device: torch.device | str = "cpu") -> MicroBatch:
    """``tokens``, ``labels``, ``loss_mask`` ``[b, seq_len]`` for prompt/completion pairs, on
    ``device``.

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
    return MicroBatch(tokens=tokens[:, :-1].contiguous(), labels=tokens[:, 1:].contiguous(),
                      loss_mask=mask[:, 1:].contiguous()).to(device)


def sft_step(actor: Actor, micro_batches: list[MicroBatch], chunk_mb: int = 64) -> dict:
    """One optimizer step of token-mean NLL over ``micro_batches`` (this DP rank's share)."""
    num_tokens = global_token_count(micro_batches, dp_group=actor.dp_group)

    def loss_fn(logits, batch):
        logp, _ = actor.logprobs(logits, batch.labels, chunk_mb=chunk_mb)
        mask = batch.loss_mask
        loss = -(logp * mask).sum() / num_tokens
        return loss, {"sft/loss": loss.detach().clone()}

    metrics = actor.forward_backward(micro_batches, loss_fn)
    applied, grad_norm = actor.step()
    loss = float(sum(m["sft/loss"] for m in metrics)) if metrics else float("nan")
    return {"sft/loss": loss, "grad_norm": grad_norm, "skipped": not applied}



def run_sft(cfg: SFTConfig, actor=None, log=print) -> tuple[Path, float]:
    """Train ``cfg.run.steps`` steps and export the model as an HF directory."""
    from megatron.core import parallel_state as ps

    inputs, examples = check_sft(cfg)  # every rank, before any collective
    tokenizer = inputs.tokenizer
    setup_parallel(cfg)
    actor = actor or build_actor(cfg)
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    rng = random.Random(cfg.run.seed)
    writer = MetricsWriter(cfg.run.dir, enabled=torch.distributed.get_rank() == 0)
    loss = float("nan")
    for step in range(1, cfg.run.steps + 1):
        batch = rng.sample(examples, min(cfg.batch_size, len(examples)))[dp_rank::dp]
        packed = pack_sft_batch(tokenizer, [p for p, _ in batch], [c for _, c in batch],
                                cfg.run.seq_len, actor.device)
        m = sft_step(actor, split(packed, cfg.run.micro_batch_size), cfg.logprob_chunk_mb)
        loss = m["sft/loss"]
        writer.log({"sft_step": step, **m}, step_key="sft_step")
        if step % 50 == 0 or step == cfg.run.steps:
            log(f"[sft] step {step:4d}/{cfg.run.steps}  loss {loss:.3f}")
    writer.close()
    out = Path(cfg.output_dir or Path(cfg.run.dir) / "hf")
    export_hf(actor, out, cfg.model)
    return out, loss


def export_hf(actor, out: Path, model_cfg) -> None:
    """Write the actor as an HF directory (TP shards gathered, every pipeline stage's layers
    brought to rank 0, which writes; collective). The starting model's tokenizer and
    generation files, and a SentencePiece ``model.tokenizer`` file, travel with the weights."""

    rank0 = torch.distributed.get_rank() == 0
    if rank0:
        tmp = staging_dir(out)
        writer = SafetensorsWriter(tmp, 2 << 30)
    for name, tensor in actor.full_hf_weights():
        if rank0:
            writer.add(name, tensor)
    if rank0:
        writer.close()
        (tmp / "config.json").write_text(json.dumps(actor.hf_config.to_dict(), indent=2))
        copy_side_files(Path(model_cfg.path), tmp, skip=("config.json",))
        if model_cfg.tokenizer and Path(model_cfg.tokenizer).is_file():
            shutil.copy2(model_cfg.tokenizer, tmp / Path(model_cfg.tokenizer).name)
        publish(tmp, out)
    torch.distributed.barrier()
