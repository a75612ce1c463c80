"""policy_loss / positive_nll against a float64 per-token loop written from the formulas in
/work/shared/notes/algorithms.md (literal max/clamp form, not the implementation's masks)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_erc.algorithms import (
    NON_ADDITIVE_METRICS,
    ErcConfig,
    PolicyLossConfig,
    erc_keep_mask,
    policy_loss,
    positive_nll,
    positive_token_mask,
)

SETTINGS = settings(max_examples=25, deadline=None)
F64 = torch.float64


def make_batch(seed: int, b: int, t: int, *, spread: float = 0.4, per_token_adv: bool = False):
    g = torch.Generator().manual_seed(seed)
    logp = -3.0 * torch.rand(b, t, generator=g, dtype=F64) - 0.01
    old_logp = logp + spread * torch.randn(b, t, generator=g, dtype=F64)
    adv_shape = (b, t) if per_token_adv else (b,)
    adv = torch.randn(adv_shape, generator=g, dtype=F64)
    mask = torch.rand(b, t, generator=g) < 0.7
    mask[0, 0] = True
    entropy = torch.rand(b, t, generator=g, dtype=F64) + 0.05
    old_entropy = entropy * torch.exp(0.08 * torch.randn(b, t, generator=g, dtype=F64))
    rollout_logp = old_logp + 0.3 * torch.randn(b, t, generator=g, dtype=F64)
    return dict(logp=logp, old_logp=old_logp, adv=adv, mask=mask, entropy=entropy,
                old_entropy=old_entropy, rollout_logp=rollout_logp)


def ref_token(lp, olp, a, cfg, rho=None, rlp=None):
    """(value, d value / d logp) of one token, in python floats."""
    el, eh = cfg.eps_low, cfg.eps_high
    r = math.exp(max(min(lp - olp, 20.0), -20.0))
    if cfg.surrogate == "clip":
        clamped = min(max(r, 1 - el), 1 + eh)
        val = max(-a * r, -a * clamped)
        grad = 0.0 if -a * clamped > -a * r else -a * r
    else:
        if a < 0 and r < 1 - el:
            val = grad = -cfg.gppo_beta_low * (1 - el) * a
        elif a > 0 and r > 1 + eh:
            val = grad = -cfg.gppo_beta_high * (1 + eh) * a
        else:
            val = grad = -a * r
    if cfg.dual_clip is not None and a < 0 and -cfg.dual_clip * a < val:
        val, grad = -cfg.dual_clip * a, 0.0
    if cfg.tis_cap is not None:
        w = min(math.exp(olp - rlp), cfg.tis_cap)
        val, grad = val * w, grad * w
    if cfg.erc is not None and not cfg.erc.low < rho < cfg.erc.high:
        grad = 0.0
    return val, grad


def ref_policy_loss(batch, cfg, num_tokens=None):
    b, t = batch["logp"].shape
    adv = batch["adv"]
    total, n = 0.0, 0
    grads = torch.zeros(b, t, dtype=F64)
    for i in range(b):
        for j in range(t):
            if not batch["mask"][i, j]:
                continue
            a = float(adv[i, j] if adv.dim() == 2 else adv[i])
            h, h_old = float(batch["entropy"][i, j]), float(batch["old_entropy"][i, j])
            rho = (h + 1e-8) / (h_old + 1e-8)
            val, grad = ref_token(float(batch["logp"][i, j]), float(batch["old_logp"][i, j]), a,
                                  cfg, rho, float(batch["rollout_logp"][i, j]))
            total += val
            grads[i, j] = grad
            n += 1
    denom = num_tokens if num_tokens is not None else n
    return total / denom, grads / denom


def run(batch, cfg, *, num_tokens=None, with_entropy=True, with_rollout=True, mask=None):
    logp = batch["logp"].clone().requires_grad_(True)
    loss, metrics = policy_loss(
        logp, batch["old_logp"], batch["adv"], batch["mask"] if mask is None else mask, cfg=cfg,
        entropy=batch["entropy"] if with_entropy else None,
        old_entropy=batch["old_entropy"] if with_entropy else None,
        rollout_logp=batch["rollout_logp"] if with_rollout else None, num_tokens=num_tokens,
    )
    (grad,) = torch.autograd.grad(loss, logp)
    return loss, grad, metrics


cfg_strategy = st.builds(
    lambda surrogate, dual, erc, tis, betas: PolicyLossConfig(
        surrogate=surrogate, dual_clip=dual, erc=ErcConfig() if erc else None, tis_cap=tis,
        gppo_beta_low=betas[0] if surrogate == "gppo" else 1.0,
        gppo_beta_high=betas[1] if surrogate == "gppo" else 1.0,
    ),
    st.sampled_from(["clip", "gppo"]), st.sampled_from([None, 1.5, 10.0]), st.booleans(),
    st.sampled_from([None, 1.2, 5.0]), st.sampled_from([(1.0, 1.0), (0.5, 1.0), (0.75, 0.3)]),
)


@SETTINGS
@given(seed=st.integers(0, 2**31), b=st.integers(1, 4), t=st.integers(1, 9), cfg=cfg_strategy,
       per_token_adv=st.booleans())
def test_matches_reference(seed, b, t, cfg, per_token_adv):
    batch = make_batch(seed, b, t, spread=0.5, per_token_adv=per_token_adv)
    loss, grad, _ = run(batch, cfg)
    ref_loss, ref_grad = ref_policy_loss(batch, cfg)
    torch.testing.assert_close(loss, torch.tensor(ref_loss, dtype=F64))
    torch.testing.assert_close(grad, ref_grad)


def test_matches_reference_float32_large():
    batch = make_batch(7, 16, 64, spread=0.5)
    cfg = PolicyLossConfig(surrogate="gppo", eps_high=0.2, dual_clip=3.0, erc=ErcConfig(),
                           tis_cap=2.0, gppo_beta_low=0.5)
    b32 = {k: v.float() if v.is_floating_point() else v for k, v in batch.items()}
    loss, grad, _ = run(b32, cfg)
    assert loss.dtype == torch.float32
    ref_loss, ref_grad = ref_policy_loss(batch, cfg)
    torch.testing.assert_close(loss.double(), torch.tensor(ref_loss, dtype=F64),
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dual_clip,tis_cap", [(None, None), (2.0, None), (1.5, 1.1)])
def test_gradcheck_clip(dual_clip, tis_cap):
    # Only the clip surrogate without ERC is a true gradient of its forward value: GPPO and
    # ERC deliberately return a gradient that differs from the finite difference.
    batch = make_batch(3, 3, 5, spread=0.6)
    cfg = PolicyLossConfig(dual_clip=dual_clip, tis_cap=tis_cap)

    def f(logp):
        return policy_loss(logp, batch["old_logp"], batch["adv"], batch["mask"], cfg=cfg,
                           rollout_logp=batch["rollout_logp"])[0]

    assert torch.autograd.gradcheck(f, (batch["logp"].clone().requires_grad_(True),))


def test_gradcheck_positive_nll():
    batch = make_batch(4, 3, 5)
    positive = torch.tensor([True, False, True])
    assert torch.autograd.gradcheck(
        lambda lp: positive_nll(lp, batch["mask"], positive),
        (batch["logp"].clone().requires_grad_(True),),
    )


@SETTINGS
@given(seed=st.integers(0, 2**31), b=st.integers(1, 4), t=st.integers(1, 9),
       surrogate=st.sampled_from(["clip", "gppo"]), per_token_adv=st.booleans())
def test_ratio_one_gives_minus_mean_advantage(seed, b, t, surrogate, per_token_adv):
    batch = make_batch(seed, b, t, per_token_adv=per_token_adv)
    batch["old_logp"] = batch["logp"].clone()
    loss, _, _ = run(batch, PolicyLossConfig(surrogate=surrogate), with_entropy=False,
                     with_rollout=False)
    adv = batch["adv"] if per_token_adv else batch["adv"][:, None].expand(b, t)
    expected = adv[batch["mask"]].sum() / batch["mask"].sum()
    torch.testing.assert_close(loss, -expected)


@SETTINGS
@given(seed=st.integers(0, 2**31), b=st.integers(1, 4), t=st.integers(2, 9),
       surrogate=st.sampled_from(["clip", "gppo"]), dual=st.sampled_from([None, 2.0]))
def test_erc_band(seed, b, t, surrogate, dual):
    batch = make_batch(seed, b, t)
    with_erc = PolicyLossConfig(surrogate=surrogate, dual_clip=dual, erc=ErcConfig())
    without = PolicyLossConfig(surrogate=surrogate, dual_clip=dual)
    loss_e, grad_e, metrics = run(batch, with_erc, with_rollout=False)
    loss_n, grad_n, _ = run(batch, without, with_rollout=False)
    rho = (batch["entropy"] + 1e-8) / (batch["old_entropy"] + 1e-8)
    keep = batch["mask"] & (rho > 0.95) & (rho < 1.05)
    out_of_band = batch["mask"] & ~keep
    assert torch.all(grad_e[out_of_band] == 0)
    torch.testing.assert_close(grad_e[keep], grad_n[keep], rtol=0, atol=0)
    # Dropped tokens keep their value and their place in the denominator.
    torch.testing.assert_close(loss_e, loss_n)
    frac = out_of_band.sum() / batch["mask"].sum()
    torch.testing.assert_close(metrics["erc/dropped_frac"], frac.to(F64))


def test_erc_denominator_counts_dropped_tokens():
    batch = make_batch(11, 4, 8)
    batch["old_entropy"] = batch["entropy"] * 2.0  # rho ~ 0.5: every token dropped
    loss, grad, metrics = run(batch, PolicyLossConfig(erc=ErcConfig()), with_rollout=False)
    assert torch.all(grad == 0)
    assert metrics["erc/dropped_low_frac"] == 1.0 and metrics["erc/dropped_high_frac"] == 0.0
    ref_loss, _ = ref_policy_loss(batch, PolicyLossConfig())
    torch.testing.assert_close(loss, torch.tensor(ref_loss, dtype=F64))
    # A token that is kept is divided by all response tokens, dropped ones included.
    batch["old_entropy"][0, 0] = batch["entropy"][0, 0]
    _, grad, _ = run(batch, PolicyLossConfig(erc=ErcConfig()), with_rollout=False)
    _, ref_grad = ref_policy_loss(batch, PolicyLossConfig())
    torch.testing.assert_close(grad[0, 0], ref_grad[0, 0])
    assert ref_grad[0, 0] != 0


@SETTINGS
@given(seed=st.integers(0, 2**31), b=st.integers(1, 4), t=st.integers(2, 9),
       eps=st.sampled_from([(0.2, 0.2), (0.2, 0.28), (0.1, 0.05)]))
def test_gppo_same_value_preserved_gradient(seed, b, t, eps):
    batch = make_batch(seed, b, t, spread=0.8)  # many clipped tokens
    clip = PolicyLossConfig(surrogate="clip", eps_low=eps[0], eps_high=eps[1])
    gppo = PolicyLossConfig(surrogate="gppo", eps_low=eps[0], eps_high=eps[1])
    loss_c, grad_c, m = run(batch, clip, with_entropy=False, with_rollout=False)
    loss_g, grad_g, _ = run(batch, gppo, with_entropy=False, with_rollout=False)
    torch.testing.assert_close(loss_g, loss_c)
    r = torch.exp(batch["logp"] - batch["old_logp"])
    adv = batch["adv"][:, None].expand(b, t)
    low = batch["mask"] & (adv < 0) & (r < 1 - eps[0])
    high = batch["mask"] & (adv > 0) & (r > 1 + eps[1])
    clipped = low | high
    assert torch.all(grad_c[clipped] == 0)
    assert torch.all(grad_g[clipped] != 0)
    n = batch["mask"].sum()
    torch.testing.assert_close(grad_g[low], -(1 - eps[0]) * adv[low] / n)
    torch.testing.assert_close(grad_g[high], -(1 + eps[1]) * adv[high] / n)
    torch.testing.assert_close(grad_g[~clipped], grad_c[~clipped])
    torch.testing.assert_close(m["clip/low_frac"], (low.sum() / n).to(F64))
    torch.testing.assert_close(m["clip/high_frac"], (high.sum() / n).to(F64))


def test_ce_gppo_betas_scale_clipped_gradient():
    batch = make_batch(5, 6, 10, spread=0.8)
    base = PolicyLossConfig(surrogate="gppo")
    ce = PolicyLossConfig(surrogate="gppo", gppo_beta_low=0.5, gppo_beta_high=0.25)
    _, grad_b, m = run(batch, base, with_entropy=False, with_rollout=False)
    _, grad_ce, _ = run(batch, ce, with_entropy=False, with_rollout=False)
    r = torch.exp(batch["logp"] - batch["old_logp"])
    adv = batch["adv"][:, None].expand_as(r)
    low = batch["mask"] & (adv < 0) & (r < 0.8)
    high = batch["mask"] & (adv > 0) & (r > 1.28)
    assert low.any() and high.any()
    torch.testing.assert_close(grad_ce[low], 0.5 * grad_b[low])
    torch.testing.assert_close(grad_ce[high], 0.25 * grad_b[high])
    rest = ~(low | high)
    torch.testing.assert_close(grad_ce[rest], grad_b[rest])


@SETTINGS
@given(seed=st.integers(0, 2**31), b=st.integers(2, 6), split=st.integers(1, 5), cfg=cfg_strategy)
def test_num_tokens_split(seed, b, split, cfg):
    split = min(split, b - 1)
    batch = make_batch(seed, b, 7, spread=0.5)
    total = int(batch["mask"].sum())
    loss_full, grad_full, m_full = run(batch, cfg)
    parts = [{k: v[:split] for k, v in batch.items()}, {k: v[split:] for k, v in batch.items()}]
    results = [run(p, cfg, num_tokens=torch.tensor(total)) for p in parts]
    torch.testing.assert_close(sum(r[0] for r in results), loss_full)
    torch.testing.assert_close(torch.cat([r[1] for r in results]), grad_full)
    for key, value in m_full.items():
        if key not in NON_ADDITIVE_METRICS:
            torch.testing.assert_close(sum(r[2][key] for r in results), value, msg=key)
    # An int num_tokens means the same thing.
    torch.testing.assert_close(run(parts[0], cfg, num_tokens=total)[0], results[0][0])


def test_metrics_values():
    batch = make_batch(21, 5, 12, spread=0.6)
    cfg = PolicyLossConfig(dual_clip=1.5, erc=ErcConfig(), tis_cap=1.3)
    _, _, m = run(batch, cfg)
    mask = batch["mask"]
    n = mask.sum().double()
    r = torch.exp(batch["logp"] - batch["old_logp"])[mask]
    adv = batch["adv"][:, None].expand_as(mask)[mask]
    rho = (batch["entropy"] / batch["old_entropy"])[mask]
    w = torch.exp(batch["old_logp"] - batch["rollout_logp"])[mask]
    unclipped = -adv * torch.maximum(r, torch.full_like(r, 0.8))  # A<0 branch value
    expected = {
        "kl/approx": (r - 1 - r.log()).sum() / n,
        "clip/dual_frac": ((adv < 0) & (unclipped > -1.5 * adv)).sum() / n,
        "erc/dropped_low_frac": (rho <= 0.95).sum() / n,
        "erc/dropped_high_frac": (rho >= 1.05).sum() / n,
        "erc/dropped_frac": ((rho <= 0.95) | (rho >= 1.05)).sum() / n,
        "erc/ratio_mean": rho.mean(),
        "entropy/mean": batch["entropy"][mask].mean(),
        "entropy/old_mean": batch["old_entropy"][mask].mean(),
        "tis/weight_mean": w.clamp(max=1.3).mean(),
        "tis/capped_frac": (w > 1.3).sum() / n,
        "mismatch/kl": (w - 1 - w.log()).sum() / n,
        "erc/ratio_p50": rho.sort().values[round(0.5 * (rho.numel() - 1))],
    }
    assert expected["clip/dual_frac"] > 0 and expected["erc/dropped_frac"] > 0
    for key, value in expected.items():
        torch.testing.assert_close(m[key], value.to(F64), msg=key)
    assert all(not v.requires_grad and v.dim() == 0 for v in m.values())
    assert m["erc/ratio_p05"] <= m["erc/ratio_p50"] <= m["erc/ratio_p95"]


def test_metric_keys_without_optional_inputs():
    batch = make_batch(1, 2, 3)
    _, _, m = run(batch, PolicyLossConfig(), with_entropy=False, with_rollout=False)
    assert set(m) == {"erc/dropped_frac", "erc/dropped_low_frac", "erc/dropped_high_frac",
                      "clip/low_frac", "clip/high_frac", "clip/dual_frac", "kl/approx"}
    assert m["erc/dropped_frac"] == 0


def test_all_padding_gives_zero_loss_and_finite_grad():
    batch = make_batch(2, 2, 4)
    mask = torch.zeros(2, 4, dtype=torch.bool)
    loss, grad, m = run(batch, PolicyLossConfig(erc=ErcConfig()), mask=mask)
    assert loss == 0 and torch.all(grad == 0)
    assert torch.isnan(m["erc/ratio_p50"])


def test_float_mask_and_huge_ratio_are_handled():
    batch = make_batch(2, 2, 4)
    batch["old_logp"][0, 0] = batch["logp"][0, 0] - 500.0  # would overflow exp
    loss, grad, _ = run(batch, PolicyLossConfig(surrogate="gppo"), mask=batch["mask"].double())
    assert torch.isfinite(loss) and torch.isfinite(grad).all()


def test_missing_inputs_raise():
    batch = make_batch(0, 2, 3)
    with pytest.raises(ValueError, match="entropy/old_entropy were not given"):
        run(batch, PolicyLossConfig(erc=ErcConfig()), with_entropy=False)
    with pytest.raises(ValueError, match="rollout_logp"):
        run(batch, PolicyLossConfig(tis_cap=2.0), with_rollout=False)
    batch["adv"] = torch.zeros(3)
    with pytest.raises(ValueError, match="advantages must have shape"):
        run(batch, PolicyLossConfig())
    with pytest.raises(ValueError, match="old_logp must have the shape"):
        policy_loss(torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2),
                    torch.ones(2, 3, dtype=torch.bool), cfg=PolicyLossConfig())


@pytest.mark.parametrize("kwargs,message", [
    (dict(surrogate="ppo"), "surrogate must be one of"),
    (dict(eps_low=1.0), r"eps_low must be in \[0, 1\)"),
    (dict(eps_low=-0.1), r"eps_low must be in \[0, 1\)"),
    (dict(eps_high=-0.1), "eps_high must be >= 0"),
    (dict(dual_clip=1.0), "dual_clip must be > 1.*Use None"),
    (dict(dual_clip=0.5), "dual_clip must be > 1"),
    (dict(tis_cap=0.0), "tis_cap must be > 0.*Use None"),
    (dict(surrogate="gppo", gppo_beta_low=-1.0), "gppo_beta_low must be >= 0"),
    (dict(surrogate="gppo", gppo_beta_high=-0.5), "gppo_beta_high must be >= 0"),
    (dict(gppo_beta_low=0.5), "no effect with surrogate='clip'.*set surrogate='gppo'"),
    (dict(pos_nll_coef=-0.1), "pos_nll_coef must be >= 0"),
    (dict(eps_low=float("nan")), "must be a real number"),
    (dict(erc=3), "erc must be None, an ErcConfig"),
    (dict(erc=dict(low=1.0)), r"ErcConfig.low must be in \[0, 1\)"),
])
def test_policy_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PolicyLossConfig(**kwargs)


@pytest.mark.parametrize("kwargs,message", [
    (dict(low=1.0), r"low must be in \[0, 1\).*use 0 to disable"),
    (dict(low=-0.1), r"low must be in \[0, 1\)"),
    (dict(high=1.0), "high must be > 1.*math.inf"),
    (dict(high=0.9), "high must be > 1"),
])
def test_erc_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ErcConfig(**kwargs)


def test_config_defaults_and_dict_erc():
    cfg = PolicyLossConfig(erc={"low": 0.9, "high": 1.1})
    assert cfg.erc == ErcConfig(low=0.9, high=1.1)
    d = PolicyLossConfig()
    assert (d.surrogate, d.eps_low, d.eps_high, d.dual_clip, d.erc, d.tis_cap) == (
        "clip", 0.2, 0.28, None, None, None)
    assert ErcConfig() == ErcConfig(low=0.95, high=1.05)
    with pytest.raises(TypeError):
        PolicyLossConfig("clip")  # kw_only


@SETTINGS
@given(seed=st.integers(0, 2**31), b=st.integers(2, 6), t=st.integers(1, 6),
       split=st.integers(1, 5), as_rewards=st.booleans())
def test_positive_nll_reference_and_split(seed, b, t, split, as_rewards):
    split = min(split, b - 1)
    batch = make_batch(seed, b, t)
    g = torch.Generator().manual_seed(seed + 1)
    choices = torch.tensor([1.0, 1.0, 0.0, 0.5, -1.0, 0.999], dtype=F64)
    rewards = choices[torch.randint(0, len(choices), (b,), generator=g)]
    positive = rewards if as_rewards else rewards == 1
    total, n = 0.0, 0
    for i in range(b):
        for j in range(t):
            if batch["mask"][i, j] and float(rewards[i]) == 1.0:
                total -= float(batch["logp"][i, j])
                n += 1
    logp = batch["logp"].clone().requires_grad_(True)
    loss = positive_nll(logp, batch["mask"], positive)
    torch.testing.assert_close(loss, torch.tensor(total / max(n, 1), dtype=F64))
    assert int(positive_token_mask(batch["mask"], positive).sum()) == n
    parts = [slice(0, split), slice(split, b)]
    split_loss = sum(positive_nll(batch["logp"][p], batch["mask"][p], positive[p], num_tokens=n)
                     for p in parts)
    torch.testing.assert_close(split_loss, loss)


def test_positive_nll_no_positives_is_zero():
    batch = make_batch(0, 2, 3)
    logp = batch["logp"].clone().requires_grad_(True)
    loss = positive_nll(logp, batch["mask"], torch.tensor([0.0, 0.5]))
    loss.backward()
    assert loss == 0 and torch.all(logp.grad == 0)


def test_erc_band_is_strict_at_both_bounds():
    cfg = ErcConfig(low=0.5, high=2.0)  # exactly representable bounds
    rho = torch.tensor([[0.5, 2.0, 0.5000001, 1.9999999, 1.0, 1.0]], dtype=F64)
    mask = torch.tensor([[True, True, True, True, True, False]])
    assert erc_keep_mask(rho, mask, cfg).tolist() == [[False, False, True, True, True, False]]
    # rho = (H + 1e-8) / (H_old + 1e-8) lands exactly on the bounds here.
    old_entropy = torch.full((1, 6), 1.0 - 1e-8, dtype=F64)
    entropy = (rho * 1.0) - 1e-8
    batch = make_batch(0, 1, 6)
    batch.update(entropy=entropy, old_entropy=old_entropy, mask=mask)
    _, grad, m = run(batch, PolicyLossConfig(erc=cfg), with_rollout=False)
    assert (grad[0, :2] == 0).all() and (grad[0, 2:5] != 0).all()
    torch.testing.assert_close(m["erc/dropped_low_frac"], torch.tensor(0.2, dtype=F64))
    torch.testing.assert_close(m["erc/dropped_high_frac"], torch.tensor(0.2, dtype=F64))
