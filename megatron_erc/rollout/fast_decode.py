"""A lean decode loop for Llama-family HF models (Llama, Qwen2) in the embedded engine.

``transformers.generate``-style decoding spends most of a small model's step in per-token
framework work: a growing ``DynamicCache`` (one ``cat`` per layer and step), 4-D mask
building and a fused attention kernel tiled for long queries. This loop keeps the same math
and the same weights (the HF module's, fused once per weight version) with less around it:

- each distinct prompt is prefilled once by the HF model, and its KV cache is copied to its
  ``n`` samples (what vLLM's prefix cache does for a group);
- a preallocated KV cache per layer, written in place (keys stored transposed,
  ``[B, kv_heads, head_dim, P + T]``, so the score matmul reads them without a copy);
- fused ``[q; k; v]`` and ``[gate; up]`` weights (built by the engine once per weight
  version), RoPE tables built once per call;
- attention of one query token as two small batched matmuls over the valid cache.

Numerics follow HF's eager Llama/Qwen2 (RMSNorm in fp32, ``rotate_half`` RoPE, softmax in
fp32). ``supports(config)`` says which configs qualify (the package's one supported-model
check, ``models.support``); the engine falls back to the HF loop for any other.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_erc.models.support import has_qk_norm, rope_theta, unsupported


def supports(config) -> bool:
    """True for plain Llama/Qwen2 configs (default RoPE, SiLU MLP, no sliding window).
    Qwen3's per-head q/k norms are not in this loop: Qwen3 decodes through the HF model."""
    return unsupported(config) is None and not has_qk_norm(config)


class FusedWeights:
    """The model's weights, fused for decoding (``[q; k; v]``, ``[gate; up]``): copies, so
    they must be rebuilt after the model's weights change."""

    def __init__(self, model):
        inner = model.model
        self.layers = []
        for layer in inner.layers:
            att, mlp = layer.self_attn, layer.mlp
            qkv_b = None
            if att.q_proj.bias is not None:
                qkv_b = torch.cat([att.q_proj.bias, att.k_proj.bias, att.v_proj.bias])
            self.layers.append({
                "ln1": (layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon),
                "qkv": torch.cat([att.q_proj.weight, att.k_proj.weight, att.v_proj.weight]),
                "qkv_b": qkv_b, "o": att.o_proj.weight,
                "ln2": (layer.post_attention_layernorm.weight,
                        layer.post_attention_layernorm.variance_epsilon),
                "gate_up": torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]),
                "down": mlp.down_proj.weight})
        self.norm = (inner.norm.weight, inner.norm.variance_epsilon)
        self.lm_head = model.lm_head.weight


def _rms_norm(x: torch.Tensor, w_eps) -> torch.Tensor:
    w, eps = w_eps
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@torch.no_grad()
def left_padded_prefill(model, prompts: list[list[int]], device):
    """One HF forward over the left-padded prompts into a fresh ``DynamicCache`` (every row's
    last token at column -1). Returns ``(last logits [P, V], cache, mask, positions)``, the
    two latter ``[P, width]``."""
    from transformers import DynamicCache

    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p)
        mask[row, width - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.config)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions,
                past_key_values=cache, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1], cache, mask, positions


def cut_at_stop(tokens: list[torch.Tensor], logprobs: list[torch.Tensor], stop_ids
                ) -> tuple[list[list[int]], list[list[float]], list[bool]]:
    """Per row of the decoded ``[B]`` steps: tokens and log-probs up to and including the
    first stop token, and whether there was one (rows keep decoding after they stop)."""
    tok_mat = torch.stack(tokens, dim=1).tolist()
    lp_mat = torch.stack(logprobs, dim=1).float().tolist()
    stops = set(stop_ids)
    out_tokens, out_lp, stopped = [], [], []
    for toks, lps in zip(tok_mat, lp_mat, strict=True):
        length = next((t + 1 for t, x in enumerate(toks) if x in stops), None)
        stopped.append(length is not None)
        out_tokens.append(toks[:length])
        out_lp.append(lps[:length])
    return out_tokens, out_lp, stopped


@torch.no_grad()
def decode(model, weights: FusedWeights, prompts: list[list[int]], n: int, max_tokens: int,
           sample, stop_ids, device) -> tuple[list[list[int]], list[list[float]], list[bool]]:
    """Sample ``n`` continuations of each prompt; ``sample(logits [B, V]) -> (tokens, logp)``.

    ``weights``: ``FusedWeights(model)`` for the model's current weights. Rows are
    ``prompt-major`` (``n`` consecutive rows per prompt); returns ``cut_at_stop``'s triple.
    """
    cfg = model.config
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    dtype = model.lm_head.weight.dtype

    # Prefill each distinct prompt once with the HF model itself.
    last_logits, cache, mask, positions = left_padded_prefill(model, prompts, device)
    width = mask.shape[1]

    batch, total = len(prompts) * n, width + max_tokens
    keys, values = [], []
    for layer in range(len(weights.layers)):
        k, v = cache.layers[layer].keys, cache.layers[layer].values  # [p, kvh, width, d]
        kc = k.new_empty(batch, kv_heads, head_dim, total)  # keys stored transposed
        vc = v.new_empty(batch, kv_heads, total, head_dim)
        kc[..., :width] = k.repeat_interleave(n, dim=0).transpose(-1, -2)
        vc[:, :, :width] = v.repeat_interleave(n, dim=0)
        keys.append(kc)
        values.append(vc)
    # additive key mask [B, 1, 1, total]: prompt padding never attended to
    key_mask = torch.zeros(batch, 1, 1, total, dtype=torch.float32, device=device)
    key_mask[:, 0, 0, :width].masked_fill_(mask.repeat_interleave(n, dim=0) == 0, float("-inf"))
    next_pos = positions[:, -1].repeat_interleave(n) + 1  # [B]

    inv_freq = 1.0 / (rope_theta(cfg) ** (
        torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    freqs = torch.outer(torch.arange(width + max_tokens, dtype=torch.float32, device=device),
                        inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos_table, sin_table = emb.cos().to(dtype), emb.sin().to(dtype)
    scale = head_dim ** -0.5
    group = heads // kv_heads
    q_size, kv_size = heads * head_dim, kv_heads * head_dim

    logits = last_logits.repeat_interleave(n, dim=0)
    stop = torch.tensor(stop_ids, dtype=torch.long, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    tokens, logprobs = [], []
    for step in range(max_tokens):
        tok, lp = sample(logits)
        tokens.append(tok)
        logprobs.append(lp)
        done |= torch.isin(tok, stop)
        if bool(done.all()) or step == max_tokens - 1:
            break
        slot = width + step  # cache column of this token (same for every row)
        cos, sin = cos_table[next_pos][:, None], sin_table[next_pos][:, None]  # [B, 1, d]
        h = model.model.embed_tokens(tok)  # [B, H]
        for lw, kc, vc in zip(weights.layers, keys, values, strict=True):
            x = _rms_norm(h, lw["ln1"])
            qkv = F.linear(x, lw["qkv"], lw["qkv_b"])
            q = qkv[:, :q_size].view(batch, heads, head_dim)
            k = qkv[:, q_size:q_size + kv_size].view(batch, kv_heads, head_dim)
            kc[..., slot] = k * cos + _rotate_half(k) * sin
            vc[:, :, slot] = qkv[:, q_size + kv_size:].view(batch, kv_heads, head_dim)
            q = (q * cos + _rotate_half(q) * sin).view(batch, kv_heads, group, head_dim)
            scores = torch.matmul(q, kc[..., :slot + 1]).float() * scale
            probs = (scores + key_mask[..., :slot + 1]).softmax(-1).to(dtype)
            att = torch.matmul(probs, vc[:, :, :slot + 1]).reshape(batch, q_size)
            h = h + F.linear(att, lw["o"])
            gate, up = F.linear(_rms_norm(h, lw["ln2"]), lw["gate_up"]).chunk(2, dim=-1)
            h = h + F.linear(F.silu(gate) * up, lw["down"])
        logits = F.linear(_rms_norm(h, weights.norm), weights.lm_head)
        next_pos = next_pos + 1

    return cut_at_stop(tokens, logprobs, stop_ids)
