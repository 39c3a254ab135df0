"""log pi(a_t) *with its backward* from the same single read of a (vocab-sharded) logits tensor (issue #10, stage 2).

Notation: ``N`` rows, ``V_local`` shard width, ``M`` support ids per row (K + 1 slots), ``a_n`` the label
(the sampled / next token) of row ``n``, all ids global. One forward call does what the Top-K hook and the
engine's own sampled-token pass (verl's ``logprobs_from_logits`` / ``vocab_parallel_log_probs_from_logits``)
would each do with their own read of the logits:

    forward   one Triton pass over the shard (:mod:`.kernels.vocab_stats_triton`) with ids = [S_n, a_n]
              (M + 1 columns), then the torch all-reduces of :func:`.vocab_parallel.vocab_parallel_stats`
              (MAX, SUM, SUM; the label rides in the gathered matrix, no extra collective):
                  y_n = log pi(a_n) = x[n, a_n] - lse_n                    [N] fp32, differentiable
                  log pi(S_n)                                              [N, M] fp32, no grad (mask only)
                  sum_{j not in S} pi_j^2 (optional, predictive direction) [N] fp32, no grad
    backward  d y_n / d x[n, j] = [j == a_n] - pi_j  (the negated softmax - onehot of cross-entropy), so
                  grad_x = g[:, None] * (onehot(a) - exp(x - lse[:, None]))
              by a second streaming kernel (:mod:`.kernels.logprob_grad_triton`), written in the logits' dtype.

Saved for backward: the global ``lse`` [N], the local label column [N] and the logits themselves (a reference,
as every log-softmax backward keeps; never an ``N x V`` copy). No all-reduce in backward: ``lse`` is global and
``g`` is replicated over the TP group, as in Megatron's ``_VocabParallelCrossEntropy``. A label in another rank's
shard contributes only ``-g * softmax`` here. An in-place write to the logits between forward and backward is
caught by autograd's version check (a loud error, never a wrong gradient).

Naive equivalent (tp = 1)::

    lp = torch.log_softmax(logits.float(), -1); y = lp.gather(1, labels[:, None])[:, 0]
    support = lp.detach().gather(1, support_ids)
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.distributed as dist

from .checks import check_shape
from .vocab_parallel import DEFAULT_CHUNK_BYTES, vocab_parallel_stats

__all__ = ["BACKWARDS", "FusedLogprobs", "fused_logprobs", "logprob_grad_torch"]

BACKWARDS = ("triton", "torch")
_CHUNK_BYTES_ACCEL = 256 * 1024 * 1024


class FusedLogprobs(NamedTuple):
    label_logp: torch.Tensor  # [N] fp32, log pi(a_n); differentiable w.r.t. the logits
    support_logp: torch.Tensor  # [N, M] fp32, log pi at the support ids; no grad
    lse: torch.Tensor  # [N] fp32, full-vocabulary log-sum-exp; no grad
    rest_sq: Optional[torch.Tensor]  # [N] fp32, sum_{j not in S} pi_j^2 when sq_exclude was given; no grad


def logprob_grad_torch(logits, local_label, lse, grad_out, *, chunk_bytes: Optional[int] = None) -> torch.Tensor:
    """The torch twin of :func:`.kernels.logprob_grad_triton.triton_logprob_grad` (reference; explicit choice
    ``backward="torch"``, never a silent fallback). Row chunks bound the fp32 temporaries to ``chunk_bytes``."""
    n, v_local = logits.shape
    budget = chunk_bytes or DEFAULT_CHUNK_BYTES.get(logits.device.type, _CHUNK_BYTES_ACCEL)
    rows = max(1, int(budget) // max(1, v_local * 4 * 2))  # fp32 copy + onehot - p
    out = torch.empty((n, v_local), dtype=logits.dtype, device=logits.device)
    inside = (local_label >= 0) & (local_label < v_local)
    for s in range(0, n, rows):
        p = torch.exp(logits[s : s + rows].float() - lse[s : s + rows, None])  # [c, V_local]
        onehot = torch.zeros_like(p)
        r = inside[s : s + rows].nonzero()[:, 0]
        onehot[r, local_label[s : s + rows][r]] = 1.0
        out[s : s + rows] = (grad_out[s : s + rows, None].float() * (onehot - p)).to(logits.dtype)
    return out


class _FusedLogprobFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, support_ids, sq_exclude, tp_group, backward):
        n, v_local = logits.shape
        ids = torch.cat([support_ids.long(), labels.long()[:, None]], dim=1)  # [N, M + 1]: the label rides along
        exclude = None
        if sq_exclude is not None:  # the label column never excludes anything from rest_sq
            exclude = torch.cat([sq_exclude.bool(), sq_exclude.new_zeros(n, 1, dtype=torch.bool)], dim=1)
        st = vocab_parallel_stats(logits, ids, tp_group=tp_group, sq_exclude=exclude, backend="triton")
        lo = 0 if tp_group is None else dist.get_rank(tp_group) * v_local
        local = labels.long() - lo
        local = torch.where((local >= 0) & (local < v_local), local, -1)  # [N], -1: another rank's shard
        ctx.save_for_backward(logits, local, st.lse)
        ctx.backward_impl = backward
        ctx.set_materialize_grads(False)
        rest_sq = st.rest_sq if st.rest_sq is not None else st.lse.new_empty(0)
        support, lse = st.logp[:, :-1].contiguous(), st.lse
        ctx.mark_non_differentiable(support, lse, rest_sq)
        return st.logp[:, -1].contiguous(), support, lse, rest_sq

    @staticmethod
    def backward(ctx, g, *_no_grad_outputs):
        if g is None:  # log pi(a_t) unused downstream
            return (None,) * 6
        logits, local, lse = ctx.saved_tensors
        if ctx.backward_impl == "torch":
            grad = logprob_grad_torch(logits, local, lse, g)
        else:
            from .kernels import load_logprob_grad_triton

            grad = load_logprob_grad_triton().triton_logprob_grad(logits, local, lse, g)
        return grad, None, None, None, None, None


def fused_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    support_ids: torch.Tensor,
    *,
    tp_group=None,
    sq_exclude: Optional[torch.Tensor] = None,
    backward: str = "triton",
) -> FusedLogprobs:
    """log pi(labels) with its gradient, and the support log-probs, from one Triton read of the logits.

    Args:
        logits: ``[N, V_local]`` bf16/fp16/fp32 shard of this rank (usually ``requires_grad``). Never modified.
        labels: ``[N]`` int32/int64 *global* label ids (the token each row predicts).
        support_ids: ``[N, M]`` int32/int64 global ids (the Top-K support; ``M`` may be 0).
        tp_group: tensor-parallel group over which the vocabulary is sharded; None = unsharded.
        sq_exclude: ``[N, M]`` bool; when given, also ``rest_sq = sum_{j not in S} pi_j^2`` (predictive direction).
        backward: ``triton`` (the fused kernel) or ``torch`` (the chunked reference, for tests).

    Returns:
        :class:`FusedLogprobs`; only ``label_logp`` carries a gradient.
    """
    check_shape("logits", logits, [None, None])
    check_shape("labels", labels, [logits.shape[0]])
    check_shape("support_ids", support_ids, [logits.shape[0], None])
    if labels.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"labels must be int32 or int64 global token ids, got dtype {labels.dtype}")
    if backward not in BACKWARDS:
        raise ValueError(f"backward must be one of {list(BACKWARDS)}, got {backward!r}")
    if sq_exclude is not None:
        check_shape("sq_exclude", sq_exclude, list(support_ids.shape))
    label_logp, support, lse, rest_sq = _FusedLogprobFn.apply(logits, labels, support_ids, sq_exclude, tp_group,
                                                               backward)
    return FusedLogprobs(label_logp, support, lse, rest_sq if sq_exclude is not None else None)
