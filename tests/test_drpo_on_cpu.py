"""DRPO (drpo_<divergence>_<estimator>): the smooth weight w_t = 1 - sign(A_t) s_t D_t / delta_t. Binary TV against the
gradient of the reported objective -A r + |A| (pi - mu)^2 / (2 delta mu) (fp64 autograd), the boundary (weight exactly
0), the corrective side, the generic-divergence and predictive forms, and metrics."""

import math

import pytest
import torch

import reference as ref
from conftest import make_actor_config

B, T = 4, 7


def _get(mode):
    from verl.trainer.ppo.core_algos import get_policy_loss_fn

    return get_policy_loss_fn(mode)


def _cfg(mode, **kw):
    from dppo_verl.config import DPPOPolicyLossConfig

    return make_actor_config(DPPOPolicyLossConfig(loss_mode=mode, **kw))


def _run(mode, logp, mu, adv, mask, cfg, **handoff):
    from dppo_verl.handoff import HandOff, handoff_scope

    with handoff_scope(HandOff(rollout_log_probs=mu, **handoff)):
        return _get(mode)(mu, logp, adv, mask, "token-mean", cfg)


def test_gradient_is_the_reported_objectives():
    """Through random logits theta (fp64 -> the loss sees fp32 log pi): grad of our loss == grad of the token-mean
    of -A r + |A| (pi - mu)^2 / (2 delta mu), delta = delta_high (A > 0) / delta_low (A < 0), with r <= C."""
    g = torch.Generator().manual_seed(0)
    theta = torch.randn(B, T, 12, generator=g, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 12, (B, T), generator=g)
    logp64 = torch.log_softmax(theta, -1).gather(-1, ids[..., None])[..., 0]
    mu = (logp64.detach() + 0.5 * torch.randn(B, T, generator=g, dtype=torch.float64)).clamp(max=-0.05)
    adv = torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 4:] = False
    dl, dh = 0.02, 0.03
    loss, m = _run("drpo_tv_binary", logp64.float(), mu.float(), adv.float(), mask,
                   _cfg("drpo_tv_binary", delta_low=dl, delta_high=dh, truncation_cap=1e4))
    (got,) = torch.autograd.grad(loss, theta, retain_graph=True)
    objective = torch.where(mask, ref.drpo_objective(logp64, mu.float().double(), adv.float().double(), dl, dh), 0.0)
    (want,) = torch.autograd.grad(objective.sum() / mask.sum(), theta)
    torch.testing.assert_close(got, want, rtol=2e-4, atol=1e-6)
    # the batch has tokens on both sides of the boundary: some weights negative, some above 1
    assert 0 < m["actor/dppo/masked_frac"] < 1


@pytest.mark.parametrize("adv,delta_low,delta_high", [(1.0, 0.3, 0.1), (-2.0, 0.1, 0.3)])
def test_weight_by_hand_zero_at_the_boundary_corrective_beyond(adv, delta_low, delta_high):
    """mu = 0.5, delta = 0.1 on the pushed side. d loss / d log pi = -A r w with w = 1 - sign(A) (pi - mu) / delta:

        pi     0.40 (toward mu)  0.45             0.50      0.55 (inside)   0.60 (boundary)  0.70 (beyond)
        A > 0: w = 2             1.5              1         0.5             0                -1
    and mirrored (pi -> 1 - pi) for A < 0, where delta_low is the pushed side's threshold.
    """
    pis = [0.40, 0.45, 0.50, 0.55, 0.60, 0.70]
    ws = [2.0, 1.5, 1.0, 0.5, 0.0, -1.0]
    if adv < 0:
        pis = [1.0 - p for p in pis]
    logp = torch.tensor([pis]).log().requires_grad_(True)
    mu = torch.full((1, 6), 0.5).log()
    a = torch.full((1, 6), adv)
    loss, m = _run("drpo_tv_binary", logp, mu, a, torch.ones(1, 6, dtype=torch.bool),
                   _cfg("drpo_tv_binary", delta_low=delta_low, delta_high=delta_high))
    (g,) = torch.autograd.grad(loss, logp)
    want = torch.tensor([[-adv * (p / 0.5) * w / 6 for p, w in zip(pis, ws)]])
    torch.testing.assert_close(g, want, rtol=1e-5, atol=2e-7)
    assert abs(float(g[0, 4])) < 2e-7  # zero at the boundary (fp32 rounding of exp(log 0.6) - 0.5 only)
    assert float(g[0, 5]) * adv > 0  # beyond: descent (-g) moves log pi back toward mu: down for A > 0, up for A < 0
    # and the same from the reported objective, by fp64 autograd
    lp64 = torch.tensor(pis, dtype=torch.float64).log().requires_grad_(True)
    obj = ref.drpo_objective(lp64, torch.full((6,), 0.5, dtype=torch.float64).log(), torch.full((6,), adv), delta_low, delta_high)
    (g64,) = torch.autograd.grad(obj.sum() / 6, lp64)
    torch.testing.assert_close(g[0].double(), g64, rtol=1e-5, atol=2e-7)
    # "beyond" is outside the region in the outward direction; the boundary token sits at D = delta up to fp32
    # rounding of exp(log pi), so it may count either way; nothing inside does.
    assert m["actor/dppo/masked_frac"] in (pytest.approx(1 / 6), pytest.approx(2 / 6))
    assert m["actor/dppo/weight_mean"] == pytest.approx(sum(ws) / 6, abs=1e-5)


def test_generic_divergence_and_predictive_direction():
    """drpo_kl_topk: w_t = 1 - sign(A_t) s_t D_t / delta_t with D_t from the hand-off; s_t = sign(pi - mu), or the
    sign of D_dot with direction=predictive."""
    logp = torch.tensor([[-1.0, -1.0, -2.0, -2.0]])
    mu = torch.tensor([[-1.2, -1.2, -1.5, -1.5]])  # pi > mu, pi > mu, pi < mu, pi < mu
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    div = torch.tensor([[0.02, 0.10, 0.05, 0.15]])
    ddot = torch.tensor([[-0.3, 0.2, 0.1, -0.4]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    r = (logp - mu).exp()
    for direction, sign in (("sampled", torch.sign(logp - mu)), ("predictive", torch.sign(ddot))):
        cfg = _cfg("drpo_kl_topk", delta_low=0.05, delta_high=0.1, direction=direction)
        x = logp.clone().requires_grad_(True)
        loss, _ = _run("drpo_kl_topk", x, mu, adv, mask, cfg, divergence=div, support_size=torch.full((1, 4), 9.0),
                       ddot=ddot, topk_valid=torch.ones(1, 4))
        (g,) = torch.autograd.grad(loss, x)
        delta = torch.where(adv > 0, 0.1, 0.05)
        w = 1.0 - torch.sign(adv) * sign * div / delta
        torch.testing.assert_close(g, -adv * r * w / 4, rtol=1e-5, atol=1e-7)
    # hand values for the sampled direction: w = 1 - .02/.1 = .8; 1 + .1/.05 = 3; 1 + .05/.1 = 1.5; 1 - .15/.05 = -2
    w_sampled = 1.0 - torch.sign(adv) * torch.sign(logp - mu) * div / torch.where(adv > 0, 0.1, 0.05)
    torch.testing.assert_close(w_sampled, torch.tensor([[0.8, 3.0, 1.5, -2.0]]))


def test_truncation_cap_bounds_the_ratio_and_padding_is_ignored():
    logp = torch.tensor([[-0.1, -0.2, float("-inf")]]).requires_grad_(True)
    mu = torch.tensor([[-5.0, -0.3, 0.0]])  # r_0 = e^4.9 > C = 20
    adv = torch.tensor([[-1.0, 1.0, 1.0]])
    mask = torch.tensor([[True, True, False]])
    loss, m = _run("drpo_tv_binary", logp, mu, adv, mask, _cfg("drpo_tv_binary", delta_low=0.9, delta_high=0.2))
    (g,) = torch.autograd.grad(loss, logp)
    w0 = 1.0 - (-1.0) * (math.exp(-0.1) - math.exp(-5.0)) / 0.9  # toward mu for A < 0: amplified
    w1 = 1.0 - (math.exp(-0.2) - math.exp(-0.3)) / 0.2
    want = torch.tensor([[1.0 * 20.0 * w0 / 2, -math.exp(0.1) * w1 / 2, 0.0]])
    torch.testing.assert_close(g, want, rtol=1e-5, atol=1e-7)
    assert m["actor/dppo/truncated_frac"] == pytest.approx(0.5) and math.isfinite(loss.item())
