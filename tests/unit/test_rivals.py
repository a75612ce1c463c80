"""CISPO, GSPO, SAPO, DPPO, Clip-Cov, KL-Cov, 80/20 and the entropy bonus, against float64
references written from the papers' formulas (not from the implementation's weight form),
composed with dual clip, TIS, ERC and the global token-mean; their properties; and the
config surface."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_erc.algorithms import ErcConfig, PolicyLossConfig, policy_loss
from megatron_erc.algorithms.regularizers import token_covariance
from megatron_erc.config import load_config
from megatron_erc.errors import ConfigError
from megatron_erc.trainer.config import TrainConfig

F64 = torch.float64


def make_batch(seed: int, b: int = 4, t: int = 9, spread: float = 0.4):
    g = torch.Generator().manual_seed(seed)
    logp = -3.0 * torch.rand(b, t, generator=g, dtype=F64) - 0.01
    old_logp = logp + spread * torch.randn(b, t, generator=g, dtype=F64)
    adv = torch.randn(b, generator=g, dtype=F64)
    mask = torch.rand(b, t, generator=g) < 0.75
    mask[:, 0] = True
    entropy = torch.rand(b, t, generator=g, dtype=F64) + 0.05
    old_entropy = entropy * torch.exp(0.08 * torch.randn(b, t, generator=g, dtype=F64))
    rollout_logp = old_logp + 0.3 * torch.randn(b, t, generator=g, dtype=F64)
    return dict(logp=logp, old_logp=old_logp, adv=adv, mask=mask, entropy=entropy,
                old_entropy=old_entropy, rollout_logp=rollout_logp)


def run(batch, cfg, **kw):
    """(loss, d loss / d logp, d loss / d entropy, metrics) of the implementation."""
    logp = batch["logp"].clone().requires_grad_(True)
    ent = batch["entropy"].clone().requires_grad_(True)
    loss, m = policy_loss(logp, batch["old_logp"], batch["adv"], batch["mask"], cfg=cfg,
                          entropy=ent, old_entropy=batch["old_entropy"],
                          rollout_logp=batch["rollout_logp"], **kw)
    g_logp, g_ent = torch.autograd.grad(loss, (logp, ent), allow_unused=True)
    return loss.detach(), g_logp, g_ent, m


# --- float64 per-token reference: value and derivative of each token, python floats -------

def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def ref_surrogate(lp, olp, a, cfg, seq_s=None):
    """(value, d value / d logp) of one token, from the papers' formulas."""
    r = math.exp(max(min(lp - olp, 20.0), -20.0))
    el, eh = cfg.eps_low, cfg.eps_high
    if cfg.surrogate == "cispo":  # -sg(clip(r)) * A * logp: gradient -clip(r) * A
        c = min(max(r, 1 - el), 1 + eh)
        return -a * c, -a * c
    if cfg.surrogate == "gspo":  # max(-A s, -A clip(s)), d s / d logp_t = s (GSPO-token)
        c = min(max(seq_s, 1 - el), 1 + eh)
        if -a * c > -a * seq_s:
            return -a * c, 0.0
        return -a * seq_s, -a * seq_s
    if cfg.surrogate == "sapo":
        tau = cfg.sapo_tau_pos if a > 0 else cfg.sapo_tau_neg
        sg = sigmoid(tau * (r - 1))
        return -(4 / tau) * sg * a, -4 * sg * (1 - sg) * r * a
    if cfg.surrogate == "dppo":
        shift = math.exp(lp) - math.exp(olp)
        out = (a > 0 and shift > cfg.dppo_delta_high) or (a < 0 and shift < -cfg.dppo_delta_low)
        return -a * r, 0.0 if out else -a * r
    raise AssertionError(cfg.surrogate)


def ref_loss(batch, cfg, *, selected=None, keep_extra=None, segments=None):
    """Token-mean loss and its gradient wrt logp, looping over tokens. `selected`: KL-Cov's
    tokens; `keep_extra`: tokens the 80/20 or Clip-Cov masks keep (bool [B, T])."""
    b, t = batch["logp"].shape
    mask = batch["mask"]
    seq = segments if segments is not None else [[0] * t for _ in range(b)]
    seq_s = {}
    for i in range(b):
        for k in set(seq[i]):
            d = [float(batch["logp"][i, j] - batch["old_logp"][i, j]) for j in range(t)
                 if mask[i, j] and seq[i][j] == k]
            seq_s[i, k] = math.exp(sum(max(min(x, 20.0), -20.0) for x in d) / max(len(d), 1))
    total, grads = 0.0, torch.zeros(b, t, dtype=F64)
    n = int(mask.sum())
    for i in range(b):
        for j in range(t):
            if not mask[i, j]:
                continue
            lp, olp = float(batch["logp"][i, j]), float(batch["old_logp"][i, j])
            a = float(batch["adv"][i, j] if batch["adv"].dim() == 2 else batch["adv"][i])
            val, grad = ref_surrogate(lp, olp, a, cfg, seq_s[i, seq[i][j]])
            if cfg.dual_clip is not None and a < 0 and -cfg.dual_clip * a < val:
                val, grad = -cfg.dual_clip * a, 0.0
            if selected is not None and selected[i, j]:
                val += cfg.kl_cov_coef * abs(lp - olp)
                grad += cfg.kl_cov_coef * math.copysign(1.0, lp - olp)
            if cfg.tis_cap is not None:
                w = min(math.exp(olp - float(batch["rollout_logp"][i, j])), cfg.tis_cap)
                val, grad = val * w, grad * w
            if cfg.erc is not None:
                rho = (float(batch["entropy"][i, j]) + 1e-8) / (
                    float(batch["old_entropy"][i, j]) + 1e-8)
                if not cfg.erc.low < rho < cfg.erc.high:
                    grad = 0.0
            if keep_extra is not None and not keep_extra[i, j]:
                grad = 0.0
            total += val
            grads[i, j] = grad
    return total / n, grads / n


COMPOSE = [dict(), dict(dual_clip=3.0), dict(tis_cap=1.5), dict(erc=ErcConfig(low=0.95, high=1.05)),
           dict(dual_clip=3.0, tis_cap=2.0, erc=ErcConfig(low=0.9, high=1.1))]
SURR = [dict(surrogate="cispo", eps_low=0.2, eps_high=0.28), dict(surrogate="gspo"),
        dict(surrogate="gspo", eps_low=0.05, eps_high=0.05),
        dict(surrogate="sapo", sapo_tau_pos=1.0, sapo_tau_neg=1.05),
        dict(surrogate="sapo", sapo_tau_pos=0.5, sapo_tau_neg=2.0),
        dict(surrogate="dppo", dppo_delta_low=0.02, dppo_delta_high=0.03)]


@pytest.mark.parametrize("surr", SURR)
@pytest.mark.parametrize("compose", COMPOSE)
@pytest.mark.parametrize("seed", [0, 1])
def test_surrogates_match_reference(surr, compose, seed):
    batch = make_batch(seed)
    cfg = PolicyLossConfig(**surr, **compose)
    loss, grad, _, m = run(batch, cfg)
    ref, ref_grad = ref_loss(batch, cfg)
    assert loss.item() == pytest.approx(ref, rel=1e-10, abs=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-12)
    if cfg.surrogate == "dppo":  # the masks are really exercised
        assert m["clip/low_frac"] + m["clip/high_frac"] > 0


def test_cispo_gradient_is_the_papers_literal_formula():
    """`-sg(clip(r)) * A * logp` by autograd, float64: same gradient as ours (whose value is
    `-A * clip(r)`)."""
    batch = make_batch(3, spread=0.6)
    cfg = PolicyLossConfig(surrogate="cispo", eps_low=0.1, eps_high=0.2)
    _, grad, _, m = run(batch, cfg)
    logp = batch["logp"].clone().requires_grad_(True)
    r = torch.exp(logp - batch["old_logp"]).detach().clamp(0.9, 1.2)
    lit = (-(r * batch["adv"][:, None] * logp) * batch["mask"]).sum() / batch["mask"].sum()
    torch.testing.assert_close(grad, torch.autograd.grad(lit, logp)[0], rtol=1e-12, atol=0)
    assert m["clip/high_frac"] > 0 and m["clip/low_frac"] > 0


def test_cispo_every_token_keeps_a_gradient_against_its_advantage():
    batch = make_batch(4, spread=2.0)  # many ratios far outside the clip range
    _, grad, _, _ = run(batch, PolicyLossConfig(surrogate="cispo"))
    mask = batch["mask"]
    sign = torch.sign(batch["adv"])[:, None].expand_as(grad)
    assert torch.all(torch.sign(grad[mask]) == -sign[mask])
    # while PPO-clip zeroes the clipped ones
    _, grad_clip, _, _ = run(batch, PolicyLossConfig(surrogate="clip"))
    assert (grad_clip[mask] == 0).any()


def test_gspo_is_papers_sequence_objective_with_length_weights():
    """GSPO eq. 7 with s_i differentiable through the mean, each sequence weighed by its
    length (the global token-mean): value and gradient equal ours."""
    batch = make_batch(5, spread=0.15)
    cfg = PolicyLossConfig(surrogate="gspo", eps_low=0.03, eps_high=0.04)
    loss, grad, _, m = run(batch, cfg)
    logp = batch["logp"].clone().requires_grad_(True)
    mask = batch["mask"].to(F64)
    lens = mask.sum(-1)
    s = torch.exp(((logp - batch["old_logp"]) * mask).sum(-1) / lens)
    a = batch["adv"]
    per_seq = torch.maximum(-a * s, -a * s.clamp(1 - 0.03, 1 + 0.04))
    ref = (lens * per_seq).sum() / lens.sum()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-12)
    torch.testing.assert_close(grad, torch.autograd.grad(ref, logp)[0], rtol=1e-10, atol=1e-14)
    assert m["clip/low_frac"] + m["clip/high_frac"] > 0


@pytest.mark.parametrize("dual", [None, 4.0])
def test_gspo_equals_token_clip_when_token_ratios_are_equal(dual):
    batch = make_batch(6)
    shift = torch.tensor([0.5, -0.4, 0.05, 0.2], dtype=F64)[:, None]
    batch["old_logp"] = batch["logp"] - shift  # r_t = exp(shift_i) for every token of i
    outs = [run(batch, PolicyLossConfig(surrogate=s, dual_clip=dual)) for s in ("gspo", "clip")]
    assert outs[0][0].item() == pytest.approx(outs[1][0].item(), rel=1e-12)
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=1e-10, atol=1e-15)


def test_gspo_packed_segments_equal_separate_rows():
    """Two sequences packed in one row (segment_ids) give the loss of two rows."""
    batch = make_batch(7, b=2, t=6, spread=0.3)
    batch["mask"][:] = True
    batch["mask"][1, 4:] = False
    cfg = PolicyLossConfig(surrogate="gspo", eps_low=0.05, eps_high=0.05)
    loss, grad, _, _ = run(batch, cfg)
    packed = {k: v.reshape(1, -1) for k, v in batch.items() if k != "adv"}
    packed["adv"] = batch["adv"][:, None].expand(2, 6).reshape(1, -1)
    seg = torch.tensor([[0] * 6 + [1] * 6])
    loss_p, grad_p, _, _ = run(packed, cfg, segment_ids=seg)
    assert loss_p.item() == pytest.approx(loss.item(), rel=1e-12)
    torch.testing.assert_close(grad_p.view(2, 6), grad, rtol=1e-12, atol=0)
    ref, ref_grad = ref_loss(packed, cfg, segments=seg.tolist())
    assert loss_p.item() == pytest.approx(ref, rel=1e-10)
    # without the segments the row would be one sequence: a different loss
    assert run(packed, cfg)[0].item() != pytest.approx(loss.item(), rel=1e-6)


def test_sapo_gate_limits():
    cfg = PolicyLossConfig(surrogate="sapo", sapo_tau_pos=1.0, sapo_tau_neg=1.5)
    b = make_batch(8)
    b["mask"][:] = True
    b["adv"] = torch.tensor([1.0, -1.0, 2.0, -0.5], dtype=F64)
    n = b["mask"].numel()
    b["old_logp"] = b["logp"].clone()  # r = 1: PPO's gradient -A / n, value -(2/tau) A
    loss, grad, _, _ = run(b, cfg)
    torch.testing.assert_close(grad, (-b["adv"][:, None] / n).expand_as(grad))
    tau = torch.tensor([1.0, 1.5, 1.0, 1.5], dtype=F64)[:, None]
    assert loss.item() == pytest.approx((-(2 / tau) * b["adv"][:, None]).sum().item() * 9 / n)
    b["old_logp"] = b["logp"] - 15.0  # r = e^15: the gate saturates at 4/tau, no gradient
    loss, grad, _, _ = run(b, cfg)
    assert grad.abs().max() < 1e-12
    assert loss.item() == pytest.approx((-(4 / tau) * b["adv"][:, None]).sum().item() * 9 / n)


def test_dppo_masks_exactly_the_diverged_tokens_in_the_advantage_direction():
    cfg = PolicyLossConfig(surrogate="dppo", dppo_delta_low=0.1, dppo_delta_high=0.2)
    p_old = torch.tensor([[0.5, 0.5, 0.5, 0.5], [0.5, 0.5, 0.5, 0.5]], dtype=F64)
    p = torch.tensor([[0.75, 0.65, 0.3, 0.45], [0.75, 0.35, 0.45, 0.62]], dtype=F64)
    adv = torch.tensor([1.0, -1.0], dtype=F64)
    batch = dict(logp=p.log(), old_logp=p_old.log(), adv=adv, mask=torch.ones(2, 4, dtype=bool),
                 entropy=torch.ones(2, 4, dtype=F64), old_entropy=torch.ones(2, 4, dtype=F64),
                 rollout_logp=p_old.log())
    _, grad, _, m = run(batch, cfg)
    # A>0: +0.25 > 0.2 masked; +0.15, -0.2, -0.05 kept. A<0: -0.15 < -0.1 masked; others kept
    expected_zero = torch.tensor([[1, 0, 0, 0], [0, 1, 0, 0]], dtype=bool)
    assert torch.equal(grad == 0, expected_zero)
    assert m["clip/high_frac"].item() == pytest.approx(1 / 8)
    assert m["clip/low_frac"].item() == pytest.approx(1 / 8)


def test_surrogates_split_over_micro_batches_sum_to_the_full_loss():
    batch = make_batch(9, b=6)
    for surr in SURR:
        cfg = PolicyLossConfig(**surr, erc=ErcConfig(), tis_cap=2.0)
        full, g_full, _, _ = run(batch, cfg)
        n = int(batch["mask"].sum())
        parts = [run({k: v[s] for k, v in batch.items()}, cfg, num_tokens=n)
                 for s in (slice(0, 2), slice(2, 6))]
        assert sum(p[0] for p in parts).item() == pytest.approx(full.item(), rel=1e-12)
        torch.testing.assert_close(torch.cat([p[1] for p in parts]), g_full)


# --- regularizers ------------------------------------------------------------------------

def ref_covariance(batch, adv_mean=None):
    mask = batch["mask"]
    toks = [(i, j) for i in range(mask.shape[0]) for j in range(mask.shape[1]) if mask[i, j]]
    a_bar = adv_mean if adv_mean is not None else sum(
        float(batch["adv"][i]) for i, _ in toks) / len(toks)
    l_bar = sum(float(batch["logp"][i, j]) for i, j in toks) / len(toks)
    cov = torch.full(mask.shape, float("nan"), dtype=F64)
    for i, j in toks:
        cov[i, j] = (float(batch["adv"][i]) - a_bar) * (float(batch["logp"][i, j]) - l_bar)
    return cov


@pytest.mark.parametrize("surr", [dict(surrogate="clip"), dict(surrogate="cispo"),
                                  dict(surrogate="sapo")])
@pytest.mark.parametrize("adv_mean", [None, 0.3])
def test_kl_cov_penalises_the_top_covariance_tokens(surr, adv_mean):
    batch = make_batch(10, b=6, t=12)
    cfg = PolicyLossConfig(**surr, regularizer="kl_cov", kl_cov_frac=0.1, kl_cov_coef=0.7,
                           erc=ErcConfig(), tis_cap=2.0)
    cov = ref_covariance(batch, adv_mean)
    n = int(batch["mask"].sum())
    k = max(1, int(0.1 * n))
    order = sorted(((float(cov[i, j]), i, j) for i, j in batch["mask"].nonzero().tolist()),
                   reverse=True)
    selected = torch.zeros_like(batch["mask"])
    for _, i, j in order[:k]:
        selected[i, j] = True
    loss, grad, _, m = run(batch, cfg, adv_mean=adv_mean)
    if cfg.surrogate == "clip":
        base = PolicyLossConfig(surrogate="clip", erc=ErcConfig(), tis_cap=2.0)
        base_loss, base_grad, _, _ = run(batch, base, adv_mean=adv_mean)
        ref_extra, ref_gextra = 0.0, torch.zeros_like(grad)
        for i, j in selected.nonzero().tolist():
            d = float(batch["logp"][i, j] - batch["old_logp"][i, j])
            w = min(math.exp(float(batch["old_logp"][i, j] - batch["rollout_logp"][i, j])), 2.0)
            rho = float(batch["entropy"][i, j] / batch["old_entropy"][i, j])
            ref_extra += 0.7 * abs(d) * w / n
            ref_gextra[i, j] = 0.7 * math.copysign(1, d) * w / n if 0.95 < rho < 1.05 else 0.0
        assert loss.item() == pytest.approx(base_loss.item() + ref_extra, rel=1e-10)
        torch.testing.assert_close(grad, base_grad + ref_gextra)
    else:
        ref, ref_grad = ref_loss(batch, cfg, selected=selected)
        assert loss.item() == pytest.approx(ref, rel=1e-10)
        torch.testing.assert_close(grad, ref_grad)
    assert m["cov/selected_frac"].item() == pytest.approx(k / n)


def test_token_covariance_matches_reference():
    batch = make_batch(11)
    adv = batch["adv"][:, None].expand_as(batch["logp"])
    for adv_mean in (None, -0.2):
        cov = token_covariance(adv, batch["logp"], batch["mask"], adv_mean)
        ref = ref_covariance(batch, adv_mean)
        torch.testing.assert_close(cov[batch["mask"]], ref[batch["mask"]])


def test_clip_cov_detaches_a_seeded_random_share_of_the_band():
    batch = make_batch(12, b=16, t=32, spread=0.1)
    batch["adv"] = 3.0 * batch["adv"]
    cfg = PolicyLossConfig(regularizer="clip_cov", clip_cov_frac=0.02, clip_cov_low=0.2,
                           clip_cov_high=3.0)
    base, base_grad, _, _ = run(batch, PolicyLossConfig())
    cov = ref_covariance(batch)
    mask = batch["mask"]
    n = int(mask.sum())
    k = max(1, int(0.02 * n))
    picks = []
    for seed in (1, 1, 2):
        loss, grad, _, m = run(batch, cfg, seed=seed)
        assert loss.item() == pytest.approx(base.item(), rel=1e-12)  # values are kept
        lost = (grad == 0) & (base_grad != 0) & mask
        assert int(lost.sum()) == k
        assert torch.all((cov[lost] >= 0.2) & (cov[lost] <= 3.0))
        torch.testing.assert_close(grad[~lost], base_grad[~lost], rtol=0, atol=0)
        assert m["cov/selected_frac"].item() == pytest.approx(k / n)
        picks.append(lost)
    assert torch.equal(picks[0], picks[1]), "the same seed must pick the same tokens"
    assert not torch.equal(picks[0], picks[2]), "another seed should pick other tokens"
    in_band = int(((cov >= 0.2) & (cov <= 3.0) & mask).sum())
    assert in_band > 2 * k  # the random choice was a real choice


def test_clip_cov_takes_all_of_a_small_band_and_skips_clipped_tokens():
    batch = make_batch(13, b=4, t=8, spread=1.5)
    cfg = PolicyLossConfig(regularizer="clip_cov", clip_cov_frac=1.0, clip_cov_low=-100.0,
                           clip_cov_high=100.0)
    base, base_grad, _, bm = run(batch, PolicyLossConfig())
    _, grad, _, m = run(batch, cfg, seed=0)
    # everything in the (huge) band and not clipped loses its gradient; clipped ones had none
    assert torch.all(grad[batch["mask"]] == 0)
    clipped = bm["clip/low_frac"] + bm["clip/high_frac"]
    assert clipped > 0
    assert m["cov/selected_frac"].item() == pytest.approx(1 - clipped.item())


@pytest.mark.parametrize("frac", [0.2, 0.3, 0.5, 1.0])
def test_top_entropy_keeps_exactly_the_top_fraction(frac):
    batch = make_batch(14, b=5, t=10)
    cfg = PolicyLossConfig(top_entropy_frac=frac, dual_clip=3.0)
    base, base_grad, _, _ = run(batch, PolicyLossConfig(dual_clip=3.0))
    loss, grad, _, m = run(batch, cfg)
    mask = batch["mask"]
    n = int(mask.sum())
    k = math.ceil(round(frac * n, 9))
    ent = batch["entropy"][mask]
    threshold = ent.sort(descending=True).values[k - 1]
    top = mask & (batch["entropy"] >= threshold)
    assert int(top.sum()) == k
    assert loss.item() == pytest.approx(base.item(), rel=1e-12)
    torch.testing.assert_close(grad, torch.where(top, base_grad, 0.0), rtol=0, atol=0)
    assert m["top_entropy/kept_frac"].item() == pytest.approx(k / n)


def test_top_entropy_composes_with_erc():
    batch = make_batch(15, b=5, t=10)
    cfg = PolicyLossConfig(surrogate="sapo", top_entropy_frac=0.4, erc=ErcConfig())
    top = (batch["entropy"] >= batch["entropy"][batch["mask"]].sort(descending=True).values[
        math.ceil(0.4 * int(batch["mask"].sum())) - 1]) & batch["mask"]
    ref, ref_grad = ref_loss(batch, cfg, keep_extra=top)
    loss, grad, _, _ = run(batch, cfg)
    assert loss.item() == pytest.approx(ref, rel=1e-10)
    torch.testing.assert_close(grad, ref_grad)


@pytest.mark.parametrize("target", [None, 0.8, 0.3])
def test_entropy_bonus_fixed_and_adaptive(target):
    batch = make_batch(16)
    mask = batch["mask"]
    cfg = PolicyLossConfig(surrogate="cispo", entropy_coef=0.05, entropy_target=target)
    base, base_grad, _, _ = run(batch, PolicyLossConfig(surrogate="cispo"))
    loss, grad, g_ent, m = run(batch, cfg)
    n = int(mask.sum())
    h_mean = float(batch["entropy"][mask].mean())
    coef = 0.05 if target is None else 0.05 * max(0.0, 1 - h_mean / target)
    if target == 0.3:
        assert h_mean > 0.3 and coef == 0.0  # above the target: the bonus is off
    assert loss.item() == pytest.approx(base.item() - coef * h_mean, rel=1e-12)
    torch.testing.assert_close(grad, base_grad)  # the bonus does not touch the pg gradient
    torch.testing.assert_close(g_ent, torch.where(mask, -coef / n, 0.0).to(F64))
    assert m["entropy_bonus/coef"].item() == pytest.approx(coef)


def test_inputs_the_switches_need():
    b = make_batch(17)
    args = (b["logp"].clone().requires_grad_(True), b["old_logp"], b["adv"], b["mask"])
    with pytest.raises(ValueError, match="needs a seed"):
        policy_loss(*args, cfg=PolicyLossConfig(regularizer="clip_cov"))
    with pytest.raises(ValueError, match="entropy was not given"):
        policy_loss(*args, cfg=PolicyLossConfig(top_entropy_frac=0.2))
    with pytest.raises(ValueError, match="entropy_grad=True"):
        policy_loss(*args, cfg=PolicyLossConfig(entropy_coef=0.01), entropy=b["entropy"])


# --- config ------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    (dict(surrogate="ppo"), r"must be one of \('clip', 'gppo', 'cispo'"),
    (dict(regularizer="entropy"), r"entropy bonus \(entropy_coef\) and 80/20"),
    (dict(sapo_tau_pos=0.0, surrogate="sapo"), r"sapo_tau_pos must be > 0; got 0.0"),
    (dict(sapo_tau_neg=2.0), r"sapo_tau_neg=2.0 has no effect with surrogate='clip': set "
                             r"surrogate='sapo'"),
    (dict(dppo_delta_low=0.0, surrogate="dppo"), r"dppo_delta_low must be in \(0, 1\]"),
    (dict(dppo_delta_high=0.1, surrogate="gspo"), r"set surrogate='dppo'"),
    (dict(kl_cov_frac=0.01, regularizer="clip_cov"), r"kl_cov_frac=0.01 has no effect with "
                                                     r"regularizer='clip_cov'"),
    (dict(clip_cov_frac=1.5, regularizer="clip_cov"), r"clip_cov_frac must be in \(0, 1\]"),
    (dict(regularizer="clip_cov", clip_cov_low=5.0, clip_cov_high=1.0),
     r"clip_cov_high must be > clip_cov_low"),
    (dict(kl_cov_coef=-1.0, regularizer="kl_cov"), r"kl_cov_coef must be > 0"),
    (dict(entropy_coef=-0.1), r"entropy_coef must be >= 0"),
    (dict(entropy_target=1.0), r"entropy_target is set but entropy_coef is 0"),
    (dict(entropy_coef=0.1, entropy_target=0.0), r"entropy_target must be > 0"),
    (dict(top_entropy_frac=1.2), r"top_entropy_frac must be in \(0, 1\].*80/20 paper uses 0.2"),
    (dict(top_entropy_frac=float("nan")), r"top_entropy_frac must be a real number"),
])
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PolicyLossConfig(**kwargs)


def test_yaml_surface():
    cfg = load_config(TrainConfig, None, [
        "algo.surrogate=gspo", "algo.eps_low=3e-4", "algo.eps_high=4e-4",
        "algo.regularizer=kl_cov", "algo.kl_cov_frac=0.002", "algo.entropy_coef=0.01",
        "algo.entropy_target=0.5", "algo.top_entropy_frac=0.2"]).algo
    assert (cfg.surrogate, cfg.regularizer, cfg.kl_cov_frac, cfg.top_entropy_frac) == (
        "gspo", "kl_cov", 0.002, 0.2)
    with pytest.raises(ConfigError, match=r"algo: PolicyLossConfig.sapo_tau_pos=2.0 has no "
                                          r"effect"):
        load_config(TrainConfig, None, ["algo.sapo_tau_pos=2"])
    with pytest.raises(ConfigError, match=r"unknown config field\(s\) algo.clip_cov"):
        load_config(TrainConfig, None, ["algo.clip_cov=0.1"])
