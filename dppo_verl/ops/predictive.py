"""Predictive direction for Top-K DPPO (SPEC, "Beyond the paper"): how fast ``D_t`` changes when the logits move
along the sampled token's policy-gradient direction.

Notation (as in :mod:`.divergence`): ``N`` rows, ``M = K + 1`` support slots, ``S`` the valid slots, ``k`` the
sampled token's slot, ``pi_R = 1 - sum_S pi`` the rest bucket, ``Q = sum_j pi_j^2`` over the **full** vocabulary
and ``Q_R = sum_{j not in S} pi_j^2`` (the one extra vocab-parallel statistic,
``vocab_parallel_stats(..., sq_exclude=valid).rest_sq``).

The gradient of ``log pi_k`` in logit space is ``v = e_k - pi``; an update with ``A_t > 0`` moves the logits ``z``
along ``+v``, one with ``A_t < 0`` along ``-v``. The softmax Jacobian gives, for every token ``j``::

    d pi_j / d eps |_{z + eps v} = pi_j (v_j - sum_l pi_l v_l) = pi_j (1[j = k] - pi_j - pi_k + Q)        (P1)

so each support cell moves at the relative rate ``rate_i = 1[i = k] - pi_i - pi_k + Q`` and the rest bucket at
``pi_R_dot = -Q_R + pi_R (Q - pi_k)`` (P1 summed over the tokens outside ``S``: this is where ``Q_R`` enters; it
cannot be recovered from the support alone). A registered divergence is a function ``D(log pi_S)`` of the support
log-probs (the rest bucket is derived from them), so by the chain rule::

    D_dot = sum_{i in S} dD/d(log pi_i) * rate_i                                                         (P2)

(``dD/dlog pi_i = pi_i (dD/dpi_i - dD/dpi_R)`` and ``sum_S pi_i_dot = -pi_R_dot`` put the rest bucket's term back
in). The partials come from autograd on the registered function over the ``[N, M]`` support, which is tiny, so
every registered divergence gets the predictive direction without its own derivative. For ``KL_topk`` P2 is the
SPEC's closed form ``(pi_k - mu_k) - sum_S pi_i (pi_i - mu_i) - (1 - mu_R / pi_R) Q_R``; treating the rest bucket as
one logit (``-pi_R (pi_R - mu_R)`` in place of the last term) is *not* what this computes.

Kinks (TV, and any divergence with ``|.|``): at a cell with ``pi_c = mu_c`` exactly, ``D`` is not differentiable
along ``v``: the right derivative gets ``+1/2 |pi_c_dot|`` from that cell and the left one ``-1/2 |pi_c_dot|``.
We use autograd's convention ``d|x|/dx = sign(0) = 0`` at the tie, i.e. the mean of the two one-sided derivatives
(the cell counts as neither pushing out nor in). So near a tie the mask can under-report an outward move by at most
``1/2 sum_ties |pi_c_dot|``; exact ties need bitwise-equal fp32 probabilities, and when every cell ties ``D = 0``
is inside any trust region anyway.

Binary supports (``S = {a_t}``): ``pi_k_dot = pi_k (1 - 2 pi_k + Q) >= pi_k (1 - pi_k)^2 >= 0``, so ``D_dot`` has the
sign of ``pi_k - mu_k`` for every divergence that grows with ``|pi_k - mu_k|``: the predictive test *is* the sampled
test there, which is why the config accepts ``direction=predictive`` for Top-K modes only.
"""

from __future__ import annotations

from typing import Callable

import torch

from .checks import check_shape

__all__ = ["logit_rates", "predictive_ddot"]


def logit_rates(pi_logp: torch.Tensor, valid: torch.Tensor, is_sampled: torch.Tensor, rest_sq: torch.Tensor):
    """Relative rates ``pi_i_dot / pi_i`` of P1 on the support ``[N, M]`` (0 on invalid slots), fp32.

    Args:
        pi_logp: ``[N, M]`` log pi at the support ids (full-vocabulary normalisation).
        valid: ``[N, M]`` bool, the support slots (padded/duplicate slots False).
        is_sampled: ``[N, M]`` bool, True at the slot holding the sampled token ``a_t`` (one per real row).
        rest_sq: ``[N]`` ``Q_R = sum_{j not in S} pi_j^2``.
    """
    p = torch.where(valid, pi_logp.float().exp(), 0.0)  # [N, M]
    p_k = torch.where(is_sampled, p, 0.0).sum(-1, keepdim=True)  # [N, 1]
    q = p.square().sum(-1, keepdim=True) + rest_sq.float().unsqueeze(-1)  # [N, 1]: Q = sum_S pi^2 + Q_R
    rate = is_sampled.float() - p - p_k + q  # [N, M]
    return torch.where(valid, rate, 0.0)


def predictive_ddot(
    divergence_fn: Callable[..., torch.Tensor],
    pi_logp: torch.Tensor,
    mu_logp: torch.Tensor,
    valid: torch.Tensor,
    is_sampled: torch.Tensor,
    rest_sq: torch.Tensor,
) -> torch.Tensor:
    """``D_dot`` of P2: d/d eps of ``divergence_fn`` at ``z + eps (e_{a_t} - pi)``, eps = 0. ``[N]`` fp32.

    Args:
        divergence_fn: a registered divergence, ``fn(pi_logp [N, M], mu_logp [N, M], valid) -> [N]``.
        pi_logp, mu_logp, valid, is_sampled: ``[N, M]`` support tensors (see :func:`logit_rates`).
        rest_sq: ``[N]`` ``Q_R``.

    Rows without a sampled slot (padding) give meaningless values: the caller zeroes them. Not differentiable.
    """
    n_m = list(pi_logp.shape)
    for name, t in (("mu_logp", mu_logp), ("valid", valid), ("is_sampled", is_sampled)):
        check_shape(name, t, n_m)
    check_shape("rest_sq", rest_sq, n_m[:-1])
    with torch.enable_grad():  # the hook runs under no_grad; this graph is [N, M] and local
        leaf = pi_logp.detach().float().requires_grad_(True)
        (grad,) = torch.autograd.grad(divergence_fn(leaf, mu_logp.detach(), valid).sum(), leaf)
    rate = logit_rates(pi_logp.detach(), valid, is_sampled, rest_sq)
    # where, not multiply: all-padding rows have NaN partials (logsumexp of -inf only) that must not leak.
    return torch.where(valid, grad * rate, 0.0).sum(-1)
