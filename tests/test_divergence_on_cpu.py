"""Divergences over support + rest vs the dense fp64 full-vocabulary reference (tests/reference.py)."""

import math

import pytest
import torch

import reference as ref
from dppo_verl.ops.divergence import REST_EPS, get_divergence, kl, register_divergence, tv
from dppo_verl.ops.support import build_support

V = 151936  # Qwen3 vocabulary: a real-size partition
K = 20
# fp32 log-probs carry a relative error of ~6e-8; turned into probabilities and summed over <= 22 cells the
# absolute error stays below ~2e-6. 5e-6 leaves headroom and still catches any wrong cell (>= 1e-4 here).
ATOL = 5e-6
FNS = {"tv": tv, "kl": kl}


def _token_case(n_tokens, spread, sampled_outside_topk, dup=False, pad=0):
    """Random mu, pi over V for n tokens, the rollout top-K of mu and a sampled token per token."""
    z_mu = torch.randn(n_tokens, V, dtype=torch.float64) * 3.0
    z_pi = z_mu + spread * torch.randn(n_tokens, V, dtype=torch.float64)
    lq, lp = ref.full_logprobs(z_mu), ref.full_logprobs(z_pi)
    top_lq, top_ids = lq.topk(K, dim=-1)  # ranks 1..K of mu
    if sampled_outside_topk:
        ranks = torch.argsort(lq, dim=-1, descending=True)
        sampled = ranks[:, K + 5]  # a token just outside the top-K
    else:
        sampled = top_ids[:, 3]
    top_ids, top_lq = top_ids.clone(), top_lq.clone()
    if dup:  # engine glitch: rank 8 repeats rank 2's id (and logprob)
        top_ids[:, 8], top_lq[:, 8] = top_ids[:, 2], top_lq[:, 2]
    if pad:
        top_lq[:, K - pad :] = float("-inf")
        top_ids[:, K - pad :] = 0
    return lq, lp, top_ids, top_lq, sampled


def _support_ids(top_ids, top_lq, sampled, t):
    real = [int(i) for i, l in zip(top_ids[t], top_lq[t]) if math.isfinite(float(l))]
    return real + [int(sampled[t])]


@pytest.mark.parametrize("name", ["tv", "kl"])
@pytest.mark.parametrize(
    "spread,outside,dup,pad",
    [(0.05, False, False, 0), (0.3, True, False, 0), (1.0, True, True, 0), (0.3, False, True, 5), (0.3, True, False, 7)],
)
def test_topk_matches_reference(name, spread, outside, dup, pad):
    lq, lp, top_ids, top_lq, sampled = _token_case(4, spread, outside, dup, pad)
    sup = build_support(sampled, lq.gather(-1, sampled[:, None])[:, 0].float(), top_ids.int(), top_lq.float(), vocab_size=V)
    assert sup.ids.shape == (4, K + 1)
    pi_at = lp.gather(-1, sup.ids).float()  # what the vocab-parallel op delivers, fp32
    got = FNS[name](pi_at, sup.mu_logp, sup.valid).double()
    for t in range(4):
        support = _support_ids(top_ids, top_lq, sampled, t)
        want = ref.PARTITION[name](lp[t].exp(), lq[t].exp(), support)
        assert got[t].item() == pytest.approx(want, abs=ATOL)
        # coarser partition -> lower bound of the full-vocabulary divergence
        assert got[t].item() <= ref.FULL[name](lp[t].exp(), lq[t].exp()) + ATOL
        assert int(sup.valid[t].sum()) == len(set(support))


@pytest.mark.parametrize("name", ["tv", "kl"])
def test_binary_is_one_slot_support(name):
    lq, lp, _, _, sampled = _token_case(6, 0.5, True)
    sup = build_support(sampled, lq.gather(-1, sampled[:, None])[:, 0].float())
    assert sup.ids.shape == (6, 1) and bool(sup.valid.all())
    got = FNS[name](lp.gather(-1, sup.ids).float(), sup.mu_logp, sup.valid)
    for t in range(6):
        want = ref.PARTITION[name](lp[t].exp(), lq[t].exp(), [int(sampled[t])])
        assert got[t].item() == pytest.approx(want, abs=ATOL)
    if name == "tv":  # Eq. 13 reduces to |mu_t - pi_t|
        p = lp.gather(-1, sampled[:, None])[:, 0].exp()
        q = lq.gather(-1, sampled[:, None])[:, 0].exp()
        torch.testing.assert_close(got.double(), (p - q).abs(), atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ["tv", "kl"])
def test_bf16_inputs_near_p_one(name):
    """p ~ 1 is the classic failure: 1 - p must not round to 0. Reference: fp64 of the same bf16 values."""
    mu = torch.tensor([-1e-3, -2e-3, -5e-4, -0.02, -1e-4], dtype=torch.bfloat16)
    pi = torch.tensor([-1e-4, -4e-3, -5e-3, -1e-3, -3e-4], dtype=torch.bfloat16)
    got = FNS[name](pi[:, None], mu[:, None]).double()
    q, p = mu.double().exp(), pi.double().exp()
    if name == "tv":
        want = (q - p).abs()
    else:
        want = q * (mu.double() - pi.double()) + (1 - q) * torch.log(torch.expm1(mu.double()) / torch.expm1(pi.double()))
    # relative accuracy matters here (KL ~ 1e-4 .. 1e-2); fp32 expm1/log1p keep ~1e-6 relative
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-9)
    assert bool((got > 0).all())


def test_support_summing_past_one_stays_finite():
    """Rounding can make the support sum to > 1: the rest bucket is clamped, never NaN."""
    logp = torch.log(torch.tensor([[0.6, 0.41]]))
    for fn in (tv, kl):
        out = fn(logp, logp)
        assert torch.isfinite(out).all() and out.item() == pytest.approx(0.0, abs=1e-6)
    assert REST_EPS > 0


def test_all_invalid_row_is_zero():
    logp = torch.full((2, 3), float("-inf"))
    valid = torch.zeros(2, 3, dtype=torch.bool)
    assert torch.equal(tv(logp, logp, valid), torch.zeros(2))
    assert torch.equal(kl(logp, logp, valid), torch.zeros(2))


def test_registry_refuses_duplicates_and_lists_names():
    with pytest.raises(ValueError, match="already registered"):
        register_divergence("tv", default_delta=0.1)(lambda p, q, valid=None: p)
    with pytest.raises(KeyError, match=r"registered: \[.*'kl'.*'tv'"):
        get_divergence("js")
    assert get_divergence("tv").default_delta == 0.15
    assert get_divergence("kl").default_delta == 0.05


def _hellinger_sq(pi_logp, mu_logp, valid=None):
    from dppo_verl.ops.divergence import support_probs

    p, _, p_rest, _ = support_probs(pi_logp, valid)
    q, _, q_rest, _ = support_probs(mu_logp, valid)
    return 1.0 - (p * q).sqrt().sum(-1) - (p_rest * q_rest).sqrt()


def test_registering_a_divergence_adds_loss_modes():
    """A new divergence (squared Hellinger) becomes dppo_hellinger_{binary,topk} in verl's registry."""
    from verl.trainer.ppo.core_algos import get_policy_loss_fn

    from dppo_verl.ops.divergence import divergence_names

    if "hellinger" not in divergence_names():
        register_divergence("hellinger", default_delta=0.02)(_hellinger_sq)
    assert get_policy_loss_fn("dppo_hellinger_binary").dppo_loss_mode == "dppo_hellinger_binary"
    assert get_policy_loss_fn("dppo_hellinger_topk").dppo_loss_mode == "dppo_hellinger_topk"
    # and its math goes through the same support machinery: check against the dense partition
    lq, lp, top_ids, top_lq, sampled = _token_case(2, 0.5, True)
    sup = build_support(sampled, lq.gather(-1, sampled[:, None])[:, 0].float(), top_ids, top_lq.float())
    got = get_divergence("hellinger").fn(lp.gather(-1, sup.ids).float(), sup.mu_logp, sup.valid)
    for t in range(2):
        s = sorted(set(_support_ids(top_ids, top_lq, sampled, t)))
        p, q = lp[t].exp(), lq[t].exp()
        inside = torch.zeros(V, dtype=torch.bool)
        inside[s] = True
        want = 1 - float((p[s] * q[s]).sqrt().sum()) - math.sqrt(float(p[~inside].sum()) * float(q[~inside].sum()))
        assert got[t].item() == pytest.approx(want, abs=ATOL)
