"""Slow, obvious fp64 references over the full vocabulary. Tests and benchmarks import these.

Nothing here calls the code under test. Every function works on one token's full distribution (``[V]``)
or loops over rows, written for clarity, not speed.
"""

from __future__ import annotations

import math

import torch

F64 = torch.float64


def full_logprobs(logits: torch.Tensor) -> torch.Tensor:
    """``[..., V]`` -> fp64 log-softmax over the full vocabulary."""
    return torch.log_softmax(logits.to(F64), dim=-1)


def logprobs_at(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``[N, V]``, ``[N, M]`` -> fp64 ``[N, M]`` log pi at ids (the dense reference of the vocab-parallel op)."""
    return full_logprobs(logits).gather(-1, ids.long())


def partition_tv(p: torch.Tensor, q: torch.Tensor, support: list[int]) -> float:
    """TV between p and q ([V] probabilities) over the partition {each id in support} + {everything else}.

    Written naively: the rest masses are summed over the complement, not computed as 1 - sum.
    """
    s = sorted(set(int(i) for i in support))
    inside = torch.zeros(p.shape[-1], dtype=torch.bool)
    inside[s] = True
    tv = sum(abs(float(q[i]) - float(p[i])) for i in s)
    tv += abs(float(q[~inside].sum()) - float(p[~inside].sum()))
    return 0.5 * tv


def partition_kl(p: torch.Tensor, q: torch.Tensor, support: list[int]) -> float:
    """KL(q || p) over the partition {each id in support} + {rest}; 0 log 0 = 0."""
    s = sorted(set(int(i) for i in support))
    inside = torch.zeros(p.shape[-1], dtype=torch.bool)
    inside[s] = True
    cells = [(float(q[i]), float(p[i])) for i in s] + [(float(q[~inside].sum()), float(p[~inside].sum()))]
    return sum(qi * math.log(qi / pi) for qi, pi in cells if qi > 0)


def full_tv(p: torch.Tensor, q: torch.Tensor) -> float:
    return 0.5 * float((p.to(F64) - q.to(F64)).abs().sum())


def full_kl(p: torch.Tensor, q: torch.Tensor) -> float:
    """KL(q || p) over the full vocabulary."""
    q, p = q.to(F64), p.to(F64)
    nz = q > 0
    return float((q[nz] * (q[nz].log() - p[nz].log())).sum())


PARTITION = {"tv": partition_tv, "kl": partition_kl}
FULL = {"tv": full_tv, "kl": full_kl}


def dppo_keep_mask(div: float, pi_t: float, mu_t: float, adv: float, delta_low: float, delta_high: float) -> bool:
    """Eq. 12 for one token, spelled out case by case."""
    if adv > 0 and pi_t > mu_t and div > delta_high:
        return False
    if adv < 0 and pi_t < mu_t and div > delta_low:
        return False
    return True


def dppo_token_grad_coeff(logp: float, mu_logp: float, adv: float, keep: bool, cap: float) -> float:
    """d loss_t / d log pi_t = -A_t * min(r_t, C) * M_t (Eq. 11 with truncated IS), in fp64."""
    r = math.exp(logp - mu_logp)
    return -adv * min(r, cap) * (1.0 if keep else 0.0)


def dense_logprobs_fp32(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The obvious fp32 implementation users write today (the benchmark's ``reference`` provider):
    a full ``N x V`` fp32 copy and a full ``N x V`` log-softmax, then a gather."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, ids.long())


# ---------------------------------------------------------------------------------------------------------------
# "Beyond the paper" references (issue #9): predictive direction, DRPO, CPPO, TRM. Dense fp64, naive, no code under
# test. The rest bucket is always summed over the complement, never taken as 1 - sum.


def partition_divergence(name: str, pi: torch.Tensor, mu_cells: torch.Tensor, support: list[int]) -> torch.Tensor:
    """Differentiable (through ``pi`` [V]) TV or KL(mu || pi) over {each id of ``support``} + {rest}.

    ``mu_cells`` [len(support) + 1]: mu at the (distinct) support ids, then mu_rest. Returns a 0-d fp64 tensor.
    """
    inside = torch.zeros(pi.shape[-1], dtype=torch.bool)
    inside[support] = True
    p = torch.cat([pi[support], pi[~inside].sum().reshape(1)])
    q = mu_cells.to(F64)
    if name == "tv":
        return 0.5 * (q - p).abs().sum()
    if name == "kl":
        nz = q > 0
        return (q[nz] * (q[nz].log() - p[nz].log())).sum()
    raise ValueError(name)


def predictive_ddot_autograd(name: str, z: torch.Tensor, mu_cells: torch.Tensor, support: list[int], k: int,
                             eps: float = 0.0) -> float:
    """d/d e D(softmax(z + e (e_k - pi))) at e = ``eps`` by fp64 autograd, ``z`` [V] full-vocabulary logits.

    The direction v = e_k - pi is fixed at e = 0 (the logit-space gradient of log pi_k at the current policy).
    At a kink torch's abs'(0) = 0 applies.
    """
    z = z.to(F64)
    v = -torch.softmax(z, -1)
    v[k] += 1.0
    e = torch.tensor(float(eps), dtype=F64, requires_grad=True)
    d = partition_divergence(name, torch.softmax(z + e * v, -1), mu_cells, support)
    (g,) = torch.autograd.grad(d, e)
    return float(g)


def predictive_one_sided(name: str, z: torch.Tensor, mu_cells: torch.Tensor, support: list[int], k: int,
                         h: float = 1e-7) -> tuple[float, float]:
    """(right, left) finite-difference derivatives of D along e_k - pi at e = 0, fp64."""
    z = z.to(F64)
    v = -torch.softmax(z, -1)
    v[k] += 1.0

    def d(e):
        return float(partition_divergence(name, torch.softmax(z + e * v, -1), mu_cells, support))

    return (d(h) - d(0.0)) / h, (d(0.0) - d(-h)) / h


def _kl_topk_parts(pi: torch.Tensor, mu_cells: torch.Tensor, support: list[int], k: int):
    """fp64 pieces shared by the exact and the coarse form: pi, mu_S, mu_R, pi_S, pi_R, mu_k, mask of S."""
    pi = pi.to(F64)
    inside = torch.zeros(pi.shape[-1], dtype=torch.bool)
    inside[support] = True
    mu_s, mu_r = mu_cells[:-1].to(F64), float(mu_cells[-1])
    return pi, mu_s, mu_r, pi[support], float(pi[~inside].sum()), float(mu_s[support.index(k)]), inside


def kl_topk_ddot_closed_form(pi: torch.Tensor, mu_cells: torch.Tensor, support: list[int], k: int) -> float:
    """SPEC's exact form: (pi_k - mu_k) - sum_S pi_i (pi_i - mu_i) - (1 - mu_R / pi_R) sum_{j not in S} pi_j^2."""
    pi, mu_s, mu_r, pi_s, pi_r, mu_k, inside = _kl_topk_parts(pi, mu_cells, support, k)
    return float(pi[k] - mu_k - (pi_s * (pi_s - mu_s)).sum() - (1 - mu_r / pi_r) * pi[~inside].square().sum())


def kl_topk_ddot_coarse(pi: torch.Tensor, mu_cells: torch.Tensor, support: list[int], k: int) -> float:
    """The single-rest-logit approximation some forks use: last term replaced by -pi_R (pi_R - mu_R)."""
    pi, mu_s, mu_r, pi_s, pi_r, mu_k, _ = _kl_topk_parts(pi, mu_cells, support, k)
    return float(pi[k] - mu_k - (pi_s * (pi_s - mu_s)).sum() - pi_r * (pi_r - mu_r))


def drpo_objective(logp: torch.Tensor, mu_logp: torch.Tensor, adv: torch.Tensor, delta_low: float,
                   delta_high: float) -> torch.Tensor:
    """DRPO per-token loss as reported (arXiv 2606.09821): -A r + |A| (pi - mu)^2 / (2 delta mu), differentiable
    through ``logp``; delta = delta_high where A > 0, else delta_low. fp64 ``[...]``."""
    logp, mu_logp, adv = logp.to(F64), mu_logp.to(F64), adv.to(F64)
    pi, mu = logp.exp(), mu_logp.exp()
    delta = torch.where(adv > 0, delta_high, delta_low).to(F64)
    return -adv * pi / mu + adv.abs() * (pi - mu).square() / (2 * delta * mu)


def trm_keep(div: list[float], mask: list[bool], delta_seq: float, agg: str) -> bool:
    """TRM (arXiv 2512.23075) for one sequence: keep iff max_t (or mean_t) D_t over response tokens <= delta_seq."""
    vals = [d for d, m in zip(div, mask) if m]
    if not vals:
        return True
    stat = max(vals) if agg == "max" else sum(vals) / len(vals)
    return stat <= delta_seq


def cppo_keep(pi: list[float], mu: list[float], adv: list[float], mask: list[bool], delta_low: float,
              delta_high: float, w_min: float, delta_pre: float, q: float = 0.9) -> list[bool]:
    """CPPO Binary-TV keep-mask for one response (arXiv 2606.10968), token by token with running sums."""
    length = max((t + 1 for t, m in enumerate(mask) if m), default=0)
    d = [abs(p - m) for p, m in zip(pi, mu)]
    valid = sorted(d[t] for t in range(len(d)) if mask[t])
    if valid:
        pos = q * (len(valid) - 1)
        lo = int(math.floor(pos))
        hi = min(lo + 1, len(valid) - 1)
        quant = valid[lo] + (pos - lo) * (valid[hi] - valid[lo])
    else:
        quant = 0.0
    rate = min(max(quant, delta_pre), 2 * delta_pre)
    keep, drift, weight = [], 0.0, 0.0
    for t in range(len(d)):
        w = 1.0 - (1.0 - w_min) * t / max(length - 1, 1) if t < length else 0.0
        delta = delta_high if adv[t] > 0 else delta_low
        tau = min(delta, delta + rate * weight - drift)
        outward = (adv[t] > 0 and pi[t] > mu[t]) or (adv[t] < 0 and pi[t] < mu[t])
        keep.append(not (mask[t] and outward and w * d[t] > tau))
        if mask[t]:
            drift += w * d[t]
            weight += w
    return keep


def megatron_rows(seq_lens: list[int], *, tp: int, cp: int, cp_rank: int, data_format: str,
                  forced_max_seqlen: int | None = None) -> torch.Tensor:
    """Which packed row (1-based global index into the concatenated sequences; 0 = padding) each logits row of a
    Megatron rank holds, written from the layout rules alone (not from verl's helpers):

    - THD: every sequence padded to a multiple of ``tp * cp * (2 if cp > 1 else 1)`` and concatenated; under CP the
      padded sequence is cut into ``2 cp`` equal chunks and rank r holds chunks r and ``2 cp - 1 - r`` ("zigzag").
      Shape ``[1, sum(padded) / cp]``.
    - BSHD: one row of ``S`` positions per sequence, ``S`` the longest sequence (or ``forced_max_seqlen``) rounded up
      to a multiple of ``tp`` (``tp * cp * 2`` under CP), zigzag-split the same way. Shape ``[B, S / cp]``.
    """
    starts = [1 + sum(seq_lens[:i]) for i in range(len(seq_lens))]

    def zigzag(positions: list[int]) -> list[int]:
        if cp == 1:
            return positions
        c = len(positions) // (2 * cp)
        return positions[cp_rank * c:(cp_rank + 1) * c] + positions[(2 * cp - 1 - cp_rank) * c:(2 * cp - cp_rank) * c]

    def padded_seq(i: int, length: int) -> list[int]:
        return [starts[i] + j if j < seq_lens[i] else 0 for j in range(length)]

    def round_up(x: int, a: int) -> int:
        return -(-x // a) * a

    if data_format == "thd":
        align = tp * cp * (2 if cp > 1 else 1)
        rows = [r for i, s in enumerate(seq_lens) for r in zigzag(padded_seq(i, round_up(s, align)))]
        return torch.tensor(rows)[None]
    width = round_up(forced_max_seqlen or max(seq_lens), tp * cp * 2 if cp > 1 else tp)
    return torch.tensor([zigzag(padded_seq(i, width)) for i in range(len(seq_lens))])


# ---------------------------------------------------------------------------------------------------------------
# One normalisation for mu and pi (issue #17): the rollout engine samples only from ``allowed`` ids.


def allowed_mask(vocab: int, limit: int, banned: tuple[int, ...] = ()) -> torch.Tensor:
    """``[V]`` bool: ids a vLLM rollout with ``monkey_patch_model(vocab_size=limit, banned_token_ids=banned)`` samples."""
    ok = torch.arange(vocab) < limit
    ok[list(banned)] = False
    return ok


def masked_logprobs(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """``[..., V]`` -> fp64 log-softmax over the allowed ids only (-inf elsewhere): what the engine samples from."""
    return torch.log_softmax(logits.to(F64).masked_fill(~allowed, float("-inf")), dim=-1)


def excluded_mass(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """``[..., V]`` -> fp64 ``[...]`` full-softmax mass on the ids that are not allowed, summed term by term."""
    return full_logprobs(logits).exp().masked_fill(allowed, 0.0).sum(-1)
