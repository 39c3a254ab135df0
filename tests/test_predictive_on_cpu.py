"""Predictive direction (direction=predictive): D_dot against fp64 autograd d/de D(z + e (e_k - pi)) at e = 0 over
the full softmax, for TV and KL, at tp = 1, 2, 4 (gloo); kinks; binary reduction; the hook; sampled vs predictive.

The gloo workers import only ``dppo_verl.ops`` (pure torch) through :func:`_ops`, without the package's verl plugin
install: importing verl in 4 fresh processes costs ~100 s on a loaded 2-core runner, torch alone ~20 s.
"""

import functools
import math
import os
import sys
import types

import pytest
import torch

import reference as ref
from dist_utils import run_distributed

F64 = torch.float64
V, N, K = 512, 12, 4  # V divisible by 4 (tp = 4 shards of 128)
NAMES = ("tv", "kl")


def _ops(worker=False):
    """``(build_support, predictive_ddot, vocab_parallel_stats, divergence fns)``; in a fresh gloo ``worker`` process
    without running ``dppo_verl/__init__`` (the verl plugin install). Never stubbed in the pytest process."""
    if not worker:
        import dppo_verl.plugin  # noqa: F401  (the real package: other tests in this process need the plugin)
    elif "dppo_verl" not in sys.modules:
        pkg = types.ModuleType("dppo_verl")
        pkg.__path__ = [os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "dppo_verl")]
        sys.modules["dppo_verl"] = pkg
    from dppo_verl.ops.divergence import get_divergence
    from dppo_verl.ops.predictive import predictive_ddot
    from dppo_verl.ops.support import build_support
    from dppo_verl.ops.vocab_parallel import vocab_parallel_stats

    return build_support, predictive_ddot, vocab_parallel_stats, {n: get_divergence(n).fn for n in NAMES}


@functools.lru_cache(maxsize=None)
def _case(seed=0):
    """Trainer logits (fp32) and a rollout mu nearby: its top-K (fp32 logprobs) and a sampled token per row."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(N, V, generator=g) * 2.0
    logits[0, 3] = 14.0  # peaked row: the support holds ~99.7% of the mass, Q_R is small
    lq = torch.log_softmax(logits.double() + 0.8 * torch.randn(N, V, generator=g, dtype=F64), -1)
    top_lq, top_ids = lq.topk(K, dim=-1)
    sampled = torch.multinomial(lq.exp(), 1, generator=g)[:, 0]
    sampled[1] = lq[1].argsort(descending=True)[K + 5]  # outside the top-K: the appended slot is k
    sampled[2] = top_ids[2, 1]  # inside the top-K: the appended slot is invalid, k is rank 2
    mu_sampled = lq.gather(-1, sampled[:, None])[:, 0]
    return logits, top_ids.int(), top_lq.float(), sampled, mu_sampled.float()


def _ref_row(name, logits, top_ids, top_lq, sampled, mu_sampled, n):
    """fp64 autograd D_dot of row n, from exactly the (fp32-rounded) inputs the op sees."""
    support, mu = [], []
    for i, lp in zip(top_ids[n].tolist(), top_lq[n].double().exp().tolist()):
        if i not in support:
            support.append(i)
            mu.append(lp)
    if int(sampled[n]) not in support:
        support.append(int(sampled[n]))
        mu.append(math.exp(float(mu_sampled[n])))
    cells = torch.tensor(mu + [1.0 - sum(mu)], dtype=F64)
    return ref.predictive_ddot_autograd(name, logits[n], cells, support, int(sampled[n]))


def _ours(logits_shard, group, name, worker=False):
    build_support, predictive_ddot, stats, fns = _ops(worker)
    logits, top_ids, top_lq, sampled, mu_sampled = _case()
    sup = build_support(sampled, mu_sampled, top_ids, top_lq, vocab_size=V)
    st = stats(logits_shard, sup.ids, tp_group=group, sq_exclude=sup.valid, backend="eager")
    return predictive_ddot(fns[name], st.logp, sup.mu_logp, sup.valid, sup.is_sampled, st.rest_sq)


def _check(got, name):
    want = torch.tensor([_ref_row(name, *_case(), n) for n in range(N)], dtype=F64)
    err = (got.double() - want).abs()
    # fp32 log-softmax (~1e-6 relative) through the chain rule; D_dot ~ 0.01 .. 0.5 here.
    assert bool((err <= 1e-6 + 5e-5 * want.abs()).all()), f"{name}: max err {err.max():.2e}\n{got}\n{want}"
    return want


@pytest.mark.parametrize("name", NAMES)
def test_ddot_matches_full_softmax_autograd_tp1(name):
    got = _ours(_case()[0], None, name)
    want = _check(got, name)
    assert bool((want > 0).any()) and bool((want < 0).any()), "the case should exercise both signs"


def _worker(rank, world):
    g01, g23, g0123 = (torch.distributed.new_group(r) for r in ([0, 1], [2, 3], [0, 1, 2, 3]))
    logits = _case()[0]
    for group, tp, r in ((g01 if rank < 2 else g23, 2, rank % 2), (g0123, 4, rank)):
        v_local = V // tp
        shard = logits[:, r * v_local : (r + 1) * v_local]
        for name in NAMES:
            _check(_ours(shard, group, name, worker=True), name)


def test_ddot_matches_full_softmax_autograd_gloo_tp2_tp4():
    """One spawn of 4 gloo ranks: two tp = 2 groups and one tp = 4 group, each rank holding its vocabulary shard."""
    run_distributed(_worker, 4)


def test_kl_closed_form_and_the_coarse_single_logit_form():
    """SPEC's closed form equals autograd (so P2 is it); the single-rest-logit form is off by a lot on a real case."""
    logits, top_ids, top_lq, sampled, mu_sampled = _case()
    got = _ours(logits, None, "kl")
    pi = torch.softmax(logits.double(), -1)
    worst = 0.0
    for n in range(N):
        support = list(dict.fromkeys(top_ids[n].tolist() + [int(sampled[n])]))
        mu = [math.exp(float(top_lq[n, top_ids[n].tolist().index(i)])) if i in top_ids[n].tolist()
              else math.exp(float(mu_sampled[n])) for i in support]
        cells = torch.tensor(mu + [1.0 - sum(mu)], dtype=F64)
        exact = ref.kl_topk_ddot_closed_form(pi[n], cells, support, int(sampled[n]))
        assert exact == pytest.approx(ref.predictive_ddot_autograd("kl", logits[n], cells, support, int(sampled[n])),
                                      rel=1e-9, abs=1e-12)
        assert float(got[n]) == pytest.approx(exact, rel=1e-4, abs=2e-6)
        worst = max(worst, abs(ref.kl_topk_ddot_coarse(pi[n], cells, support, int(sampled[n])) - exact))
    assert worst > 0.05, worst  # the coarse form is not a rounding-level approximation


def test_tv_kink_uses_the_mean_of_the_one_sided_rates():
    """TV is piecewise linear: at a tie pi_c = mu_c the one-sided rates differ by |pi_c_dot|; we return their mean
    (autograd's abs'(0) = 0), i.e. the tied cell counts as neither pushing out nor in."""
    build_support, predictive_ddot, stats, fns = _ops()
    logits, top_ids, top_lq, sampled, mu_sampled = _case()
    n, c = 3, 0  # tie the top-1 cell of row 3
    sup = build_support(sampled, mu_sampled, top_ids, top_lq, vocab_size=V)
    st = stats(logits, sup.ids, sq_exclude=sup.valid, backend="eager")
    mu_logp = sup.mu_logp.clone()
    mu_logp[n, c] = st.logp[n, c]  # bitwise tie in fp32: exp() of the same float on both sides
    got = float(predictive_ddot(fns["tv"], st.logp, mu_logp, sup.valid, sup.is_sampled, st.rest_sq)[n])

    pi = torch.softmax(logits[n].double(), -1)
    support = list(dict.fromkeys(top_ids[n].tolist() + [int(sampled[n])]))
    mu = [math.exp(float(mu_logp[n, i])) for i in range(K)] + ([] if len(support) == K else [math.exp(float(mu_sampled[n]))])
    mu[c] = float(pi[support[c]])  # exact tie in fp64 too
    cells = torch.tensor(mu + [1.0 - sum(mu)], dtype=F64)
    right, left = ref.predictive_one_sided("tv", logits[n], cells, support, int(sampled[n]))
    k = int(sampled[n])
    pi_c_dot = float(pi[support[c]] * (float(support[c] == k) - pi[support[c]] - pi[k] + pi.square().sum()))
    assert right - left == pytest.approx(abs(pi_c_dot), rel=1e-4)  # a genuine kink
    assert got == pytest.approx(0.5 * (right + left), abs=2e-6)
    assert got == pytest.approx(ref.predictive_ddot_autograd("tv", logits[n], cells, support, k), abs=2e-6)


@pytest.mark.parametrize("name", NAMES)
def test_binary_support_reduces_to_the_sampled_test(name):
    """S = {a_t}: pi_k_dot = pi_k (1 - 2 pi_k + Q) >= 0, so sign(D_dot) = sign(pi_k - mu_k) (why binary refuses it)."""
    build_support, predictive_ddot, stats, fns = _ops()
    logits, _, _, sampled, _ = _case()
    mu = torch.log_softmax(logits.double(), -1).gather(-1, sampled[:, None])[:, 0] + torch.linspace(-0.9, 0.9, N, dtype=F64)
    mu = mu.clamp(max=-1e-3).float()
    sup = build_support(sampled, mu)
    st = stats(logits, sup.ids, sq_exclude=sup.valid, backend="eager")
    ddot = predictive_ddot(fns[name], st.logp, sup.mu_logp, sup.valid, sup.is_sampled, st.rest_sq)
    assert torch.equal(torch.sign(ddot), torch.sign(st.logp[:, 0] - sup.mu_logp[:, 0]))


# --- the hook and the loss ----------------------------------------------------------------------------------------

HV, HK = 3000, 8
PROMPTS, RESPS = [3, 5, 2], [4, 2, 6]


def _ppo_loss():
    import verl.workers.utils.losses as L

    return L.ppo_loss


@pytest.mark.parametrize("name", NAMES)
def test_hook_returns_ddot_matching_reference(name):
    from conftest import make_actor_config
    from topk_batch import make_topk_batch

    from dppo_verl.config import DPPOPolicyLossConfig

    data, truth = make_topk_batch(PROMPTS, RESPS, HV, HK)
    logits = truth["pi_logits"].float()
    cfg = make_actor_config(DPPOPolicyLossConfig(loss_mode=f"dppo_{name}_topk", num_topk=HK, direction="predictive"))
    out = _ppo_loss()(cfg, student_logits=logits.unsqueeze(0), data=data)
    assert set(out) == {"dppo_divergence", "dppo_support_size", "dppo_ddot", "dppo_topk_valid"}
    ids, lps = data["rollout_topk_ids"].values(), data["rollout_topk_logprobs"].values()
    resp, mu_s, rmask = data["responses"].values(), data["rollout_log_probs"].values(), data["response_mask"].values()
    j = 0
    for b, (p, r) in enumerate(zip(PROMPTS, RESPS)):
        for t in range(r):
            row = truth["offsets"][b] + p - 1 + t
            if not rmask[j]:
                assert float(out["dppo_ddot"][0, row]) == 0.0
            else:
                top = ids[j].tolist()
                support = list(dict.fromkeys(top + [int(resp[j])]))
                mu = [math.exp(float(lps[j, top.index(i)])) if i in top else math.exp(float(mu_s[j])) for i in support]
                cells = torch.tensor(mu + [1.0 - sum(mu)], dtype=F64)
                want = ref.predictive_ddot_autograd(name, logits[row], cells, support, int(resp[j]))
                assert float(out["dppo_ddot"][0, row]) == pytest.approx(want, rel=1e-4, abs=2e-6)
            j += 1


def _disagreement_row():
    """pi_k > mu_k but the update along e_k - pi *lowers* D: raising z_k drains the over-weighted token j.

    Hand numbers (K = 2, k = 0, j = 1, 62 rest tokens sharing the rest evenly):
        mu = (0.30, 0.10, rest 0.60),  pi = (0.32, 0.50, rest 0.18)
        KL_topk = 0.3 ln(0.3/0.32) + 0.1 ln(0.1/0.5) + 0.6 ln(0.6/0.18) ~ 0.54 > delta = 0.05
        D_dot = (pi_k - mu_k) - sum_S pi_i (pi_i - mu_i) - (1 - mu_R/pi_R) Q_R
              = 0.02 - (0.32 * 0.02 + 0.5 * 0.4) - (1 - 0.6/0.18) * 0.18^2/62  ~ -0.185
    """
    v = 64
    pi = torch.full((v,), 0.18 / 62, dtype=F64)
    pi[0], pi[1] = 0.32, 0.50
    mu = torch.full((v,), 0.60 / 62, dtype=F64)
    mu[0], mu[1] = 0.30, 0.10
    return pi.log().float(), mu.log()


@pytest.mark.parametrize("adv", [1.0, -1.0])
def test_predictive_and_sampled_tests_disagree(adv):
    """Same token, same D > delta: the sampled test (sign of pi_k - mu_k = +) and the predictive test (sign of
    D_dot = -) disagree, for A > 0 (sampled masks, predictive keeps) and A < 0 (sampled keeps, predictive masks)."""
    from conftest import make_actor_config
    from tensordict import TensorDict

    from dppo_verl.config import DPPOPolicyLossConfig
    from dppo_verl.handoff import HandOff, handoff_scope

    logits, mu_full = _disagreement_row()
    data = TensorDict(dict(
        prompts=torch.tensor([[5]]), responses=torch.tensor([[0]]), attention_mask=torch.ones(1, 2, dtype=torch.long),
        response_mask=torch.ones(1, 1, dtype=torch.long), rollout_log_probs=mu_full[None, None, 0].float(),
        rollout_topk_ids=torch.tensor([[[0, 1]]], dtype=torch.int32), rollout_topk_logprobs=mu_full[None, None, :2].float(),
    ), batch_size=[1])
    masked = {}
    for direction in ("sampled", "predictive"):
        cfg = make_actor_config(DPPOPolicyLossConfig(loss_mode="dppo_kl_topk", num_topk=2, direction=direction))
        # rows: [prompt token, response token]; row 0 predicts the response token
        out = _ppo_loss()(cfg, student_logits=torch.stack([logits, logits])[None], data=data)
        ddot = out.get("dppo_ddot")
        if direction == "predictive":
            assert float(ddot[0, 0]) == pytest.approx(-0.185, abs=2e-3)
        lp = logits[None, None, 0].clone().requires_grad_(True)
        handoff = HandOff(rollout_log_probs=mu_full[None, None, 0].float(), divergence=out["dppo_divergence"][:, :1],
                          support_size=out["dppo_support_size"][:, :1], ddot=None if ddot is None else ddot[:, :1],
                          topk_valid=out["dppo_topk_valid"][:, :1])
        assert float(handoff.divergence) == pytest.approx(0.54, abs=5e-3)
        from verl.trainer.ppo.core_algos import get_policy_loss_fn

        with handoff_scope(handoff):
            loss, m = get_policy_loss_fn("dppo_kl_topk")(lp.detach(), lp, torch.full((1, 1), adv),
                                                         torch.ones(1, 1, dtype=torch.bool), "token-mean", cfg)
        masked[direction] = m["actor/dppo/masked_frac"]
        # the metric that shows the predictive direction at work: 1 = it disagreed with pi - mu on every token
        assert m.get("actor/dppo/direction_flip_frac") == (1.0 if direction == "predictive" else None)
        (g,) = torch.autograd.grad(loss, lp)
        assert (float(g) == 0.0) == (masked[direction] == 1.0)
    assert masked == ({"sampled": 1.0, "predictive": 0.0} if adv > 0 else {"sampled": 0.0, "predictive": 1.0})


def test_predictive_needs_ddot_in_the_handoff():
    from conftest import make_actor_config
    from verl.trainer.ppo.core_algos import get_policy_loss_fn

    from dppo_verl.config import DPPOPolicyLossConfig
    from dppo_verl.handoff import HandOff, handoff_scope

    cfg = make_actor_config(DPPOPolicyLossConfig(loss_mode="dppo_tv_topk", direction="predictive"))
    x = torch.full((2, 3), -1.0)
    with handoff_scope(HandOff(rollout_log_probs=x, divergence=torch.zeros(2, 3))):
        with pytest.raises(ValueError, match="direction=predictive needs 'dppo_ddot'"):
            get_policy_loss_fn("dppo_tv_topk")(x, x, torch.ones(2, 3), torch.ones(2, 3, dtype=torch.bool), "token-mean", cfg)
    with handoff_scope(HandOff(rollout_log_probs=x, divergence=torch.zeros(2, 3), ddot=torch.zeros(2, 2))):
        with pytest.raises(ValueError, match=r"dppo_ddot has shape \[2, 2\], expected \[2, 3\]"):
            get_policy_loss_fn("dppo_tv_topk")(x, x, torch.ones(2, 3), torch.ones(2, 3, dtype=torch.bool), "token-mean", cfg)
