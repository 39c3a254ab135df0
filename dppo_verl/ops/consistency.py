"""Is each response token's rollout top-K row its own? Per-token status codes, computed on the device (no sync).

A top-K row that belongs to another token (rows shifted by a lost or duplicated attempt when an async trainer
resumed a generation, rows of another sample, another policy version's rows) gives a divergence that is finite and
plausible, and wrong. Two checks catch it where the support is built, per response token (``response_mask`` 1):

- the row has at least one valid top-K slot (the engine returned the token's candidates);
- when the sampled token ``a_t`` is among its valid top-K ids, the top-K log-prob there equals ``rollout_log_probs``
  (both are the engine's one fp32 value for that token: vLLM's flat logprobs / SGLang's ``output_token_logprobs``
  and ``output_top_logprobs`` read the same tensor; fp32 -> Python float -> fp32 is exact). Tolerance
  ``|topk - mu| <= TOPK_MU_ATOL + TOPK_MU_RTOL * |mu|``: fp32 rounding (rel 6e-8) and a 6-significant-digit text
  round trip (rel 5e-7) pass; a row from another token or policy version differs by far more.

The codes (:data:`VALID`, :data:`MISSING`, :data:`MISMATCH`) travel to the loss as the per-token model output
``dppo_topk_valid``; the loss counts the bad ones in its single metrics read and raises there (no extra sync here).
"""

from __future__ import annotations

import torch

from .support import Support

__all__ = ["VALID", "MISSING", "MISMATCH", "TOPK_MU_ATOL", "TOPK_MU_RTOL", "topk_row_status", "describe_status"]

VALID, MISSING, MISMATCH = 1.0, 0.0, -1.0
TOPK_MU_ATOL, TOPK_MU_RTOL = 1e-6, 1e-5


def topk_row_status(sup: Support, sampled_logp: torch.Tensor, row_valid: torch.Tensor) -> torch.Tensor:
    """``[...]`` fp32 codes from the ``K + 1`` support (:func:`dppo_verl.ops.support.build_support`) and
    ``log mu(a_t)`` ``[...]``: :data:`VALID`, :data:`MISSING` (no valid top-K slot; also every row outside the
    response, ``row_valid`` False) or :data:`MISMATCH` (``a_t`` in its top-K with another log-prob)."""
    k = sup.valid.shape[-1] - 1  # the last slot is the appended sampled token
    # mu at a_t's one slot (duplicates were invalidated by build_support): its top-K rank, or the appended slot, whose
    # mu *is* rollout_log_probs (never off): one masked sum over all M slots instead of slicing out the top-K ranks
    at_mu = torch.where(sup.is_sampled, sup.mu_logp, 0.0).sum(-1)
    mu = sampled_logp.float()
    off = (at_mu - mu).abs() > TOPK_MU_ATOL + TOPK_MU_RTOL * mu.abs()
    has_topk = sup.valid[..., :k].any(-1) & row_valid.bool()  # no valid slot at all off the response
    return torch.where(has_topk, torch.where(off, MISMATCH, VALID), MISSING)


def describe_status(code: float) -> str:
    """The words for a status code, for error messages."""
    if code == MISSING:
        return "has no valid rollout top-K row"
    if code == MISMATCH:
        return (f"is in its rollout top-K with a log-prob that differs from its rollout_log_probs by more than "
                f"{TOPK_MU_ATOL:g} + {TOPK_MU_RTOL:g} * |mu|")
    return "is valid"
