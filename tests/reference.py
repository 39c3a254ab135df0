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
