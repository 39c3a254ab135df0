"""TRM sequence veto (delta_seq, seq_agg): whole responses dropped when max_t (or mean_t) D_t > delta_seq, on top of
the token rule of any shape; seq_dropped_frac; config contract."""

import math

import pytest
import torch

import reference as ref
from conftest import make_actor_config

# D_t per response token (Binary TV |pi - mu|), hand-picked; padding (mask 0) holds garbage.
#            t:   0     1     2     3        max    mean
#   seq 0       .02   .03   .01   (pad)     .03    .02      kept under both (delta_seq = .1 max / .05 mean)
#   seq 1       .02   .20   .02   .02       .20    .065     max: dropped (.20 > .1); mean: dropped (.065 > .05)
#   seq 2       .01   .15   .01   .01       .15    .045     max: dropped; mean: kept (.045 <= .05) - one spike
#   seq 3       (empty response)                            kept, not counted in seq_dropped_frac
MU = [[0.30, 0.40, 0.50, 0.9], [0.30, 0.40, 0.50, 0.60], [0.30, 0.40, 0.50, 0.60], [0.5, 0.5, 0.5, 0.5]]
D = [[0.02, 0.03, 0.01, 0.5], [0.02, 0.20, 0.02, 0.02], [0.01, 0.15, 0.01, 0.01], [0.3, 0.3, 0.3, 0.3]]
MASK = [[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 1], [0, 0, 0, 0]]


def _batch():
    mu = torch.tensor(MU)
    pi = mu + torch.tensor(D)  # pi > mu everywhere
    pi[0, 3] = float("nan")  # garbage padding
    return pi.log(), mu.log(), torch.tensor(MASK, dtype=torch.bool)


def _loss(mode, adv, **kw):
    from verl.trainer.ppo.core_algos import get_policy_loss_fn

    from dppo_verl.config import DPPOPolicyLossConfig
    from dppo_verl.handoff import HandOff, handoff_scope

    lp, mu, mask = _batch()
    cfg = make_actor_config(DPPOPolicyLossConfig(loss_mode=mode, **kw))
    x = lp.clone().requires_grad_(True)
    with handoff_scope(HandOff(rollout_log_probs=mu)):
        loss, m = get_policy_loss_fn(mode)(mu, x, adv, mask, "token-mean", cfg)
    (g,) = torch.autograd.grad(loss, x)
    return g, m


@pytest.mark.parametrize("agg,delta_seq,keep", [("max", 0.1, [True, False, False, True]),
                                                ("mean", 0.05, [True, False, True, True])])
def test_sequence_keep_by_hand(agg, delta_seq, keep):
    from dppo_verl.ops.mask import sequence_keep

    d = torch.tensor(D)
    mask = torch.tensor(MASK, dtype=torch.bool)
    got, stat = sequence_keep(d, mask, delta_seq=delta_seq, agg=agg)
    assert got.tolist() == keep
    assert got.tolist() == [ref.trm_keep(D[b], [bool(x) for x in MASK[b]], delta_seq, agg) for b in range(4)]
    want_stat = {"max": [0.03, 0.20, 0.15, 0.0], "mean": [0.02, 0.065, 0.045, 0.0]}[agg]
    torch.testing.assert_close(stat, torch.tensor(want_stat), rtol=0, atol=1e-7)


@pytest.mark.parametrize("agg,delta_seq,seq_keep", [("max", 0.1, [1, 0, 0, 1]), ("mean", 0.05, [1, 0, 1, 1])])
def test_veto_combines_with_the_token_mask(agg, delta_seq, seq_keep):
    """dppo_tv_binary, delta 0.12 and A = +1 everywhere (pi > mu: outward): the token rule alone drops the two
    spikes (.20, .15 > .12); the veto then drops whole sequences. Gradient = -A r M_t V_b / n_tokens."""
    adv = torch.ones(4, 4)
    g, m = _loss("dppo_tv_binary", adv, delta_low=0.12, delta_high=0.12, delta_seq=delta_seq, seq_agg=agg)
    lp, mu, mask = _batch()
    token_keep = torch.tensor(D) <= 0.12
    keep = mask & token_keep & torch.tensor(seq_keep, dtype=torch.bool)[:, None]
    r = torch.where(mask, (lp - mu).exp(), 0.0)
    torch.testing.assert_close(g, torch.where(keep, -r / 11, 0.0), rtol=1e-5, atol=1e-8)
    n_seq = 3  # sequences with a response token
    assert m["actor/dppo/seq_dropped_frac"] == pytest.approx((3 - sum(seq_keep[:3])) / n_seq)
    assert m["actor/dppo/masked_frac"] == pytest.approx(2 / 11)  # the token rule's own count, unchanged by TRM
    assert m["actor/dppo/weight_mean"] == pytest.approx(float(keep.sum()) / 11)


def test_veto_off_by_default_and_applies_to_smooth_shapes():
    adv = torch.ones(4, 4)
    g_off, m_off = _loss("dppo_tv_binary", adv, delta_low=0.3, delta_high=0.3)
    assert m_off["actor/dppo/seq_dropped_frac"] == 0.0 and bool((g_off[:3][torch.tensor(MASK[:3]).bool()] != 0).all())
    g, m = _loss("drpo_tv_binary", adv, delta_low=0.3, delta_high=0.3, delta_seq=0.1)
    assert bool((g[1:3] == 0).all()) and bool((g[0, :3] != 0).all())  # sequences 1, 2 vetoed, DRPO weight elsewhere
    w0 = 1.0 - torch.tensor(D[0][:3]) / 0.3
    r0 = (torch.tensor(MU[0][:3]) + torch.tensor(D[0][:3])) / torch.tensor(MU[0][:3])
    torch.testing.assert_close(g[0, :3], -r0 * w0 / 11, rtol=1e-5, atol=1e-8)
    assert m["actor/dppo/seq_dropped_frac"] == pytest.approx(2 / 3)


def test_config_contract():
    from dppo_verl.config import DPPOPolicyLossConfig, resolve_knobs

    k = resolve_knobs("dppo_kl_topk", DPPOPolicyLossConfig(loss_mode="dppo_kl_topk", delta_seq=0.3, seq_agg="mean"))
    assert (k.delta_seq, k.seq_agg) == (0.3, "mean")
    assert resolve_knobs("dppo_kl_topk", {"loss_mode": "dppo_kl_topk"}).delta_seq is None
    with pytest.raises(ValueError, match=r"policy_loss\.delta_seq must be a positive number or null \(TRM sequence threshold\), got 0\.0"):
        DPPOPolicyLossConfig(loss_mode="dppo_tv_binary", delta_seq=0.0)
    with pytest.raises(ValueError, match=r"policy_loss.seq_agg must be one of \['max', 'mean'\], got 'sum'"):
        DPPOPolicyLossConfig(loss_mode="dppo_tv_binary", delta_seq=0.1, seq_agg="sum")
    with pytest.raises(ValueError, match="delta_seq"):
        DPPOPolicyLossConfig(loss_mode="dppo_tv_binary", delta_seq=math.inf)
