"""The DPPO trust-region mask (Eq. 12): the one place in the codebase where the rule is written.

Shapes: every argument is ``[...]`` (typically ``[B, T]``), broadcastable against the others.
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["trust_region_mask"]


def trust_region_mask(
    divergence: torch.Tensor,
    logp: torch.Tensor,
    mu_logp: torch.Tensor,
    advantages: torch.Tensor,
    *,
    delta_low: float,
    delta_high: float,
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
        delta_low, delta_high: thresholds for A_t < 0 and A_t > 0.
        push: optional signed direction replacing ``pi_t - mu_t`` (the predictive direction's D-dot:
            positive means the update along A_t > 0 moves D up). Only its sign is used.

    Returns:
        bool ``[...]``.
    """
    direction = (logp - mu_logp) if push is None else push
    outward_pos = (advantages > 0) & (direction > 0) & (divergence > delta_high)
    outward_neg = (advantages < 0) & (direction < 0) & (divergence > delta_low)
    return ~(outward_pos | outward_neg)
