"""CPPO's position-aware thresholds and prefix budget (Mao, Zhou, Tao et al., "Beyond Uniform Token-Level Trust
Region in LLM Reinforcement Learning", arXiv 2606.10968), as inputs of the Eq. 12 mask.

Shapes: ``[B, T]`` per response token (verl's padded layout: response token ``t`` of sequence ``b`` at column ``t``,
``t = 0 .. L_b - 1``, ``L_b`` = one past the last token with ``response_mask`` 1).

For a response of length ``L`` with per-token divergence ``d_t`` (Binary TV ``|pi_t - mu_t|`` in the paper)::

    w_t   = 1 - (1 - w_min) * t / (L - 1)            position weight: 1 at the first token, w_min at the last
    P_t   = sum_{s < t} w_s d_s,   W_t = sum_{s < t} w_s               prefix drift and prefix weight
    db    = clamp(quantile_0.9(d), delta_pre, 2 delta_pre)             per-sequence budget rate
    tau_t = min(delta, delta + db * W_t - P_t)        threshold: delta, tightened once the prefix used its budget
    M_t   = 0  iff  the update pushes pi_t away from mu_t (Eq. 12's direction test)  and  w_t d_t > tau_t

Early tokens are held to the full ``delta`` on an un-discounted divergence (``w ~ 1``); later ones see a discounted
divergence but a threshold that shrinks as soon as the prefix has drifted more than ``db`` per unit of weight.
``delta`` is ``delta_high`` for ``A_t > 0`` and ``delta_low`` for ``A_t < 0`` as in Eq. 12 (the paper uses one
delta). The mask itself is :func:`dppo_verl.ops.mask.trust_region_mask` with ``w_t d_t`` as the divergence and
``tau_t`` as per-token thresholds: CPPO is an input schedule of the one Eq. 12 rule, not a second rule.

Tokens with ``response_mask`` 0 inside a response (tool output in multi-turn) keep their position ``t`` but add
nothing to ``P``, ``W`` or the quantile (the authors' code, single-turn, has no such tokens).
"""

from __future__ import annotations

import torch

__all__ = ["DEFAULT_QUANTILE", "position_weights", "row_quantile", "cppo_thresholds"]

DEFAULT_QUANTILE = 0.9  # the paper's P90 of the per-token divergence


def position_weights(response_mask: torch.Tensor, w_min: float) -> torch.Tensor:
    """``w_t = 1 - (1 - w_min) t / (L - 1)`` ``[B, T]`` (1 for a one-token response; 0 past the response)."""
    m = response_mask.bool()
    t = torch.arange(m.shape[-1], device=m.device, dtype=torch.float32)  # [T]
    last = torch.where(m, t, -1.0).amax(-1, keepdim=True)  # [B, 1]: L - 1 (-1 for an empty response)
    w = 1.0 - (1.0 - w_min) * t / last.clamp(min=1.0)
    return torch.where(t <= last, w, 0.0)


def row_quantile(x: torch.Tensor, mask: torch.Tensor, q: float) -> torch.Tensor:
    """Per-row ``q``-quantile of ``x [B, T]`` over ``mask``, linear interpolation (``torch.quantile``'s default).

    Vectorised: masked-out entries sort to the end as +inf and are never indexed. Empty rows give 0. ``[B]``.
    """
    n = mask.sum(-1)  # [B]
    srt = torch.where(mask, x.float(), float("inf")).sort(-1).values  # [B, T]
    pos = q * (n - 1).clamp(min=0).float()  # [B], index into the n sorted valid values
    lo, hi = pos.floor().long(), pos.ceil().long()
    v_lo = srt.gather(-1, lo.unsqueeze(-1))[:, 0]
    v_hi = srt.gather(-1, hi.unsqueeze(-1))[:, 0]
    out = v_lo + (pos - lo.float()) * (v_hi - v_lo)
    return torch.where(n > 0, out, 0.0)


def cppo_thresholds(
    divergence: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    delta_low: float,
    delta_high: float,
    w_min: float,
    delta_pre: float,
    quantile: float = DEFAULT_QUANTILE,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(w_t d_t, tau_low_t, tau_high_t)``, each ``[B, T]`` fp32, for :func:`~dppo_verl.ops.mask.trust_region_mask`.

    Args:
        divergence: ``d_t`` ``[B, T]`` (padding may hold anything: it is masked out).
        response_mask: ``[B, T]``.
        delta_low, delta_high: ``delta`` for ``A_t < 0`` / ``A_t > 0``.
        w_min: weight of the last token, in (0, 1].
        delta_pre: ``delta_pre`` >= 0; the budget rate ``db`` lies in ``[delta_pre, 2 delta_pre]``.
        quantile: the quantile of ``d`` that sets ``db`` (0.9 in the paper).
    """
    m = response_mask.bool()
    d = torch.where(m, divergence.float(), 0.0)  # [B, T]
    w = torch.where(m, position_weights(m, w_min), 0.0)  # [B, T]
    z = w * d
    prefix_drift = z.cumsum(-1) - z  # P_t = sum_{s < t}: exclusive prefix sums
    prefix_weight = w.cumsum(-1) - w  # W_t
    rate = row_quantile(d, m, quantile).clamp(min=delta_pre, max=2.0 * delta_pre).unsqueeze(-1)  # [B, 1]
    slack = (rate * prefix_weight - prefix_drift).clamp(max=0.0)  # <= 0: how far the prefix overdrew its budget
    return z, delta_low + slack, delta_high + slack
