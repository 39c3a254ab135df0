"""One normalisation for mu and pi: the trainer's log-probs over the ids the rollout engine samples from.

verl's vLLM server sets the logits of ids ``>= len(tokenizer)`` (a padded head: Qwen2.5/3 pad ~151,6xx tokenizer ids
to 151,936 rows) and of verl's banned ids (vision placeholders) to -inf before sampling, so mu is a softmax over the
*samplable* ids ``A``, while the trainer's softmax covers the whole head. With ``m`` the trainer's mass on the excluded
ids ``E`` (every row not in ``A``), the trainer's distribution over ``A`` is::

    pi_A(j) = pi(j) / (1 - m)  for j in A,        log pi_A(j) = log pi(j) - log(1 - m)

Unchecked, every DPPO ratio and divergence carries the bias ``-log(1 - m)`` (0.2 nats for the demo's untrained
320-row head over 261 ids). This module computes ``m`` per row from a narrow read of the logits (only the ``|E|``
excluded columns: 59 for the demo, 271 for Qwen3, never ``N x V``) in the form the loss needs::

    g = log sum_{j in E} exp(z_j) - z_a        so that    log m = g + log pi(a)      (a: the row's label)

``g`` needs no full-vocabulary log-sum-exp: the loss adds verl's own ``log pi(a)`` (with the same normalisation the
engine used), and the Top-K hook adds its own. Forward-only: the correction ``log(1 - m)`` enters the loss as a
constant, so the gradient of ``log pi_A(a)`` differs from verl's ``grad log pi(a)`` only by ``grad log(1 - m)``, which
on the logits of that row is ``pi_A(j) - pi(j)`` on ``A`` (proportional to ``pi(j)``: no change of ``pi_A``) and
``-pi(j)`` on ``E``: it moves mass between ``A`` and the never-sampled ids only, and costs no ``N x V`` gradient.

Precision: ``log m`` comes from fp32 log-sum-exps (a few 1e-6 off); ``log(1 - m)`` amplifies that by ``m / (1 - m)``:
~1e-6 at m = 0.5, ~1e-4 at m = 0.99, where pi over the samplable ids is itself barely defined.

Shapes: ``N`` rows, ``V_local`` this rank's vocabulary shard (rank r holds global ids ``[r V_local, (r+1) V_local)``),
``M`` support slots. ``tp_group=None`` means unsharded.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist

__all__ = ["SampledIds", "ExcludedStats", "excluded_stats", "log_excluded_mass", "log_kept_mass",
           "renormalize_support"]


class SampledIds(NamedTuple):
    """The ids a rollout engine samples from, as the complement of a tail and a list: ``j < limit`` and
    ``j not in banned``. ``limit=None``: no tail is masked (every head row is samplable)."""

    limit: Optional[int] = None
    banned: tuple[int, ...] = ()

    def excluded_count(self, vocab_size: int) -> int:
        """``|E|`` for a head of ``vocab_size`` rows."""
        limit = vocab_size if self.limit is None else min(self.limit, vocab_size)
        return vocab_size - limit + len({b for b in self.banned if 0 <= b < limit})

    def is_everything(self, vocab_size: int) -> bool:
        return self.excluded_count(vocab_size) == 0


class ExcludedStats(NamedTuple):
    lse: torch.Tensor  # [N] log sum_{j in E} exp(z_j), fp32 (-inf when E is empty)
    lse_sq: Optional[torch.Tensor]  # [N] log sum_{j in E} exp(2 z_j) (the predictive statistic), or None
    label_logit: torch.Tensor  # [N] z at the row's label, fp32

    @property
    def log_ratio(self) -> torch.Tensor:
        """``[N]`` g = log sum_E exp(z) - z_label: ``log m = g + log pi(label)`` under any normalisation of z."""
        return self.lse - self.label_logit


def _local_columns(v_local: int, lo: int, ids: SampledIds, device) -> tuple[slice, Optional[torch.Tensor]]:
    """This shard's excluded columns: a slice for the tail ``[limit, V)`` and local indices of the banned ids."""
    limit = lo + v_local if ids.limit is None else ids.limit
    tail = slice(min(max(limit - lo, 0), v_local), v_local)
    banned = tuple(sorted({b - lo for b in ids.banned if lo <= b < lo + v_local and b < limit}))
    return tail, (_banned_index(banned, str(device)) if banned else None)


@functools.lru_cache(maxsize=64)
def _banned_index(banned: tuple, device: str) -> torch.Tensor:
    """The banned ids' local column indices on ``device``, made once per (ids, shard, device): a host-to-device copy
    per micro-batch otherwise (vision models ban a few placeholder ids)."""
    return torch.tensor(banned, dtype=torch.long, device=device)


def _local_lse(logits: torch.Tensor, tail: slice, banned: Optional[torch.Tensor], scale: float) -> torch.Tensor:
    """``log sum_{E local} exp(scale * z)`` ``[N]`` over the narrow excluded columns only (fp32; -inf when none)."""
    parts = [logits[:, tail]] + ([logits.index_select(1, banned)] if banned is not None else [])
    # [N, |E_local|]: the narrow columns, never the whole shard (a view of the tail when nothing else is banned)
    cols = (parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)).float()
    if cols.shape[1] == 0:
        return torch.full((logits.shape[0],), float("-inf"), dtype=torch.float32, device=logits.device)
    return torch.logsumexp(cols if scale == 1.0 else scale * cols, dim=-1)


def _combine_lse(local: torch.Tensor, tp_group) -> torch.Tensor:
    """``[N, c]`` per-shard log-sum-exps -> the global ones (MAX then SUM of the shifted exps; -inf stays -inf)."""
    top = local.clone()
    dist.all_reduce(top, op=dist.ReduceOp.MAX, group=tp_group)
    shift = torch.where(torch.isinf(top), 0.0, top)
    total = torch.exp(local - shift)
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=tp_group)
    return shift + torch.log(total)


@torch.no_grad()
def excluded_stats(logits: torch.Tensor, labels: torch.Tensor, ids: SampledIds, *, tp_group=None,
                   squares: bool = False) -> ExcludedStats:
    """Per row, ``g = log sum_{j in E} exp(z_j) - z_label`` (module docstring) and, with ``squares``, the same for
    ``exp(2 z)`` (the predictive statistic needs ``sum_E pi_j^2``).

    Args:
        logits: ``[N, V_local]`` any float dtype, this rank's shard (read-only; only the ``|E|`` excluded columns and
            the labels' column are read).
        labels: ``[N]`` global ids of each row's token (verl's labels: the sampled token on response rows).
        ids: the samplable ids (:class:`SampledIds`).
    """
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"logits [N, V_local] and labels [N] expected, got {list(logits.shape)} and {list(labels.shape)}")
    tp = 1 if tp_group is None else dist.get_world_size(tp_group)
    rank = 0 if tp_group is None else dist.get_rank(tp_group)
    n, v_local = logits.shape
    lo = rank * v_local
    tail, banned = _local_columns(v_local, lo, ids, logits.device)
    local = [_local_lse(logits, tail, banned, 1.0)] + ([_local_lse(logits, tail, banned, 2.0)] if squares else [])
    lse = torch.stack(local, dim=-1)  # [N, 1 or 2]
    labels = labels.long()
    if tp == 1:  # unsharded: clamped only to keep the gather safe (the callers validate the labels)
        z = logits.gather(1, labels.clamp(0, v_local - 1).unsqueeze(-1))[:, 0].float()
    else:
        in_shard = (labels >= lo) & (labels < lo + v_local)
        z = torch.where(in_shard, logits.gather(1, torch.where(in_shard, labels - lo, 0).unsqueeze(-1))[:, 0].float(),
                        0.0)
        lse = _combine_lse(lse, tp_group)
        dist.all_reduce(z, op=dist.ReduceOp.SUM, group=tp_group)
    return ExcludedStats(lse[:, 0], lse[:, 1] if squares else None, z)


def log_excluded_mass(log_ratio: torch.Tensor, label_logp: torch.Tensor) -> torch.Tensor:
    """``log m = g + log pi(label)`` (any shape, fp32). ``m < 1`` for any finite logits; the callers check it."""
    return log_ratio.float() + label_logp.float()


def log_kept_mass(log_m: torch.Tensor) -> torch.Tensor:
    """``log(1 - m)`` from ``log m`` without cancellation (``log(-expm1(log m))``); 0 where ``m = 0``. ``-inf`` or NaN
    where ``log m >= 0``: the trainer puts all its mass on ids the engine never samples (the callers refuse that)."""
    return torch.log(-torch.expm1(log_m))


def renormalize_support(support_logp: torch.Tensor, log_m: torch.Tensor, rest_sq: Optional[torch.Tensor] = None,
                        log_m_sq: Optional[torch.Tensor] = None):
    """Full-head log pi at the support slots ``[N, M]`` -> log pi_A (every support id is samplable: the engine returned
    it), given ``log m`` ``[N]``; and ``rest_sq = sum_{j not in S} pi_j^2`` -> ``sum_{j in A, not in S} pi_A(j)^2``
    given ``log_m_sq = log sum_E pi_j^2``. Returns ``(logp, rest_sq)``."""
    log_keep = log_kept_mass(log_m)
    logp = support_logp - log_keep.unsqueeze(-1)
    if rest_sq is None:
        return logp, None
    # sum_E pi^2 is a subset of the rest's terms: subtracting it cannot go below 0 beyond rounding
    return logp, (rest_sq - torch.exp(log_m_sq)).clamp(min=0.0) * torch.exp(-2.0 * log_keep)
