"""CPPO (cppo_<divergence>_<estimator>): position-aware thresholds and prefix budget, Binary TV, a hand-computed
case, a randomized comparison with the token-by-token reference loop, and the config contract."""

import math

import pytest
import torch

import reference as ref
from conftest import make_actor_config

DELTA, W_MIN, DELTA_PRE = 0.15, 0.8, 0.02

# One response of L = 5 tokens (delta = 0.15, w_min = 0.8, delta_pre = 0.02), worked by hand:
#   mu      .30  .40  .50  .20  .60
#   pi      .40  .52  .48  .36  .55
#   A       +1   +1   -1   +1   +1
#   d=|pi-mu| .10 .12 .02 .16 .05      outward (A (pi - mu) > 0): yes yes yes yes no
#   w_t = 1 - 0.2 t / 4        1    .95  .90  .85  .80
#   z_t = w_t d_t             .100 .114 .018 .136 .040
#   P_t = sum_{s<t} z_s       0    .100 .214 .232 .368
#   W_t = sum_{s<t} w_s       0    1    1.95 2.85 3.70
#   P90(d): sorted .02 .05 .10 .12 .16, index 0.9 * 4 = 3.6 -> .12 + .6 * .04 = .144; clamp to [.02, .04] -> db = .04
#   db W_t - P_t              0   -.060 -.136 -.118 -.220
#   tau_t = min(.15, .15 + db W_t - P_t)   .150 .090 .014 .032 -.070
#   drop iff outward and z_t > tau_t:       no   yes  yes  yes  no (inward)
# DPPO with the same delta drops only t = 3 (d = .16 > .15).
HAND_MU = [0.30, 0.40, 0.50, 0.20, 0.60]
HAND_PI = [0.40, 0.52, 0.48, 0.36, 0.55]
HAND_ADV = [1.0, 1.0, -1.0, 1.0, 1.0]
HAND_Z = [0.100, 0.114, 0.018, 0.136, 0.040]
HAND_TAU = [0.150, 0.090, 0.014, 0.032, -0.070]
HAND_KEEP = [True, False, False, False, True]


def _get(mode):
    from verl.trainer.ppo.core_algos import get_policy_loss_fn

    return get_policy_loss_fn(mode)


def _cfg(mode, **kw):
    from dppo_verl.config import DPPOPolicyLossConfig

    return make_actor_config(DPPOPolicyLossConfig(loss_mode=mode, **kw))


def _hand_batch():
    """The hand case as row 0, plus a 2-token response (row 1) whose padding holds garbage."""
    lp = torch.tensor([HAND_PI, [0.5, 0.5, 0.9, 0.9, 0.9]]).log()
    mu = torch.tensor([HAND_MU, [0.45, 0.55, 0.1, 0.1, 0.1]]).log()
    adv = torch.tensor([HAND_ADV, [1.0, -1.0, 1.0, 1.0, 1.0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], dtype=torch.bool)
    return lp, mu, adv, mask


def test_thresholds_by_hand():
    from dppo_verl.ops.cppo import cppo_thresholds

    lp, mu, adv, mask = _hand_batch()
    d = (lp.exp() - mu.exp()).abs()
    d[1, 2:] = float("nan")  # padding must not reach the sums or the quantile
    z, tau_low, tau_high = cppo_thresholds(d, mask, delta_low=DELTA, delta_high=DELTA, w_min=W_MIN, delta_pre=DELTA_PRE)
    torch.testing.assert_close(z[0], torch.tensor(HAND_Z), rtol=0, atol=1e-6)
    torch.testing.assert_close(tau_high[0], torch.tensor(HAND_TAU), rtol=0, atol=1e-6)
    torch.testing.assert_close(tau_low, tau_high)  # one delta here
    # row 1, L = 2: w = (1, .8); d = (.05, .05); P90 = .05 -> db = .04; tau = (.15, min(.15, .15 + .04 - .05) = .14)
    torch.testing.assert_close(z[1, :2], torch.tensor([0.05, 0.04]), rtol=0, atol=1e-6)
    torch.testing.assert_close(tau_high[1, :2], torch.tensor([0.15, 0.14]), rtol=0, atol=1e-6)
    assert bool(torch.isfinite(z).all() & torch.isfinite(tau_high).all())


def test_loss_masks_the_hand_case_and_dppo_does_not():
    lp, mu, adv, mask = _hand_batch()
    from dppo_verl.handoff import HandOff, handoff_scope

    for mode, want in (("cppo_tv_binary", HAND_KEEP), ("dppo_tv_binary", [True, True, True, False, True])):
        cfg = _cfg(mode, delta_low=DELTA, delta_high=DELTA)
        x = lp.clone().requires_grad_(True)
        with handoff_scope(HandOff(rollout_log_probs=mu)):
            loss, m = _get(mode)(mu, x, adv, mask, "token-mean", cfg)
        (g,) = torch.autograd.grad(loss, x)
        # token-mean over 7 tokens: d loss / d log pi_t = -A_t min(r_t, C) M_t / 7
        r = (lp - mu).exp()
        keep = torch.tensor([want, [True] * 5])
        torch.testing.assert_close(g, torch.where(mask & keep, -adv * r / 7, 0.0), rtol=1e-5, atol=1e-7)
        assert m["actor/dppo/masked_frac"] == pytest.approx((5 - sum(want)) / 7)


def test_row_quantile_matches_torch_quantile():
    from dppo_verl.ops.cppo import row_quantile

    g = torch.Generator().manual_seed(3)
    x = torch.rand(7, 11, generator=g)
    mask = torch.rand(7, 11, generator=g) > 0.3
    mask[0] = False
    mask[1] = False
    mask[1, 4] = True
    got = row_quantile(x, mask, 0.9)
    for b in range(7):
        want = 0.0 if not mask[b].any() else float(torch.quantile(x[b][mask[b]], 0.9))
        assert float(got[b]) == pytest.approx(want, abs=1e-7)


@pytest.mark.parametrize("seed", [0, 1])
def test_random_batch_matches_the_reference_loop(seed):
    """Mixed lengths (1 .. T), an interior non-response token, both advantage signs, delta_low != delta_high."""
    from dppo_verl.handoff import HandOff, handoff_scope

    g = torch.Generator().manual_seed(seed)
    b, t = 6, 9
    mu = torch.rand(b, t, generator=g) * 0.8 + 0.1
    pi = (mu + (torch.rand(b, t, generator=g) - 0.5) * 0.3).clamp(0.02, 0.98)
    adv = torch.randn(b, t, generator=g)
    lens = [9, 1, 5, 7, 3, 8]
    mask = torch.arange(t)[None, :] < torch.tensor(lens)[:, None]
    mask[3, 2] = False  # e.g. a tool-output token inside the response
    dl, dh, w_min, dpre = 0.06, 0.09, 0.7, 0.015
    cfg = _cfg("cppo_tv_binary", delta_low=dl, delta_high=dh, cppo_w_min=w_min, cppo_delta_pre=dpre)
    x = pi.log().requires_grad_(True)
    with handoff_scope(HandOff(rollout_log_probs=mu.log())):
        loss, m = _get("cppo_tv_binary")(mu.log(), x, adv, mask, "token-mean", cfg)
    (grad,) = torch.autograd.grad(loss, x)
    dropped = 0
    for i in range(b):
        keep = ref.cppo_keep(pi[i].tolist(), mu[i].tolist(), adv[i].tolist(), mask[i].tolist(), dl, dh, w_min, dpre)
        for j in range(t):
            want = -float(adv[i, j]) * float(pi[i, j] / mu[i, j]) * keep[j] * float(mask[i, j]) / int(mask.sum())
            assert float(grad[i, j]) == pytest.approx(want, rel=1e-5, abs=1e-8), (i, j)
            dropped += (not keep[j]) and bool(mask[i, j])
    assert 0 < dropped < int(mask.sum())  # the case exercises the rule
    assert m["actor/dppo/masked_frac"] == pytest.approx(dropped / int(mask.sum()))


def test_position_weights_edges():
    from dppo_verl.ops.cppo import position_weights

    mask = torch.tensor([[1, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0], [1, 0, 1, 0]], dtype=torch.bool)
    w = position_weights(mask, 0.6)
    torch.testing.assert_close(w, torch.tensor([[1.0, 0, 0, 0], [1.0, 13 / 15, 11 / 15, 0.6], [0, 0, 0, 0], [1.0, 0.8, 0.6, 0]]))


def test_config_contract():
    from dppo_verl.config import DPPOPolicyLossConfig, resolve_knobs

    k = resolve_knobs("cppo_tv_binary", DPPOPolicyLossConfig(loss_mode="cppo_tv_binary"))
    assert (k.shape, k.divergence, k.estimator, k.cppo_w_min, k.cppo_delta_pre, k.delta_high) == ("cppo", "tv", "binary", 0.8, 0.02, 0.15)
    with pytest.raises(ValueError, match=r"policy_loss.cppo_w_min=0.5 is read only by cppo_\* loss modes, not by dppo_tv_binary"):
        DPPOPolicyLossConfig(loss_mode="dppo_tv_binary", cppo_w_min=0.5)
    with pytest.raises(ValueError, match=r"policy_loss\.cppo_w_min must be in \(0, 1\]"):
        DPPOPolicyLossConfig(loss_mode="cppo_tv_binary", cppo_w_min=1.5)
    with pytest.raises(ValueError, match="policy_loss.cppo_delta_pre must be a number >= 0"):
        DPPOPolicyLossConfig(loss_mode="cppo_tv_binary", cppo_delta_pre=-0.1)
    from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY

    assert {"cppo_tv_binary", "cppo_kl_topk", "drpo_tv_binary", "drpo_kl_topk"} <= set(POLICY_LOSS_REGISTRY)
    assert math.isclose(resolve_knobs("cppo_kl_binary", {"loss_mode": "cppo_kl_binary"}).delta_low, 0.05)
