"""Masking rules: the DPPO trust-region mask (Eq. 12) and the sequence-level veto of Trust Region Masking.

This is the one place in the codebase where a masking rule is written: every token-level method (DPPO's fixed
thresholds, CPPO's position-aware ones, the predictive direction) calls :func:`trust_region_mask`; the sequence
veto (:func:`sequence_keep`) is AND-ed on top of whichever token rule runs.

Shapes: ``[...]`` (typically ``[B, T]``) for token tensors, broadcastable against each other; ``[B]`` per sequence.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch

__all__ = ["SEQ_AGGS", "trust_region_mask", "sequence_keep"]

SEQ_AGGS = ("max", "mean")
Threshold = Union[float, torch.Tensor]


def trust_region_mask(
    divergence: torch.Tensor,
    logp: torch.Tensor,
    mu_logp: torch.Tensor,
    advantages: torch.Tensor,
    *,
    delta_low: Threshold,
    delta_high: Threshold,
    push: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Keep-mask M_t of Eq. 12 (True = the token contributes gradient).

    A token is dropped only when it is already outside the trust region *and* the update pushes it further
    out::

        M_t = 0  if A_t > 0 and pi_t > mu_t and D_t > delta_high
        M_t = 0  if A_t < 0 and pi_t < mu_t and D_t > delta_low
        M_t = 1  otherwise

    Args:
        divergence: ``D_t`` ``[...]``, any estimator (binary or Top-K).
        logp: ``log pi(a_t)`` ``[...]`` (detached or not; only compared).
        mu_logp: ``log mu(a_t)`` ``[...]``, the anchor's log-probability of the sampled token.
        advantages: ``A_t`` ``[...]``; A_t = 0 is never masked (it carries no gradient anyway).
        delta_low, delta_high: thresholds for A_t < 0 and A_t > 0: floats, or ``[...]`` tensors for per-token
            thresholds (CPPO's position-aware, prefix-budgeted ones, :mod:`.cppo`).
        push: optional signed direction replacing ``pi_t - mu_t`` (the predictive direction's D-dot:
            positive means the update along A_t > 0 moves D up). Only its sign is used.

    Returns:
        bool ``[...]``.
    """
    direction = (logp - mu_logp) if push is None else push
    outward_pos = (advantages > 0) & (direction > 0) & (divergence > delta_high)
    outward_neg = (advantages < 0) & (direction < 0) & (divergence > delta_low)
    return ~(outward_pos | outward_neg)


def sequence_keep(
    divergence: torch.Tensor, response_mask: torch.Tensor, *, delta_seq: float, agg: str = "max"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Trust Region Masking's sequence veto (Li et al., arXiv 2512.23075): ``M(y) = 1[agg_t D_t <= delta_seq]``.

    A whole response is dropped when its token divergences, aggregated over the response tokens, exceed
    ``delta_seq``, whatever the advantage or direction: the policy-improvement bounds TRM derives depend on the
    sequence-level maximum of the per-token divergence, which a token mask cannot bound.

    Args:
        divergence: ``D_t`` ``[B, T]`` (any estimator; padding may hold anything).
        response_mask: ``[B, T]``; only these tokens enter the statistic.
        delta_seq: the sequence threshold (> 0).
        agg: ``max`` (TRM's ``max_t D_t``) or ``mean`` (``mean_t D_t``).

    Returns:
        ``(keep [B] bool, statistic [B] fp32)``; an empty response has statistic 0 and is kept.
    """
    if agg not in SEQ_AGGS:
        raise ValueError(f"policy_loss.seq_agg must be one of {list(SEQ_AGGS)}, got {agg!r}")
    if not (isinstance(delta_seq, (int, float)) and math.isfinite(delta_seq) and delta_seq > 0):
        raise ValueError(f"policy_loss.delta_seq must be a positive number, got {delta_seq!r}")
    m = response_mask.bool()
    d = divergence.float()
    if agg == "max":
        stat = torch.where(m, d, float("-inf")).amax(-1)  # [B]
        stat = torch.where(m.any(-1), stat, 0.0)
    else:
        stat = torch.where(m, d, 0.0).sum(-1) / m.sum(-1).clamp(min=1)  # [B]
    return stat <= delta_seq, stat
