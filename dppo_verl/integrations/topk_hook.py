"""Top-K divergence inside verl's actor forward, through the engines' logits-processor hook.

verl 0.9.1's engines call the loss function as a logits processor when a micro-batch carries the non-tensor
flag ``distillation_use_topk`` (added for on-policy distillation; verl_0.9.1_internals.md §4.1):

- FSDP: ``loss_fn(student_logits=[1, N_local, V], data=micro_batch)``; temperature-scaled, full vocabulary,
  packed rows (``N_local = (N + pad) / sp`` under Ulysses SP: this rank's slice of the packed sequence);
- Megatron: ``loss_fn(student_logits=..., data=batch, data_format="thd"|"bshd")``; temperature-scaled,
  vocabulary shard ``V / tp``; THD ``[1, N_pad / cp, V / tp]`` (per-sequence padding, zigzag CP split) or
  BSHD ``[B, S_pad / cp, V / tp]``.

Row semantics everywhere: logits row r predicts token r + 1, so response token j of a sequence with prompt
length P sits at row P - 1 + j. The rollout tensors are response-only (``rollout_topk_ids`` /
``rollout_topk_logprobs`` ``[B, R, K]``, ``rollout_log_probs`` ``[B, R]``, padded or nested); we scatter them
onto the packed full-sequence rows, then reuse verl's own layout helpers (Ulysses ``slice_input_tensor``,
Megatron ``preprocess_thd_engine`` / ``preprocess_bshd_engine``) so our rows line up with the logits exactly
as verl's distillation tensors do. The result is per-row scalars (``dppo_divergence``,
``dppo_support_size``, and ``dppo_ddot`` for the predictive direction, :mod:`dppo_verl.ops.predictive`) of the
logits' leading shape; the engines gather/unpack them like ``log_probs``.

Nothing here keeps a reference to the logits (both engines reuse that buffer in place afterwards) and
everything runs under no_grad: the divergence only drives the mask. The one exception is the opt-in
``policy_loss.fused_logprobs``: the same Triton pass then also yields log pi(label) *with* its gradient, which
replaces the engine's own sampled-token pass (:mod:`.fused_logprob`); only autograd keeps the logits for it.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..ops.divergence import get_divergence
from ..ops.support import build_support
from ..ops.predictive import predictive_ddot
from ..ops.vocab_parallel import vocab_parallel_logprobs, vocab_parallel_stats

__all__ = ["TOPK_KEYS", "sequence_lengths", "response_values", "packed_support_inputs", "topk_outputs"]

TOPK_KEYS = ("rollout_topk_ids", "rollout_topk_logprobs")


def sequence_lengths(data) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample prompt and response lengths ``([B], [B])``, exactly as verl's ``no_padding_2_padding``."""
    prompts, responses = data["prompts"], data["responses"]
    if prompts.is_nested:
        return prompts.offsets().diff(), responses.offsets().diff()
    attn = data["attention_mask"]
    p = prompts.shape[1]
    return attn[:, :p].sum(1), attn[:, p:].sum(1)


def response_values(name: str, x: torch.Tensor, resp_lens: torch.Tensor) -> torch.Tensor:
    """Response-only ``[B, R(_i), ...]`` (nested or right-padded) -> packed ``[sum_b R_b, ...]``."""
    if x.is_nested:
        got = x.offsets().diff()
        if not torch.equal(got.cpu(), resp_lens.cpu()):
            raise ValueError(f"{name}: per-sample lengths {got.tolist()} differ from the responses' {resp_lens.tolist()}")
        return x.values()
    if x.shape[1] < int(resp_lens.max()):
        raise ValueError(f"{name} has shape {list(x.shape)}: shorter than the longest response ({int(resp_lens.max())})")
    keep = torch.arange(x.shape[1], device=x.device)[None, :] < resp_lens.to(x.device)[:, None]  # [B, T]
    return x[keep]


def packed_support_inputs(data, num_topk: int) -> dict[str, torch.Tensor]:
    """Scatter the response-only rollout tensors onto packed full-sequence rows ``[N_total, ...]``.

    Returns ``topk_ids [N, K]`` int64, ``topk_logp [N, K]`` fp32 (-inf off-response), ``sampled [N]`` int64,
    ``mu [N]`` fp32, ``row_valid [N]`` bool (True on rows that predict a response token with
    ``response_mask`` 1) and ``offsets [B + 1]`` (packed sequence boundaries).
    """
    missing = [k for k in TOPK_KEYS + ("rollout_log_probs",) if k not in data.keys()]
    if missing:
        raise ValueError(
            f"Top-K DPPO needs batch keys {missing}: the rollout must return top-K logprobs "
            f"(+actor_rollout_ref.rollout.custom.dppo_num_topk={num_topk}, rollout.calculate_log_probs=True); "
            "a Top-K mode never falls back to binary"
        )
    p_lens, r_lens = sequence_lengths(data)
    seq_lens = p_lens + r_lens
    offsets = torch.zeros(len(seq_lens) + 1, dtype=torch.long, device=seq_lens.device)
    offsets[1:] = seq_lens.cumsum(0)
    # row of response token j of sample b: offsets[b] + P_b - 1 + j
    starts = offsets[:-1] + p_lens - 1
    rows = torch.repeat_interleave(starts, r_lens) + _arange_within(r_lens)  # [sum R]
    n = int(offsets[-1])

    ids = response_values("rollout_topk_ids", data["rollout_topk_ids"], r_lens)
    logp = response_values("rollout_topk_logprobs", data["rollout_topk_logprobs"], r_lens)
    if ids.dim() != 2 or ids.shape[-1] != num_topk or logp.shape != ids.shape:
        raise ValueError(
            f"rollout_topk_ids / rollout_topk_logprobs have per-token shapes {list(ids.shape[1:])} / "
            f"{list(logp.shape[1:])}, expected [{num_topk}] (policy_loss.num_topk); set "
            f"+actor_rollout_ref.rollout.custom.dppo_num_topk={num_topk} on the rollout side"
        )
    dev = ids.device
    out = {
        "topk_ids": torch.zeros(n, num_topk, dtype=torch.long, device=dev),
        "topk_logp": torch.full((n, num_topk), float("-inf"), dtype=torch.float32, device=dev),
        "sampled": torch.zeros(n, dtype=torch.long, device=dev),
        "mu": torch.zeros(n, dtype=torch.float32, device=dev),
        "row_valid": torch.zeros(n, dtype=torch.bool, device=dev),
    }
    rows = rows.to(dev)
    out["topk_ids"][rows] = ids.long()
    out["topk_logp"][rows] = logp.float()
    out["sampled"][rows] = response_values("responses", data["responses"], r_lens).long()
    out["mu"][rows] = response_values("rollout_log_probs", data["rollout_log_probs"], r_lens).float()
    out["row_valid"][rows] = response_values("response_mask", data["response_mask"], r_lens).bool()
    out["offsets"] = offsets
    return out


def _arange_within(lens: torch.Tensor) -> torch.Tensor:
    """``[0..l_0-1, 0..l_1-1, ...]`` for lengths ``[B]``."""
    total = int(lens.sum())
    starts = torch.repeat_interleave(lens.cumsum(0) - lens, lens)
    return torch.arange(total, device=lens.device) - starts


def _layout_like_logits(x: torch.Tensor, offsets: torch.Tensor, data_format: Optional[str]) -> torch.Tensor:
    """Packed ``[N, ...]`` -> the logits' row layout, with verl's own helpers (see module docstring)."""
    if data_format is None:  # FSDP: packed rows, Ulysses-sliced when SP > 1
        from verl.utils.ulysses import get_ulysses_sequence_parallel_world_size, slice_input_tensor

        x = x.unsqueeze(0)
        if get_ulysses_sequence_parallel_world_size() > 1:
            x = slice_input_tensor(x, dim=1)
        return x
    from .._compat import require

    util = "verl.models.mcore.util"
    preprocess_thd_engine, preprocess_bshd_engine = require(util, "preprocess_thd_engine"), require(util, "preprocess_bshd_engine")
    nested = torch.nested.nested_tensor_from_jagged(x, offsets)
    if data_format == "thd":
        return preprocess_thd_engine(nested, pre_process=True)[0]
    if data_format == "bshd":
        return preprocess_bshd_engine(nested, pre_process=True)[0]
    raise ValueError(f"unknown data_format {data_format!r} from the Megatron engine")


def _divergence_outputs(pi_logp, rest_sq, sup, row_valid: torch.Tensor, knobs) -> dict:
    """log pi at the support ``[s, K + 1]`` (and ``rest_sq [s]``) -> per-row ``dppo_*`` scalars ``[s]`` (0 off-response)."""
    fn = get_divergence(knobs.divergence).fn
    out = {"dppo_support_size": torch.where(row_valid, sup.size, 0.0)}
    if knobs.direction == "predictive":
        ddot = predictive_ddot(fn, pi_logp, sup.mu_logp, sup.valid, sup.is_sampled, rest_sq)
        out["dppo_ddot"] = torch.where(row_valid, ddot, 0.0)
    out["dppo_divergence"] = torch.where(row_valid, fn(pi_logp, sup.mu_logp, sup.valid), 0.0)
    return out


def _row_outputs(logits: torch.Tensor, sup, row_valid: torch.Tensor, knobs, tp_group) -> dict:
    """One ``[s, V_local]`` slab of rows -> per-row ``dppo_*`` scalars ``[s]`` (0 on rows that are not response)."""
    if knobs.direction == "predictive":
        # Q_R = sum_{j not in S} pi_j^2 rides in the vocab-parallel SUM (one more float per row).
        st = vocab_parallel_stats(logits, sup.ids, tp_group=tp_group, sq_exclude=sup.valid)
        return _divergence_outputs(st.logp, st.rest_sq, sup, row_valid, knobs)
    return _divergence_outputs(vocab_parallel_logprobs(logits, sup.ids, tp_group=tp_group), None, sup, row_valid, knobs)


def _fused_outputs(student_logits: torch.Tensor, laid: dict, knobs, tp_group, vocab: int, grad: bool) -> dict:
    """``policy_loss.fused_logprobs``: every row at once through one Triton pass that also yields verl's
    log pi(label) with its gradient (handed to the engine's log-prob call, :mod:`.fused_logprob`)."""
    from . import fused_logprob as handoff
    from ..ops.fused_logprob import fused_logprobs

    handoff.require_triton(student_logits)
    labels = handoff.current_labels(student_logits)
    lead = tuple(student_logits.shape[:-1])
    flat = {k: v.reshape((-1,) + tuple(v.shape[len(lead):])) for k, v in laid.items()}
    row_valid = flat["row_valid"].bool()
    sup = build_support(flat["sampled"], flat["mu"], flat["topk_ids"], flat["topk_logp"], vocab_size=vocab,
                        num_topk=knobs.num_topk, row_valid=row_valid)
    exclude = sup.valid if knobs.direction == "predictive" else None
    with torch.set_grad_enabled(grad):  # only log pi(label) carries a gradient; the rest drives the mask
        rows = handoff.flat_rows(student_logits)  # [R, V_local], a view (made with grad on: its backward is free)
        fused = fused_logprobs(rows, labels.reshape(-1), sup.ids, tp_group=tp_group, sq_exclude=exclude)
        handoff.offer(student_logits, labels, fused.label_logp.view(labels.shape))
    out = _divergence_outputs(fused.support_logp, fused.rest_sq, sup, row_valid, knobs)
    return {key: v.view(lead) for key, v in out.items()}


def topk_outputs(student_logits: torch.Tensor, data, knobs, *, tp_group=None, data_format=None) -> dict:
    """Per-row ``dppo_divergence``, ``dppo_support_size`` (and ``dppo_ddot`` for ``direction=predictive``), each
    with the logits' leading shape ``[b, s]``. Under no_grad, except the fused log pi(label) (``fused_logprobs``)."""
    grad = torch.is_grad_enabled()
    with torch.no_grad():
        packed = packed_support_inputs(data, knobs.num_topk)
        offsets = packed.pop("offsets")
        packed["row_valid"] = packed["row_valid"].to(torch.uint8)  # padding helpers pad with 0; bool cannot be padded
        laid = {k: _layout_like_logits(v, offsets, data_format) for k, v in packed.items()}
        lead = tuple(student_logits.shape[:-1])
        for k, v in laid.items():
            if tuple(v.shape[: len(lead)]) != lead:
                raise ValueError(
                    f"Top-K rows do not line up with the logits: {k} laid out as {list(v.shape)}, logits "
                    f"{list(student_logits.shape)} (data_format={data_format}); pad_to_length / fp8 padding / "
                    "contiguous CP layouts are not supported with Top-K DPPO"
                )
        tp = 1 if tp_group is None else torch.distributed.get_world_size(tp_group)
        vocab = student_logits.shape[-1] * tp
        if getattr(knobs, "fused_logprobs", False):
            return _fused_outputs(student_logits, laid, knobs, tp_group, vocab, grad)
        rows = []
        for b in range(lead[0]):  # b = 1 except Megatron BSHD; logits[b] is a 2-D view, never a copy
            row_valid = laid["row_valid"][b].bool()
            sup = build_support(laid["sampled"][b], laid["mu"][b], laid["topk_ids"][b], laid["topk_logp"][b],
                                vocab_size=vocab, num_topk=knobs.num_topk, row_valid=row_valid)
            rows.append(_row_outputs(student_logits[b], sup, row_valid, knobs, tp_group))
        return {key: torch.stack([r[key] for r in rows]) for key in rows[0]}
