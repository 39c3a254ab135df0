"""Support construction: rollout top-K (ranks 1..K, untouched) plus the sampled token, as K + 1 slots.

Shapes: ``[..., K]`` rollout top-K (typically ``[B, T, K]`` or packed ``[N, K]``), ``[...]`` sampled token.
Output ``[..., M]`` with ``M = K + 1``; ``K = 0`` gives the binary support ``M = 1`` (just the sampled token):
binary is Top-K with an empty top-K set.

Slot validity (SPEC, data contract):
- a top-K slot is valid when its logprob is not -inf (the rollout pads missing ranks with -inf) and its id
  did not already occur at a lower rank (duplicates would double-count mass);
- the appended slot K (the sampled token ``a_t`` with ``mu(a_t)`` from ``rollout_log_probs``) is valid only
  when ``a_t`` is not among the valid top-K ids.
Invalid slots carry id 0 (safe to gather) and mu-logprob -inf; ``valid`` keeps them out of every sum.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from ..contract import ROLLOUT_LOG_PROBS, ROLLOUT_NUM_TOPK, ROLLOUT_TOPK_IDS, ROLLOUT_TOPK_LOGPROBS
from .checks import check_finite_logprobs, check_int_ids, check_shape

__all__ = ["Support", "build_support"]


class Support(NamedTuple):
    ids: torch.Tensor  # [..., M] int64 global token ids
    mu_logp: torch.Tensor  # [..., M] fp32 rollout log-probabilities, -inf where invalid
    valid: torch.Tensor  # [..., M] bool
    is_sampled: torch.Tensor  # [..., M] bool, True at the one valid slot holding a_t (the predictive direction's k)

    @property
    def size(self) -> torch.Tensor:
        """Number of valid slots per token ``[...]`` (1 for binary, up to K + 1 for Top-K), fp32."""
        return self.valid.sum(-1).float()


def build_support(
    sampled_ids: torch.Tensor,
    sampled_logp: torch.Tensor,
    topk_ids: Optional[torch.Tensor] = None,
    topk_logp: Optional[torch.Tensor] = None,
    *,
    vocab_size: Optional[int] = None,
    num_topk: Optional[int] = None,
    row_valid: Optional[torch.Tensor] = None,
) -> Support:
    """Build the ``K + 1`` support (or the binary one when ``topk_ids`` is None).

    Args:
        sampled_ids: ``[...]`` the response token ids ``a_t``.
        sampled_logp: ``[...]`` ``log mu(a_t)`` (verl's ``rollout_log_probs``).
        topk_ids: ``[..., K]`` int32/int64 rollout top-K ids, ranks 1..K (``rollout_topk_ids``).
        topk_logp: ``[..., K]`` their log-probabilities, -inf padded (``rollout_topk_logprobs``).
        vocab_size: when given, every id of a real token must lie in ``[0, vocab_size)``.
        num_topk: when given, the K the config expects; a different K is an error (never silently 1).
        row_valid: ``[...]`` bool, True for real response tokens (verl's ``response_mask``). Padded rows get
            an all-invalid support and are never validated (their contents are whatever padding held).

    Returns:
        :class:`Support` with ``[..., M]`` tensors.
    """
    lead = list(sampled_ids.shape)
    check_shape("sampled_logp (rollout_log_probs)", sampled_logp, lead)
    check_int_ids("response ids", sampled_ids, vocab_size, row_valid)
    if row_valid is not None:
        check_shape("row_valid (response_mask)", row_valid, lead)
        row_valid = row_valid.bool()
    check_finite_logprobs(ROLLOUT_LOG_PROBS, sampled_logp, row_valid)
    sampled_ids = sampled_ids.long()

    if topk_ids is None:
        if topk_logp is not None:
            raise ValueError("rollout_topk_logprobs given without rollout_topk_ids")
        valid = torch.ones_like(sampled_ids, dtype=torch.bool) if row_valid is None else row_valid.clone()
        mu = sampled_logp.float().masked_fill(~valid, float("-inf"))
        valid = valid.unsqueeze(-1)
        return Support(torch.where(valid, sampled_ids.unsqueeze(-1), 0), mu.unsqueeze(-1), valid, valid.clone())

    if topk_logp is None:
        raise ValueError("rollout_topk_ids given without rollout_topk_logprobs")
    check_shape(ROLLOUT_TOPK_IDS, topk_ids, lead + [None])
    k = topk_ids.shape[-1]
    check_shape(ROLLOUT_TOPK_LOGPROBS, topk_logp, lead + [k])
    if num_topk is not None and k != num_topk:
        raise ValueError(
            f"{ROLLOUT_TOPK_IDS} has K={k} (shape {list(topk_ids.shape)}) but policy_loss.num_topk={num_topk}; "
            f"set +{ROLLOUT_NUM_TOPK}={num_topk} or policy_loss.num_topk={k}"
        )
    slot_rows = None if row_valid is None else row_valid.unsqueeze(-1)
    check_finite_logprobs(ROLLOUT_TOPK_LOGPROBS, topk_logp, slot_rows)
    topk_logp = topk_logp.float()
    real = torch.isfinite(topk_logp)
    if slot_rows is not None:
        real = real & slot_rows
    check_int_ids(ROLLOUT_TOPK_IDS, topk_ids, vocab_size, real)
    topk_ids = topk_ids.long()

    # A rank is a duplicate when the same id occurs at a lower valid rank: [..., K, K] comparison, K ~ 20.
    same = (topk_ids.unsqueeze(-1) == topk_ids.unsqueeze(-2)) & real.unsqueeze(-2)
    earlier = torch.ones(k, k, dtype=torch.bool, device=topk_ids.device).tril(-1)  # [i, j]: j < i
    dup = (same & earlier).any(-1)
    topk_valid = real & ~dup

    in_topk = ((topk_ids == sampled_ids.unsqueeze(-1)) & topk_valid).any(-1)
    extra_valid = ~in_topk if row_valid is None else (~in_topk & row_valid)

    valid = torch.cat([topk_valid, extra_valid.unsqueeze(-1)], dim=-1)  # [..., K + 1]
    ids = torch.cat([topk_ids, sampled_ids.unsqueeze(-1)], dim=-1)
    mu = torch.cat([topk_logp, sampled_logp.float().unsqueeze(-1)], dim=-1)
    ids = torch.where(valid, ids, 0)
    mu = mu.masked_fill(~valid, float("-inf"))
    # a_t sits either in its top-K rank or in the appended slot, never both (the appended one is then invalid).
    is_sampled = valid & (ids == sampled_ids.unsqueeze(-1))
    return Support(ids, mu, valid, is_sampled)
