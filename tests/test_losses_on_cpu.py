"""The DPPO policy losses through verl's registry: value, gradient, parity with verl's dppo_tv/dppo_kl, errors."""

import math

import pytest
import torch

import reference as ref
from conftest import make_actor_config
from dppo_verl.config import DPPOPolicyLossConfig
from dppo_verl.handoff import HandOff, handoff_scope

B, T = 4, 7


def _get(mode):
    from verl.trainer.ppo.core_algos import get_policy_loss_fn

    return get_policy_loss_fn(mode)


def _batch(spread=0.4, p_max=0.95):
    """log pi as a differentiable function of random logits, mu / pi_old nearby, mixed-sign advantages."""
    theta = torch.randn(B, T, 16, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 16, (B, T))
    logp64 = torch.log_softmax(theta, -1).gather(-1, ids[..., None])[..., 0].clamp(max=math.log(p_max))
    mu = (logp64.detach() + spread * torch.randn(B, T, dtype=torch.float64)).clamp(max=math.log(p_max))
    adv = torch.randn(B, T, dtype=torch.float64)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 5:] = False
    mask[3, 2:] = False
    return theta, logp64, mu, adv, mask


def _ref_loss(logp, mu, adv, mask, div_fn, delta_low, delta_high, cap):
    """Dense fp64 reference of the token-mean loss, token by token."""
    total, n = 0.0, int(mask.sum())
    coeffs = torch.zeros_like(logp)
    for b in range(B):
        for t in range(T):
            if not mask[b, t]:
                continue
            d = div_fn(float(logp[b, t]), float(mu[b, t]))
            keep = ref.dppo_keep_mask(d, math.exp(logp[b, t]), math.exp(mu[b, t]), float(adv[b, t]), delta_low, delta_high)
            coeffs[b, t] = ref.dppo_token_grad_coeff(float(logp[b, t]), float(mu[b, t]), float(adv[b, t]), keep, cap)
    return coeffs, n


def _bin_tv(lp, lq):
    return abs(math.exp(lp) - math.exp(lq))


def _bin_kl(lp, lq):
    p, q = math.exp(lp), math.exp(lq)
    return q * (lq - lp) + (1 - q) * math.log((1 - q) / (1 - p))


@pytest.mark.parametrize("mode,div_fn", [("dppo_tv_binary", _bin_tv), ("dppo_kl_binary", _bin_kl)])
def test_binary_value_and_gradient_match_reference(mode, div_fn):
    theta, logp64, mu, adv, mask = _batch()
    pl = DPPOPolicyLossConfig(loss_mode=mode, delta_low=0.05, delta_high=0.08, truncation_cap=1.5)
    cfg = make_actor_config(pl)
    logp = logp64.float()
    with handoff_scope(HandOff(rollout_log_probs=mu.float())):
        loss, metrics = _get(mode)(torch.zeros(B, T), logp, adv.float(), mask, "token-mean", cfg)
    coeffs, n = _ref_loss(logp64.detach(), mu, adv, mask, div_fn, 0.05, 0.08, 1.5)
    assert loss.item() == pytest.approx(float((coeffs * logp64.detach()).sum() / n), rel=1e-5, abs=1e-6)
    # gradient with a random upstream gradient, through the logits
    g = torch.randn(())
    (gt,) = torch.autograd.grad(loss * g, theta, retain_graph=True)
    (want,) = torch.autograd.grad((coeffs * logp64).sum() / n * g.double(), theta)
    torch.testing.assert_close(gt, want, rtol=1e-4, atol=1e-6)
    # the cases exercise all branches: some masked, some truncated
    assert 0 < metrics["actor/dppo/masked_frac"] < 1
    assert metrics["actor/dppo/truncated_frac"] > 0
    assert metrics["actor/dppo/support_size"] == 1.0


def test_topk_reads_divergence_and_metrics():
    theta, logp64, mu, adv, mask = _batch()
    div = torch.rand(B, T)
    size = torch.randint(1, 22, (B, T)).float()
    pl = DPPOPolicyLossConfig(loss_mode="dppo_kl_topk", delta_low=0.3, delta_high=0.6)
    cfg = make_actor_config(pl)
    logp = logp64.detach().float()
    with handoff_scope(HandOff(rollout_log_probs=mu.float(), divergence=div, support_size=size,
                               topk_valid=torch.ones(B, T))):
        loss, m = _get("dppo_kl_topk")(torch.zeros(B, T), logp, adv.float(), mask, "token-mean", cfg)
    keep = torch.tensor([[ref.dppo_keep_mask(float(div[b, t]), math.exp(logp[b, t]), math.exp(mu[b, t]), float(adv[b, t]), 0.3, 0.6)
                          for t in range(T)] for b in range(B)])
    dropped = ~keep & mask
    assert m["actor/dppo/masked_frac"] == pytest.approx(float(dropped.sum() / mask.sum()))
    pos = mask & (adv > 0)
    assert m["actor/dppo/masked_frac_pos"] == pytest.approx(float((dropped & pos).sum() / pos.sum()))
    neg = mask & (adv < 0)
    assert m["actor/dppo/masked_frac_neg"] == pytest.approx(float((dropped & neg).sum() / neg.sum()))
    assert m["actor/dppo/divergence_max"] == pytest.approx(float(div[mask].max()))
    assert m["actor/dppo/divergence_mean"] == pytest.approx(float(div[mask].mean()), rel=1e-6)
    assert m["actor/dppo/support_size"] == pytest.approx(float(size[mask].mean()), rel=1e-6)
    assert m["actor/dppo/topk_valid_frac"] == 1.0
    assert m["actor/dppo/mismatch_abs_mean"] == pytest.approx(float((logp.exp() - mu.float().exp()).abs()[mask].mean()), rel=1e-5)
    r = (logp.double() - mu).exp()
    assert m["actor/dppo/ratio_max"] == pytest.approx(float(r[mask].max()), rel=1e-5)
    assert m["actor/dppo/ratio_mean"] == pytest.approx(float(r[mask].mean()), rel=1e-5)
    assert m["actor/dppo/truncated_frac"] == pytest.approx(float((r[mask] > 20).float().mean()))
    coeffs = torch.where(keep & mask, -adv * r.clamp(max=20.0), 0.0)
    assert loss.item() == pytest.approx(float((coeffs * logp.double()).sum() / mask.sum()), rel=1e-5)


@pytest.mark.parametrize("ours,theirs", [("dppo_tv_binary", "dppo_tv"), ("dppo_kl_binary", "dppo_kl")])
def test_parity_with_verl_upstream(ours, theirs):
    """anchor=old, same C and thresholds: same loss and gradient as verl 0.9.1's own dppo_tv / dppo_kl.

    Inputs stay away from p ~ 1 (p <= 0.95), where verl's `log((1 - mu + 1e-8) / (1 - pi + 1e-8))` differs from
    our log1p form (SPEC, "Parity"); that regime is covered against fp64 in test_divergence_on_cpu.
    """
    torch.manual_seed(1)
    diffs = []
    for _ in range(5):
        theta, logp64, old, adv, mask = _batch(spread=0.3)
        logp = torch.log_softmax(theta.float(), -1)  # float path, as verl would see it
        ids = torch.randint(0, 16, (B, T))
        logp = logp.gather(-1, ids[..., None])[..., 0]
        old = old.float()
        pl_ours = DPPOPolicyLossConfig(loss_mode=ours, anchor="old", delta_low=0.04, delta_high=0.06, truncation_cap=3.0)
        cfg_ours = make_actor_config(pl_ours)
        from verl.workers.config import PolicyLossConfig

        cfg_theirs = make_actor_config(PolicyLossConfig(loss_mode=theirs), clip_ratio_low=0.04, clip_ratio_high=0.06, clip_ratio_c=3.0)
        l1, m1 = _get(ours)(old, logp, adv.float(), mask, "token-mean", cfg_ours)
        l2, m2 = _get(theirs)(old, logp, adv.float(), mask, "token-mean", cfg_theirs)
        (g1,) = torch.autograd.grad(l1, theta, retain_graph=True)
        (g2,) = torch.autograd.grad(l2, theta)
        assert 0 < m1["actor/dppo/masked_frac"] < 1  # the mask is exercised
        assert m1["actor/pg_clipfrac"] == pytest.approx(m2["actor/pg_clipfrac"])
        torch.testing.assert_close(l1, l2, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-7)
        diffs.append(max(abs(l1.item() - l2.item()), float((g1 - g2).abs().max())))
    print(f"parity {ours} vs {theirs}: max |loss/grad diff| = {max(diffs):.3e}")


def test_all_masked_and_empty_microbatch():
    pl = DPPOPolicyLossConfig(loss_mode="dppo_tv_topk", delta_low=0.01, delta_high=0.01)
    cfg = make_actor_config(pl)
    cfg.global_batch_info.update(dp_size=1, batch_num_tokens=50, global_batch_size=8)
    logp = torch.full((B, T), -0.5, requires_grad=True)
    mu = torch.full((B, T), -1.0)
    adv = torch.ones(B, T)
    # all masked: pi > mu, A > 0, D above threshold everywhere
    with handoff_scope(HandOff(rollout_log_probs=mu, divergence=torch.full((B, T), 0.5), topk_valid=torch.ones(B, T))):
        loss, m = _get("dppo_tv_topk")(mu, logp, adv, torch.ones(B, T, dtype=torch.bool), "token-mean", cfg)
    loss.backward()
    assert loss.item() == 0.0 and m["actor/dppo/masked_frac"] == 1.0 and bool((logp.grad == 0).all())
    # empty micro-batch (no response tokens) inside a non-empty global batch: zero loss, finite metrics
    logp.grad = None
    pad = torch.full((B, T), float("nan"))  # padding content must never leak
    with handoff_scope(HandOff(rollout_log_probs=pad, divergence=pad, topk_valid=pad)):
        loss, m = _get("dppo_tv_topk")(pad, logp, adv, torch.zeros(B, T, dtype=torch.bool), "token-mean", cfg)
    loss.backward()
    assert loss.item() == 0.0 and bool((logp.grad == 0).all())
    assert all(math.isfinite(v) for v in m.values())
    assert m["actor/dppo/topk_valid_frac"] == 1.0  # no response token, none invalid


def test_missing_mu_is_an_error_naming_the_key():
    cfg = make_actor_config(DPPOPolicyLossConfig(loss_mode="dppo_tv_binary"))
    x = torch.zeros(B, T)
    with pytest.raises(ValueError, match="rollout_log_probs.*calculate_log_probs"):
        _get("dppo_tv_binary")(x, x, x, x.bool(), "token-mean", cfg)
    with handoff_scope(HandOff(rollout_log_probs=None)):
        with pytest.raises(ValueError, match="rollout_log_probs"):
            _get("dppo_tv_binary")(x, x, x, x.bool(), "token-mean", cfg)


def test_topk_without_divergence_never_falls_back():
    cfg = make_actor_config(DPPOPolicyLossConfig(loss_mode="dppo_tv_topk"))
    x = torch.zeros(B, T)
    with handoff_scope(HandOff(rollout_log_probs=x)):
        with pytest.raises(ValueError, match="dppo_divergence.*never falls back"):
            _get("dppo_tv_topk")(x, x, x, x.bool(), "token-mean", cfg)


def test_bad_inputs():
    cfg = make_actor_config(DPPOPolicyLossConfig(loss_mode="dppo_kl_binary"))
    x = torch.zeros(B, T)
    mask = torch.ones(B, T, dtype=torch.bool)
    with handoff_scope(HandOff(rollout_log_probs=torch.zeros(B, T + 1))):
        with pytest.raises(ValueError, match=r"rollout_log_probs has shape \[4, 8\], expected \[4, 7\]"):
            _get("dppo_kl_binary")(x, x, x, mask, "token-mean", cfg)
    nan_mu = x.clone()
    nan_mu[2, 3] = float("nan")
    with handoff_scope(HandOff(rollout_log_probs=nan_mu)):
        with pytest.raises(ValueError, match=r"rollout_log_probs \(shape \[4, 7\]\) has NaN.*\[2, 3\]"):
            _get("dppo_kl_binary")(x, x, x, mask, "token-mean", cfg)
    inf_lp = x.clone()
    inf_lp[0, 0] = float("inf")
    with handoff_scope(HandOff(rollout_log_probs=x)):
        with pytest.raises(ValueError, match=r"log_prob \(shape \[4, 7\]\) has NaN/\+inf"):
            _get("dppo_kl_binary")(x, inf_lp, x, mask, "token-mean", cfg)
        with pytest.raises(ValueError, match=r"advantages has shape \[4, 6\]"):
            _get("dppo_kl_binary")(x, x, torch.zeros(B, T - 1), mask, "token-mean", cfg)


def test_config_validation():
    with pytest.raises(ValueError, match="policy_loss.anchor"):
        DPPOPolicyLossConfig(loss_mode="dppo_tv_binary", anchor="pi_old")
    with pytest.raises(ValueError, match="truncation_cap"):
        DPPOPolicyLossConfig(loss_mode="dppo_tv_binary", truncation_cap=0.5)
    with pytest.raises(ValueError, match="num_topk"):
        DPPOPolicyLossConfig(loss_mode="dppo_tv_topk", num_topk=0)
    with pytest.raises(ValueError, match="delta_high"):
        DPPOPolicyLossConfig(loss_mode="dppo_tv_topk", delta_high=-0.1)
    assert DPPOPolicyLossConfig(loss_mode="dppo_tv_topk", anchor="old").anchor == "old"  # decoupled (issue #21)
    with pytest.raises(ValueError, match="fused_logprobs=True is not available with anchor=old"):
        DPPOPolicyLossConfig(loss_mode="dppo_tv_topk", anchor="old", fused_logprobs=True)
    with pytest.raises(ValueError, match="direction=predictive needs a Top-K mode, got dppo_kl_binary"):
        DPPOPolicyLossConfig(loss_mode="dppo_kl_binary", direction="predictive")
    assert DPPOPolicyLossConfig(loss_mode="dppo_kl_topk", direction="predictive").direction == "predictive"


def test_plain_policy_loss_config_takes_defaults():
    from verl.workers.config import PolicyLossConfig

    from dppo_verl.config import resolve_knobs

    k = resolve_knobs("dppo_kl_topk", PolicyLossConfig(loss_mode="dppo_kl_topk"))
    assert (k.delta_low, k.delta_high, k.truncation_cap, k.num_topk, k.anchor, k.direction) == (0.05, 0.05, 20.0, 20, "rollout", "sampled")
    k = resolve_knobs("dppo_tv_binary", DPPOPolicyLossConfig(loss_mode="dppo_tv_binary", delta_high=0.2))
    assert (k.delta_low, k.delta_high) == (0.15, 0.2)


def test_rollout_correction_weights_on_a_rollout_anchored_loss_are_refused():
    """First-use twin of the launch rule: verl's pi_old/mu weights on top of Eq. 11's min(pi/mu, C) would count the
    correction twice. Anchored on pi_old (the ablation), verl's weights are the ablation's own and pass through."""
    x, mask = torch.zeros(B, T), torch.ones(B, T, dtype=torch.bool)
    cfg = make_actor_config(DPPOPolicyLossConfig(loss_mode="dppo_tv_binary"))
    with handoff_scope(HandOff(rollout_log_probs=x)):
        with pytest.raises(ValueError, match=r"algorithm\.rollout_correction\.rollout_is=null"):
            _get("dppo_tv_binary")(x, x, x, mask, "token-mean", cfg, torch.ones(B, T))
    old = make_actor_config(DPPOPolicyLossConfig(loss_mode="dppo_tv_binary", anchor="old"))
    logp = torch.full((B, T), -1.0, requires_grad=True)
    loss, _ = _get("dppo_tv_binary")(x - 1, logp, torch.ones(B, T), mask, "token-mean", old, torch.full((B, T), 2.0))
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.full((B, T), -2.0 / (B * T)))  # -A * r(=1) * w(=2), token-mean


@pytest.mark.parametrize("mode", ["dppo_tv_binary", "dppo_kl_topk"])
@pytest.mark.parametrize("poison", [float("nan"), float("inf"), float("-inf")])
def test_poisoned_advantage_is_an_error_naming_the_sample(mode, poison):
    """A NaN/inf advantage on a response token never becomes a NaN gradient: the loss refuses it, naming the sample."""
    theta, logp64, mu, adv, mask = _batch()
    logp = logp64.float()
    adv = adv.float()
    adv[2, 4] = poison
    cfg = make_actor_config(DPPOPolicyLossConfig(loss_mode=mode, num_topk=3))
    ho = HandOff(rollout_log_probs=mu.float(), divergence=torch.zeros(B, T), support_size=torch.ones(B, T),
                 topk_valid=torch.ones(B, T))
    with handoff_scope(ho):
        with pytest.raises(ValueError, match=rf"advantages \(shape \[4, 7\]\) is {poison} at sample 2 \(micro-batch "
                                             r"row\), response token 4: a NaN/inf reward or advantage"):
            _get(mode)(mu.float(), logp, adv, mask, "token-mean", cfg)
        # outside the response (mask 0) the value never reaches the sum: accepted, finite loss and gradient
        adv[2, 4] = 0.0
        adv[3, 5] = poison
        assert not mask[3, 5]
        leaf = logp64.detach().float().requires_grad_(True)
        loss, _ = _get(mode)(mu.float(), leaf, adv, mask, "token-mean", cfg)
        loss.backward()
        assert bool(torch.isfinite(loss)) and bool(torch.isfinite(leaf.grad).all())


def test_token_validation_is_one_device_read(monkeypatch):
    """mu, log pi and advantages are checked in the metrics' read: one device read in all."""
    theta, logp64, mu, adv, mask = _batch()
    cfg = make_actor_config(DPPOPolicyLossConfig(loss_mode="dppo_tv_binary"))
    calls = []
    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "nonzero"):
        real = getattr(torch.Tensor, name)

        def counting(self, *args, _real=real, _name=name, **kw):
            calls.append(_name)
            return _real(self, *args, **kw)

        monkeypatch.setattr(torch.Tensor, name, counting)
    with handoff_scope(HandOff(rollout_log_probs=mu.float())):
        _get("dppo_tv_binary")(mu.float(), logp64.float(), adv.float(), mask, "token-mean", cfg)
    monkeypatch.undo()
    assert calls == ["tolist"], calls


def test_masked_at_start_frac_counts_masked_tokens_already_outside_at_the_start():
    """Of the tokens Eq. 12 masks, the share whose divergence from the anchor already exceeded their side's delta at the
    step's start (verl's pi_old pass), against a plain Python count."""
    torch.manual_seed(3)
    pl = DPPOPolicyLossConfig(loss_mode="dppo_tv_binary", delta_low=0.05, delta_high=0.1)
    cfg = make_actor_config(pl)
    cfg.global_batch_info.update(dp_size=1, batch_num_tokens=B * T, global_batch_size=B)
    for _ in range(3):
        logp = torch.log(torch.rand(B, T) * 0.9 + 0.05)
        mu = torch.log(torch.rand(B, T) * 0.9 + 0.05)
        adv = torch.randn(B, T)
        mask = torch.rand(B, T) > 0.2
        start = torch.rand(B, T) * 0.2
        with handoff_scope(HandOff(rollout_log_probs=mu, start_divergence=start)):
            _, m = _get("dppo_tv_binary")(torch.zeros(B, T), logp, adv, mask.long(), "token-mean", cfg)
        masked = outside = 0
        for b in range(B):
            for t in range(T):
                p, q, a = math.exp(logp[b, t]), math.exp(mu[b, t]), float(adv[b, t])
                if not mask[b, t]:
                    continue
                d = abs(p - q)
                if (a > 0 and p > q and d > 0.1) or (a < 0 and p < q and d > 0.05):
                    masked += 1
                    outside += float(start[b, t]) > (0.1 if a > 0 else 0.05)
        assert masked > 0
        assert m["actor/dppo/masked_at_start_frac"] == pytest.approx(outside / masked, rel=1e-6)
    with handoff_scope(HandOff(rollout_log_probs=mu)):  # verl's pi_old pass skipped (bypass): not logged
        _, m = _get("dppo_tv_binary")(torch.zeros(B, T), logp, adv, mask.long(), "token-mean", cfg)
    assert "actor/dppo/masked_at_start_frac" not in m
