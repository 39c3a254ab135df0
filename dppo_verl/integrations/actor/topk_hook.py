"""Top-K divergence inside verl's actor forward, through the engines' logits-processor hook.

verl 0.9.1's engines call the loss function as a logits processor when a micro-batch carries the non-tensor
flag ``distillation_use_topk`` (added for on-policy distillation; verl_0.9.1_internals.md §4.1):

- FSDP: ``loss_fn(student_logits=[1, N_local, V], data=micro_batch)``; temperature-scaled, full vocabulary,
  packed rows (``N_local = (N + pad) / sp`` under Ulysses SP: this rank's slice of the packed sequence);
- Megatron: ``loss_fn(student_logits=..., data=batch, data_format="thd"|"bshd")``; temperature-scaled,
  vocabulary shard ``V / tp``; THD ``[1, N_pad / cp, V / tp]`` (per-sequence padding, zigzag CP split) or
  BSHD ``[B, S_pad / cp, V / tp]``.

The batch's response-only rollout tensors are laid out like the logits by :mod:`.layout`. The result is
per-row scalars (``dppo_divergence``, ``dppo_support_size``, ``dppo_topk_valid`` (:mod:`dppo_verl.ops.consistency`),
and ``dppo_ddot`` for the predictive direction, :mod:`dppo_verl.ops.predictive`) of the logits' leading shape; the
engines gather/unpack them like ``log_probs``.

Nothing here keeps a reference to the logits (both engines reuse that buffer in place afterwards) and
everything runs under no_grad: the divergence only drives the mask. The one exception is the opt-in
``policy_loss.fused_logprobs``: the same Triton pass then also yields log pi(label) *with* its gradient, which
replaces the engine's own sampled-token pass (:mod:`.fused_logprob`); only autograd keeps the logits for it.
"""

from __future__ import annotations

from typing import Optional

import torch

from ...contract import (
    OLD_LOG_PROBS, OLD_TOPK_LOGPROBS, OUT_DDOT, OUT_DIVERGENCE, OUT_EXCLUDED, OUT_OLD_TOPK_PREFIX, OUT_SUPPORT_SIZE,
    OUT_TOPK_VALID,
)
from ...ops.consistency import topk_row_status
from ...ops.divergence import get_divergence
from ...ops.predictive import predictive_ddot
from ...ops.sampled_vocab import excluded_stats, renormalize_support
from ...ops.support import build_support
from ...ops.vocab_parallel import vocab_parallel_stats
from .layout import flat_fields, layout_like_logits, logit_slabs, megatron_layout_of, packed_support_inputs

__all__ = ["topk_outputs", "old_topk_outputs"]


def _divergence_outputs(pi_logp, rest_sq, sup, mu, row_valid: torch.Tensor, knobs, anchor=None) -> dict:
    """log pi at the support ``[s, K + 1]`` (and ``rest_sq [s]``) -> per-row ``dppo_*`` scalars ``[s]`` (0 off-response).
    ``dppo_topk_valid`` is the row's consistency code (:mod:`dppo_verl.ops.consistency`), computed here on the device;
    the loss reads it with its metrics (one read per micro-batch) and raises there. ``anchor``: the support with
    pi_old's log-probs in place of mu's (``anchor=old``); the rows are still checked on the rollout's own values."""
    fn = get_divergence(knobs.divergence).fn
    out = {OUT_SUPPORT_SIZE: sup.size,  # already 0 off the response: build_support validates no slot there
           OUT_TOPK_VALID: topk_row_status(sup, mu, row_valid)}
    ref = sup if anchor is None else anchor
    if knobs.direction == "predictive":
        ddot = predictive_ddot(fn, pi_logp, ref.mu_logp, ref.valid, ref.is_sampled, rest_sq)
        out[OUT_DDOT] = torch.where(row_valid, ddot, 0.0)
    out[OUT_DIVERGENCE] = torch.where(row_valid, fn(pi_logp, ref.mu_logp, ref.valid), 0.0)
    return out


def _old_anchor(sup, part: dict):
    """``anchor=old``: the rollout's support ``[s, K + 1]`` with log pi_old at its slots (the pi_old pass's
    ``old_topk_logprobs`` at the top-K ranks, verl's ``old_log_probs`` at the appended sampled token), -inf where the
    slot is invalid (missing rank, duplicate, a_t already in the top-K)."""
    if "anchor_topk" not in part:
        return None
    logp = torch.cat([part["anchor_topk"], part["anchor_sampled"].unsqueeze(-1)], dim=-1)
    return sup._replace(mu_logp=logp.masked_fill(~sup.valid, float("-inf")))


def _row_outputs(logits: torch.Tensor, sup, part: dict, row_valid: torch.Tensor, knobs, tp_group, checks,
                 sampled_ids) -> dict:
    """One ``[s, V_local]`` slab of rows -> per-row ``dppo_*`` scalars ``[s]`` (0 on rows that are not response)."""
    predictive = knobs.direction == "predictive"
    # Q_R = sum_{j not in S} pi_j^2 (predictive) rides in the vocab-parallel SUM (one more float per row).
    st = vocab_parallel_stats(logits, sup.ids, tp_group=tp_group, sq_exclude=sup.valid if predictive else None,
                              checks=checks, ids_checked=True)  # build_support queued the ids' range check
    anchor = _old_anchor(sup, part)
    if sampled_ids is None:
        return _divergence_outputs(st.logp, st.rest_sq, sup, part["mu"], row_valid, knobs, anchor)
    # pi over the ids the rollout samples from (ops.sampled_vocab): log m = lse_E - lse, on the narrow E columns. The
    # old anchor (pi_old from verl's pass, full head) keeps the trainer's normalisation: only Eq. 11's weight takes m.
    ex = excluded_stats(logits, part["sampled"], sampled_ids, tp_group=tp_group, squares=predictive and anchor is None)
    logp, rest_sq = st.logp, st.rest_sq
    if anchor is None:
        logp, rest_sq = renormalize_support(st.logp, ex.lse - st.lse, st.rest_sq,
                                            None if ex.lse_sq is None else ex.lse_sq - 2.0 * st.lse)
    out = _divergence_outputs(logp, rest_sq, sup, part["mu"], row_valid, knobs, anchor)
    out[OUT_EXCLUDED] = ex.log_ratio
    return out


def _fused_outputs(student_logits: torch.Tensor, laid: dict, knobs, tp_group, vocab: int, grad: bool,
                   checks, sampled_ids) -> dict:
    """``policy_loss.fused_logprobs``: every row at once through one Triton pass that also yields verl's
    log pi(label) with its gradient (handed to the engine's log-prob call, :mod:`.fused_logprob`)."""
    from . import fused_logprob as handoff
    from ...ops.fused_logprob import fused_logprobs

    handoff.require_triton(student_logits)
    labels = handoff.current_labels(student_logits)
    lead = tuple(student_logits.shape[:-1])
    flat = flat_fields(laid, len(lead))
    row_valid = flat["row_valid"].bool()
    sup = build_support(flat["sampled"], flat["mu"], flat["topk_ids"], flat["topk_logp"], vocab_size=vocab,
                        num_topk=knobs.num_topk, row_valid=row_valid, checks=checks)
    exclude = sup.valid if knobs.direction == "predictive" else None
    with torch.set_grad_enabled(grad):  # only log pi(label) carries a gradient; the rest drives the mask
        rows = handoff.flat_rows(student_logits)  # [R, V_local], a view (made with grad on: its backward is free)
        fused = fused_logprobs(rows, labels.reshape(-1), sup.ids, tp_group=tp_group, sq_exclude=exclude)
        handoff.offer(student_logits, labels, fused.label_logp.view(labels.shape))
    logp, rest_sq, extra = fused.support_logp, fused.rest_sq, {}
    if sampled_ids is not None:  # log m = g + log pi(label), with the fused pass's own log pi(label)
        ex = excluded_stats(rows.detach(), labels.reshape(-1), sampled_ids, tp_group=tp_group, squares=exclude is not None)
        label_logp = fused.label_logp.detach().float()
        lse = ex.label_logit - label_logp
        logp, rest_sq = renormalize_support(logp, ex.lse - lse, rest_sq,
                                            None if ex.lse_sq is None else ex.lse_sq - 2.0 * lse)
        extra[OUT_EXCLUDED] = ex.log_ratio
    out = _divergence_outputs(logp, rest_sq, sup, flat["mu"], row_valid, knobs)
    out.update(extra)
    return {key: v.view(lead) for key, v in out.items()}


def topk_outputs(student_logits: torch.Tensor, data, knobs, *, tp_group=None, data_format=None,
                 checks=None, sampled_ids=None) -> dict:
    """Per-row ``dppo_divergence``, ``dppo_support_size``, ``dppo_topk_valid`` (and ``dppo_ddot`` for
    ``direction=predictive``), each with the logits' leading shape ``[b, s]``. Under no_grad, except the fused
    log pi(label) (``fused_logprobs``). The data checks go on ``checks`` (a
    :class:`~dppo_verl.ops.checks.DeferredChecks`, read by the loss with its metrics: no device read here with
    verl's nested micro-batches); None reads them here, once. ``sampled_ids``
    (:class:`~dppo_verl.ops.sampled_vocab.SampledIds`, None = every head row): pi is normalised over the ids the
    rollout samples from, like mu, and ``dppo_excluded_log_ratio`` is returned for the loss."""
    from ...ops.checks import DeferredChecks

    grad = torch.is_grad_enabled()
    own = checks is None
    checks = DeferredChecks() if own else checks
    with torch.no_grad():
        extra = _OLD_ANCHOR_FIELDS if knobs.anchor == "old" else ()
        laid = _laid_inputs(student_logits, data, knobs, checks, data_format, extra)
        tp = 1 if tp_group is None else torch.distributed.get_world_size(tp_group)
        vocab = student_logits.shape[-1] * tp
        if getattr(knobs, "fused_logprobs", False):
            out = _fused_outputs(student_logits, laid, knobs, tp_group, vocab, grad, checks, sampled_ids)
        else:
            out = _all_rows(student_logits, laid, knobs, tp_group, vocab, checks, sampled_ids)
    if own:
        checks.run()
    return out


# anchor=old: (packed name, batch key, fill off-response) scattered beside the rollout's top-K
_OLD_ANCHOR_FIELDS = (("anchor_topk", OLD_TOPK_LOGPROBS, float("-inf")), ("anchor_sampled", OLD_LOG_PROBS, 0.0))


def _laid_inputs(student_logits: torch.Tensor, data, knobs, checks, data_format, extra=()) -> dict:
    """The batch's response-only rollout tensors (and ``extra`` fields) laid out like the logits' rows ``[b, s, ...]``."""
    packed = packed_support_inputs(data, knobs.num_topk, checks, extra=extra)
    offsets = packed.pop("offsets")
    if data_format is not None:  # Megatron's padding helpers pad with 0; bool cannot be padded
        packed["row_valid"] = packed["row_valid"].to(torch.uint8)
    megatron = None if data_format is None else megatron_layout_of(data)
    laid = {k: layout_like_logits(v, offsets, data_format, megatron) for k, v in packed.items()}
    lead = tuple(student_logits.shape[:-1])
    for k, v in laid.items():
        if tuple(v.shape[: len(lead)]) != lead:
            raise ValueError(
                f"Top-K rows do not line up with the logits: {k} laid out as {list(v.shape)}, logits "
                f"{list(student_logits.shape)} (data_format={data_format}, layout {megatron}): verl laid out this "
                "micro-batch in a way the hook does not reproduce; please report it with the verl version"
            )
    return laid


def old_topk_outputs(student_logits: torch.Tensor, data, knobs, *, tp_group=None, data_format=None) -> dict:
    """verl's pi_old pass (:mod:`.old_topk`): log pi_old at the rollout's K top-K ids, one output per rank
    (``dppo_old_topk_<k>``, each with the logits' leading shape ``[b, s]``; -inf at a missing rank, 0 off-response).
    The full-vocabulary normalisation of the trainer, as pi in the update pass under ``anchor=old``."""
    from ...ops.checks import DeferredChecks

    checks = DeferredChecks()
    with torch.no_grad():
        laid = _laid_inputs(student_logits, data, knobs, checks, data_format)
        lead = tuple(student_logits.shape[:-1])
        rows = []
        for logits, part in logit_slabs(student_logits, laid):
            real = torch.isfinite(part["topk_logp"]) & part["row_valid"].bool().unsqueeze(-1)  # [r, K]
            ids = torch.where(real, part["topk_ids"], 0)
            st = vocab_parallel_stats(logits, ids, tp_group=tp_group, checks=checks)
            rows.append(torch.where(real, st.logp, float("-inf")))
        logp = torch.cat(rows).view(lead + (knobs.num_topk,))
    checks.run()  # the pass's one device read: the batch's shapes and ids
    return {f"{OUT_OLD_TOPK_PREFIX}{k}": logp[..., k] for k in range(knobs.num_topk)}


def _all_rows(student_logits: torch.Tensor, laid: dict, knobs, tp_group, vocab: int, checks, sampled_ids) -> dict:
    """Every row ``[b, s]`` in one pass over ``[b * s, V_local]`` (a view when the logits are contiguous, as both
    engines hand them over), else one pass per ``b`` (each ``logits[b]`` a 2-D view, never a copy)."""
    lead = tuple(student_logits.shape[:-1])
    rows = []
    for logits, part in logit_slabs(student_logits, laid):
        row_valid = part["row_valid"].bool()
        sup = build_support(part["sampled"], part["mu"], part["topk_ids"], part["topk_logp"], vocab_size=vocab,
                            num_topk=knobs.num_topk, row_valid=row_valid, checks=checks)
        rows.append(_row_outputs(logits, sup, part, row_valid, knobs, tp_group, checks, sampled_ids))
    if len(rows) == 1:
        return {key: v.view(lead) for key, v in rows[0].items()}
    return {key: torch.stack([r[key] for r in rows]).view(lead) for key in rows[0]}
