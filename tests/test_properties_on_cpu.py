"""Property sweep (issue #17, item 5): seeded random cases through build_support, the vocab-parallel op, the
divergences and the Eq. 12 mask, checked against dense fp64 references (tests/reference.py) and invariants.

Each case draws a vocabulary (8..320, even so that tp = 2 splits it), K in 0..12 (0 = binary only), mu and pi logits
at scales from 0.3 to 3000 (log-probs down to about -1e4), peaked rows (top log-prob down to about -1e-9), a masked
vocabulary tail (-inf logits in both, as the engine's padded head), rollout ranks padded with -inf, duplicate ranks,
the sampled token inside or outside the top-K, padded rows holding garbage, and pi logits in fp32, bf16 or fp16.

Invariants: finite outputs; TV in [0, 1]; KL >= 0; binary <= Top-K <= full-vocabulary divergence (data-processing
inequality: each partition refines the previous one); Top-K equal to the fp64 partition divergence; the support
equal to a per-token set construction; tp = 2 equal to tp = 1.

Tolerances (fp32 arithmetic on inputs that are exact in fp32/bf16/fp16):
- log pi = x - lse carries the rounding of an fp32 log-sum-exp, ``e = 4 eps32 (|lse| + 1)`` absolute (SPEC,
  Numerics), so every probability carries a relative error <= e, and TV (linear in the probabilities, rest bucket
  included) an absolute error <= 2 e; plus 2e-6 for summing <= 22 cells.
- KL adds ``mu_rest * (error of log pi_rest)``: the rest bucket is ``1 - exp(logsumexp_S log pi)``, so its log has an
  error of about ``e / pi_rest``. Where ``pi_rest < 100 e`` (pi puts all but a sliver below fp32's resolution on the
  support, and only there) fp32 cannot resolve it: those KL values are checked for finiteness and sign only, and
  their count is asserted small. So are rows where mu weighs a cell on which pi is below ``REST_EPS``: KL clamps
  each cell's log pi there (documented in ``ops/divergence.py``; a cell's KL term saturates near ``27.6 mu``).
  Everywhere else the KL tolerance is ``2e-6 + 2 e + 0.02 (mu_rest + mu_rest_binary)`` (at ``pi_rest >= 100 e`` the
  rest term's error is at most ``mu_rest e / pi_rest <= 0.01 mu_rest``; doubled).
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

import reference as ref
from dist_utils import run_distributed
from dppo_verl.ops.divergence import REST_EPS, kl, tv
from dppo_verl.ops.mask import trust_region_mask
from dppo_verl.ops.support import build_support
from dppo_verl.ops.vocab_parallel import vocab_parallel_stats

N_CASES = 240
EPS32 = torch.finfo(torch.float32).eps
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
FNS = {"tv": tv, "kl": kl}


def _pick(g, options):
    return options[int(torch.randint(0, len(options), (1,), generator=g))]


def _logits(g, n, v, v_real, scale, spread, dtype):
    """mu logits fp64 and pi logits in ``dtype``, both -inf on the masked tail ``[v_real, v)``."""
    z_mu = torch.randn(n, v, generator=g, dtype=torch.float64) * scale
    for r in range(n):
        if float(torch.rand(1, generator=g)) < 0.35:  # peaked: 1 - p_top = 10^-u, u in [1, 9]
            u = 1 + 8 * float(torch.rand(1, generator=g))
            top = int(z_mu[r, :v_real].argmax())
            others = torch.logsumexp(torch.cat([z_mu[r, :top], z_mu[r, top + 1 : v_real]]), 0)
            z_mu[r, top] = others + math.log((1 - 10**-u) / 10**-u)
    z_pi = (z_mu + spread * torch.randn(n, v, generator=g, dtype=torch.float64)).to(dtype)
    z_mu[:, v_real:] = float("-inf")
    z_pi[:, v_real:] = float("-inf")
    return z_mu, z_pi


def _rollout(g, lq, k, v_real):
    """Engine top-K (ranks 1..K, -inf padded past the finite ones), glitches, sampled token and its log mu."""
    n = lq.shape[0]
    top_lq, top_ids = lq.topk(k, dim=-1)
    top_ids = torch.where(torch.isfinite(top_lq), top_ids, 0)  # fewer candidates than K: padded as invalid
    if k and float(torch.rand(1, generator=g)) < 0.3:  # the engine returned fewer ranks
        cut = int(torch.randint(0, k, (1,), generator=g))
        top_lq[:, cut:], top_ids[:, cut:] = float("-inf"), 0
    if k > 1 and float(torch.rand(1, generator=g)) < 0.3:  # duplicate rank j repeats rank i < j
        j = int(torch.randint(1, k, (1,), generator=g))
        i = int(torch.randint(0, j, (1,), generator=g))
        top_ids[:, j], top_lq[:, j] = top_ids[:, i], top_lq[:, i]
    how = _pick(g, ["topk", "sample", "uniform"]) if k else _pick(g, ["sample", "uniform"])
    if how == "topk":
        sampled = top_ids[torch.arange(n), torch.randint(0, k, (n,), generator=g)]
    elif how == "sample":
        sampled = torch.multinomial(lq.exp(), 1, generator=g)[:, 0]
    else:
        sampled = torch.randint(0, v_real, (n,), generator=g)
    return top_ids.int(), top_lq.float(), sampled, lq.gather(-1, sampled[:, None])[:, 0].float()


@functools.lru_cache(maxsize=None)
def make_case(i: int) -> dict:
    """Case ``i``, the same in every process (seeded by ``i`` alone)."""
    g = torch.Generator().manual_seed(17_000 + i)
    v = 2 * int(torch.randint(4, 161, (1,), generator=g))
    pad = _pick(g, [0, 0, 1, 3 * v // 4]) if v > 8 else 0
    v_real = v - min(pad, v - 2)
    n = int(torch.randint(1, 6, (1,), generator=g))
    k = min(int(torch.randint(0, 13, (1,), generator=g)), v)
    scale = _pick(g, [0.3, 2.0, 8.0, 40.0, 3000.0])
    spread = _pick(g, [0.0, 0.01, 0.3, 2.0]) * max(1.0, scale / 8)
    dtype = _pick(g, list(DTYPES))
    z_mu, z_pi = _logits(g, n, v, v_real, scale, spread, dtype)
    lq = ref.full_logprobs(z_mu)
    top_ids, top_lq, sampled, mu_a = _rollout(g, lq, k, v_real)
    row_valid = torch.rand(n, generator=g) < 0.8
    row_valid[0] = True
    if k:  # padded rows hold garbage, which must never be read
        top_lq[~row_valid, 0], top_ids[~row_valid, -1] = float("nan"), v + 7
    mu_a[~row_valid] = 5.0
    return dict(v=v, k=k, dtype=dtype, z_pi=z_pi, lq=lq, top_ids=top_ids if k else None,
                top_lq=top_lq if k else None, sampled=sampled, mu_a=mu_a, row_valid=row_valid)


def _support(c):
    return build_support(c["sampled"], c["mu_a"], c["top_ids"], c["top_lq"], vocab_size=c["v"],
                         num_topk=c["k"] or None, row_valid=c["row_valid"])


def _naive_support(c, r):
    """Per token, by sets: the distinct finite top-K ids in rank order, then a_t if it is not among them."""
    ids = []
    if c["k"]:
        ids = [int(t) for t, l in zip(c["top_ids"][r], c["top_lq"][r]) if math.isfinite(float(l))]
        ids = list(dict.fromkeys(ids))
    a = int(c["sampled"][r])
    return ids + ([a] if a not in ids else [])


def _row_error(z_pi_row):
    lse = torch.logsumexp(z_pi_row.double(), 0).abs()
    return 4 * EPS32 * (float(lse) + 1.0)


def _check_support(c, sup):
    for r in range(len(c["sampled"])):
        if not c["row_valid"][r]:
            assert not bool(sup.valid[r].any()) and bool((sup.ids[r] == 0).all())
            continue
        want = _naive_support(c, r)
        got = [int(i) for i, ok in zip(sup.ids[r], sup.valid[r]) if ok]
        assert got == want, (got, want)
        mu_want = c["lq"][r, want].float()
        torch.testing.assert_close(sup.mu_logp[r][sup.valid[r]], mu_want, rtol=0, atol=0)
        assert int(sup.is_sampled[r].sum()) == 1 and int(sup.ids[r][sup.is_sampled[r]]) == int(c["sampled"][r])


def _kl_slack(p, q, cells, p_rest, q_rest, e):
    """Allowed |fp32 KL - fp64 KL| over ``cells`` + rest beyond rounding, or None where fp32 cannot resolve pi's rest
    (``pi_rest < 100 e`` while mu weighs it). Each cell's log pi is clamped at ``log REST_EPS`` (documented in
    ``ops/divergence.py``): that moves a cell's term by ``mu_j (log REST_EPS - log pi_j)`` where pi_j is below it."""
    if (q_rest > 1e-12 and p_rest < 100 * e) or p_rest == 0 < q_rest:
        return None
    if any(float(p[j]) == 0 < float(q[j]) for j in cells):  # pi underflows fp64 where mu does not: KL is +inf
        return None
    floor = math.log(REST_EPS)
    clamp = sum(float(q[j]) * max(0.0, floor - math.log(max(float(p[j]), 1e-300))) for j in set(cells))
    return 0.02 * q_rest + clamp


def _check_divergences(c, sup, pi_s, pi_a, r, where):
    """One valid row: invariants and the fp64 partition references; returns whether KL was resolvable."""
    p = ref.full_logprobs(c["z_pi"][r]).exp()
    q = c["lq"][r].exp()
    support, a = _naive_support(c, r), [int(c["sampled"][r])]
    e = _row_error(c["z_pi"][r])
    p_rest = float(p[[j for j in range(len(p)) if j not in support]].sum())  # summed, never 1 - sum
    p_rest_bin = float(p[[j for j in range(len(p)) if j != a[0]]].sum())
    q_rest = float(q[[j for j in range(len(q)) if j not in support]].sum())
    q_rest_bin = float(q[[j for j in range(len(q)) if j != a[0]]].sum())
    slack_topk = _kl_slack(p, q, support, p_rest, q_rest, e)
    slack_bin = _kl_slack(p, q, a, p_rest_bin, q_rest_bin, e)
    resolvable = slack_topk is not None and slack_bin is not None
    for name, fn in FNS.items():
        topk = float(fn(pi_s[r : r + 1], sup.mu_logp[r : r + 1], sup.valid[r : r + 1]))
        binary = float(fn(pi_a[r : r + 1, None], c["mu_a"][r : r + 1, None]))
        full = ref.FULL[name](p, q)
        assert math.isfinite(topk) and math.isfinite(binary), (name, topk, binary, where)
        tol = 2e-6 + 2 * e
        if name == "kl":
            assert topk >= -tol and binary >= -tol, (topk, binary, where)
            if not resolvable:
                continue
            tol += slack_topk + slack_bin
        else:
            assert -tol <= binary <= 1 + tol and -tol <= topk <= 1 + tol, (binary, topk, where)
        want_topk = ref.PARTITION[name](p, q, support)
        want_bin = ref.PARTITION[name](p, q, a)
        assert abs(topk - want_topk) <= tol, (name, topk, want_topk, tol, where)
        assert abs(binary - want_bin) <= tol, (name, binary, want_bin, tol, where)
        assert binary <= topk + 2 * tol and topk <= full + tol, (name, binary, topk, full, tol, where)
    return resolvable


def test_property_sweep_tp1():
    """Every case at tp = 1 through the default (compiled) vocab-parallel path."""
    unresolvable = rows = 0
    for i in range(N_CASES):
        c = make_case(i)
        sup = _support(c)
        _check_support(c, sup)
        st = vocab_parallel_stats(c["z_pi"], sup.ids)
        pi_a = vocab_parallel_stats(c["z_pi"], c["sampled"][:, None]).logp[:, 0]
        assert bool(torch.isfinite(st.logp[sup.valid]).all())
        want = ref.logprobs_at(c["z_pi"], sup.ids)
        for r in range(len(c["sampled"])):
            e = _row_error(c["z_pi"][r])
            assert float((st.logp[r].double() - want[r]).abs().max()) <= 1e-5 + e, (i, r)
            if c["row_valid"][r]:
                rows += 1
                unresolvable += not _check_divergences(c, sup, st.logp, pi_a, r, dict(case=i, row=r))
    # KL is checked against fp64 only where fp32 can resolve pi's rest bucket (module docstring): on this sweep,
    # tilted towards extremes (|lse| up to 1e4, pi peaked to 1 - 1e-9 away from mu), that is 428 of 616 rows.
    assert rows > 500 and rows - unresolvable >= 0.6 * rows, (unresolvable, rows)


def test_build_support_rejects_what_the_sweep_never_produces():
    """The sweep's rollout data is all valid (else build_support raised above); its garbage rows are masked. With the
    row mask dropped, that garbage is refused: the sweep does exercise the validation."""
    refused = 0
    for i in range(40):
        c = make_case(i)
        if bool(c["row_valid"].all()):
            continue
        with pytest.raises(ValueError, match="rollout_log_probs|rollout_topk"):
            build_support(c["sampled"], c["mu_a"], c["top_ids"], c["top_lq"], vocab_size=c["v"])
        refused += 1
    assert refused >= 5


def _naive_mask(d, lp, lq, adv, dl, dh, push):
    out = torch.empty(d.shape, dtype=torch.bool)
    for t in range(d.numel()):
        # pi_t > mu_t <=> log pi_t > log mu_t: compare the logs (exp underflows to 0 = 0 at log-probs of -1e4)
        pi_t, mu_t = (float(push[t]), 0.0) if push is not None else (float(lp[t]), float(lq[t]))
        lo = float(dl[t]) if torch.is_tensor(dl) else dl
        hi = float(dh[t]) if torch.is_tensor(dh) else dh
        out[t] = ref.dppo_keep_mask(float(d[t]), pi_t, mu_t, float(adv[t]), lo, hi)
    return out


def test_mask_matches_eq12_per_token():
    """Random D, pi, mu, A (ties included: A = 0, pi = mu, D = delta), scalar or per-token thresholds, with and
    without the predictive direction, against the per-token spelling of Eq. 12."""
    g = torch.Generator().manual_seed(12)
    for case in range(200):
        n = int(torch.randint(1, 40, (1,), generator=g))
        lq = -torch.rand(n, generator=g, dtype=torch.float64) * _pick(g, [0.1, 3.0, 1e4])
        lp = torch.where(torch.rand(n, generator=g) < 0.2, lq, lq + 0.3 * torch.randn(n, generator=g, dtype=torch.float64))
        lp = lp.clamp(max=0.0)
        adv = torch.randn(n, generator=g) * (torch.rand(n, generator=g) > 0.15)
        per_token = bool(case % 2)
        dl = torch.rand(n, generator=g) * 0.2 if per_token else 0.15
        dh = torch.rand(n, generator=g) * 0.2 if per_token else 0.05
        d = (torch.rand(n, generator=g) * 0.3).double()
        if not per_token:
            d[torch.rand(n, generator=g) < 0.2] = 0.15  # exactly at a threshold: not outside
        push = torch.randn(n, generator=g) * (torch.rand(n, generator=g) > 0.2) if case % 3 == 0 else None
        got = trust_region_mask(d, lp, lq, adv, delta_low=dl, delta_high=dh, push=push)
        assert torch.equal(got, _naive_mask(d, lp, lq, adv, dl, dh, push)), case


def _tp_worker(rank, world, n_cases):
    import torch.distributed as dist

    group = dist.new_group(list(range(world)))
    for i in range(n_cases):
        c = make_case(i)
        sup = _support(c)
        v_local = c["v"] // world
        shard = c["z_pi"][:, rank * v_local : (rank + 1) * v_local]
        for backend in ("eager",) if i % 8 else ("eager", "compile"):
            one = vocab_parallel_stats(c["z_pi"], sup.ids, sq_exclude=sup.valid, backend=backend)
            two = vocab_parallel_stats(shard, sup.ids, tp_group=group, sq_exclude=sup.valid, backend=backend)
            lse = one.lse.abs().max().item()
            tol = 1e-6 + 4 * EPS32 * (lse + 1)
            torch.testing.assert_close(two.logp, one.logp, rtol=0, atol=tol, msg=f"case {i} {backend}")
            torch.testing.assert_close(two.lse, one.lse, rtol=0, atol=tol)
            # sum pi_j^2: each term's relative error is 2x that of pi_j (<= tol each side)
            torch.testing.assert_close(two.rest_sq, one.rest_sq, rtol=1e-5 + 4 * tol, atol=1e-12, msg=f"case {i}")
            # KL's rest term moves by about mu_rest * (log pi difference) / pi_rest (module docstring): fp64 pi_rest
            p_rest, q_rest = _rest_masses(c, sup)
            amplify = torch.where(p_rest >= 100 * tol, q_rest / p_rest.clamp(min=1e-30), float("inf"))
            for name, fn in FNS.items():
                d1, d2 = fn(one.logp, sup.mu_logp, sup.valid), fn(two.logp, sup.mu_logp, sup.valid)
                assert bool(torch.isfinite(d2).all()), (i, name)
                allowed = 2e-6 + 2 * tol * (1 + d1.abs()) + (4 * tol * amplify if name == "kl" else 0.0)
                assert bool(((d2 - d1).abs() <= allowed).all()), (i, name, d1, d2, allowed)


def _rest_masses(c, sup):
    """fp64 pi and mu mass outside each row's valid support ``[n]`` (summed over the complement)."""
    p = ref.full_logprobs(c["z_pi"]).exp()
    q = c["lq"].exp()
    outside = torch.ones_like(p, dtype=torch.bool)
    for r in range(p.shape[0]):
        outside[r, sup.ids[r][sup.valid[r]]] = False
    return (p * outside).sum(-1).float(), (q * outside).sum(-1).float()


@pytest.mark.parametrize("tp", [2])
def test_tp_invariance_gloo(tp):
    """tp = 2 (gloo, spawned) equals tp = 1 on every case: log pi, lse, the predictive statistic, the divergences."""
    run_distributed(_tp_worker, tp, 160)  # the first 160 cases: every kind of case occurs among them
