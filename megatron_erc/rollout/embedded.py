"""Rollouts with Hugging Face transformers in the trainer's own process.

Used where vLLM is not installed and as the independent reference for the vLLM engine in tests.
One batched decode loop over a ``DynamicCache`` (left-padded prompts, explicit position ids), the
sampling rules of vLLM's sampler (temperature, then the top-p filter, then a draw), and fp32
log-probs of the distribution sampled from (see ``engine.py`` for the convention).
"""

from __future__ import annotations

import os

import torch
from torch import nn

from megatron_erc.models.moe import checkpoint_views

from . import fast_decode
from .engine import Sample, SamplingConfig, StreamedWeightLoads


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Mask (to -inf) the tokens outside the nucleus of mass ``top_p``; ``logits`` is ``[B, V]``.

    Same rule as vLLM's ``apply_top_k_top_p``: in ascending order, drop tokens whose cumulative
    probability is <= 1 - top_p, always keeping the most likely token.
    """
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=False)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop = cum <= 1 - top_p
    drop[:, -1] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return logits.scatter(-1, order, sorted_logits)


class RowUniforms:
    """Pre-drawn uniforms ``table [rows, steps]``: decode step ``t`` takes column ``t``, so
    when each row is drawn from its own seed (``from_seeds``) its samples depend on that seed
    alone, not on the batch it shares (one generator call per row, not per token)."""

    def __init__(self, table: torch.Tensor):
        self.table, self.step = table, 0

    @classmethod
    def from_seeds(cls, seeds: list[int], steps: int, device: torch.device) -> RowUniforms:
        rows = [torch.rand(steps, generator=torch.Generator().manual_seed(s)) for s in seeds]
        return cls((torch.stack(rows) if rows else torch.empty(0, steps)).to(device))

    def rows(self, start: int, stop: int) -> RowUniforms:
        return RowUniforms(self.table[start:stop])

    def next(self) -> torch.Tensor:
        """``[rows, 1]`` uniforms of the next decode step."""
        self.step += 1
        return self.table[:, self.step - 1: self.step]


Generators = torch.Generator | RowUniforms | None
"""One generator for the whole batch, per-row uniforms, or None (global RNG)."""


def _inverse_cdf_draw(probs: torch.Tensor, generator: Generators) -> torch.Tensor:
    """One draw per row of ``probs [B, V]`` by inverting the CDF with one uniform per row.

    Exact like ``torch.multinomial`` but one random number per row instead of an
    exponential per vocabulary entry (the decode loop's largest cost after the matmuls).
    Tokens of probability 0 (outside the top-p nucleus) are never drawn.
    """
    cdf = probs.cumsum(dim=-1)
    if isinstance(generator, RowUniforms):  # rows independent of the batch they are in
        u = generator.next() * cdf[:, -1:]
    else:
        u = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp_(max=probs.shape[-1] - 1)


def sample_next(
    logits: torch.Tensor, sampling: SamplingConfig, generator: Generators
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row of fp32 ``logits [B, V]``; returns ``(tokens [B], logprobs [B])``."""
    logits = logits.float()
    if sampling.greedy:
        logp = logits.log_softmax(dim=-1)
        tokens = logits.argmax(dim=-1)
    else:
        logp = top_p_filter(logits / sampling.temperature, sampling.top_p).log_softmax(dim=-1)
        tokens = _inverse_cdf_draw(logp.exp(), generator)
    return tokens, logp.gather(-1, tokens[:, None]).squeeze(-1)


def _samples(tokens: list[list[int]], logprobs: list[list[float]], stopped: list[bool]
             ) -> list[Sample]:
    return [Sample(token_ids=t, logprobs=lp, finish_reason="stop" if s else "length")
            for t, lp, s in zip(tokens, logprobs, stopped, strict=True)]


class EmbeddedEngine(StreamedWeightLoads):
    """``RolloutEngine`` over a transformers causal LM (a local HF directory or a module).

    ``max_batch_size`` bounds how many sequences (prompts x n) decode together. ``fast``
    uses ``fast_decode`` (each prompt prefilled once, a preallocated KV cache) for Llama and
    Qwen2 configs; other models, and ``fast=False``, decode through the HF model's forward.
    """

    def __init__(
        self,
        model: str | os.PathLike | nn.Module,
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        max_batch_size: int = 256,
        fast: bool = True,
    ) -> None:
        if isinstance(model, nn.Module):
            self.model = model
        else:
            from transformers import AutoModelForCausalLM

            self.model = AutoModelForCausalLM.from_pretrained(os.fspath(model), dtype=dtype)
        self.model.to(device).eval()
        self.device = torch.device(device)
        self.max_batch_size = max_batch_size
        self.fast = fast
        self._fused: fast_decode.FusedWeights | None = None

    # --- generation -------------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self, prompt_token_ids: list[list[int]], sampling: SamplingConfig,
        seeds: list[int] | None = None,
    ) -> list[list[Sample]]:
        """``seeds[i]``: seed of prompt ``i``'s samples (each of its ``n`` rows draws from its
        own pre-drawn uniforms), so a prompt's responses do not depend on the batch it shares;
        otherwise ``sampling.seed`` seeds one generator for the whole call."""
        if any(len(p) == 0 for p in prompt_token_ids):
            raise ValueError("generate: every prompt needs at least one token.")
        self._require_complete()
        n, samples = sampling.n, []
        if seeds is not None:
            if len(seeds) != len(prompt_token_ids):
                raise ValueError(f"generate: {len(seeds)} seeds for {len(prompt_token_ids)} "
                                 "prompts")
            table = RowUniforms.from_seeds([hash((int(seed), j)) & (2**63 - 1) for seed in seeds
                                            for j in range(n)], sampling.max_tokens, self.device)
            gen_of = table.rows
        else:
            gen = None
            if sampling.seed is not None:
                gen = torch.Generator(device=self.device).manual_seed(sampling.seed)
            gen_of = lambda start, stop: gen  # noqa: E731
        if self.fast and n <= self.max_batch_size and fast_decode.supports(self.model.config):
            per_call = self.max_batch_size // n  # whole groups: a prompt is prefilled once
            for i in range(0, len(prompt_token_ids), per_call):
                samples += self._decode_fast(prompt_token_ids[i : i + per_call], sampling,
                                             gen_of(i * n, (i + per_call) * n))
        else:
            flat = [p for p in prompt_token_ids for _ in range(n)]
            for i in range(0, len(flat), self.max_batch_size):
                samples += self._decode(flat[i : i + self.max_batch_size], sampling,
                                        gen_of(i, i + self.max_batch_size))
        return [samples[i * n : (i + 1) * n] for i in range(len(prompt_token_ids))]

    def _decode_fast(
        self, prompts: list[list[int]], sampling: SamplingConfig, gen: Generators
    ) -> list[Sample]:
        if self._fused is None:  # weights change only through update sessions (_commit)
            self._fused = fast_decode.FusedWeights(self.model)
        return _samples(*fast_decode.decode(
            self.model, self._fused, prompts, sampling.n, sampling.max_tokens,
            lambda logits: sample_next(logits, sampling, gen), sampling.stop_token_ids,
            self.device))

    def _decode(
        self, prompts: list[list[int]], sampling: SamplingConfig, gen: Generators
    ) -> list[Sample]:
        logits, cache, mask, next_pos = fast_decode.left_padded_prefill(
            self.model, prompts, self.device)
        next_pos = next_pos[:, -1:] + 1
        stop = torch.tensor(sampling.stop_token_ids, dtype=torch.long, device=self.device)
        done = torch.zeros(len(prompts), dtype=torch.bool, device=self.device)
        tokens, logprobs = [], []
        for step in range(sampling.max_tokens):
            tok, lp = sample_next(logits, sampling, gen)
            tokens.append(tok)
            logprobs.append(lp)
            done |= torch.isin(tok, stop)
            if bool(done.all()) or step == sampling.max_tokens - 1:
                break
            # Finished rows keep decoding (cheaper than re-packing the cache); their extra
            # tokens are cut by cut_at_stop.
            mask = torch.cat([mask, mask.new_ones(len(prompts), 1)], dim=1)
            logits = self.model(input_ids=tok[:, None], attention_mask=mask,
                                position_ids=next_pos, past_key_values=cache,
                                use_cache=True).logits[:, -1]
            next_pos = next_pos + 1
        return _samples(*fast_decode.cut_at_stop(tokens, logprobs, sampling.stop_token_ids))

    # --- weights ----------------------------------------------------------------------------

    def _params(self) -> dict[str, torch.Tensor]:
        # named_parameters() drops the tied lm_head, like save_pretrained's checkpoint does;
        # a MoE model's fused experts appear per expert, as views (checkpoint names).
        return checkpoint_views(self.model)

    def _expected_shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(p.shape) for k, p in self._params().items()}

    def _load_stream(self, pairs, bucket_bytes: int) -> None:
        """In process: each tensor is copied straight into its parameter (no staging, no
        serialisation)."""
        params = self._params()
        self._fused = None  # derived from the old weights
        with torch.no_grad():
            for name, tensor in pairs:
                params[name].copy_(tensor, non_blocking=True)

    # --- lifecycle (nothing to release: the model lives in the trainer's process) -----------

    def sleep(self) -> None:
        pass

    def wake_up(self, tags: list[str] | None = None) -> None:
        pass

    def close(self) -> None:
        pass
