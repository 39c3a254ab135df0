"""Actor side, verl surface ``verl.workers.engine_workers.TrainingWorker.infer_batch``: what a DPPO mode needs from
verl's pi_old pass, added to that pass's outputs.

verl 0.9.1's V1 trainer recomputes pi_old with ``compute_log_prob`` (``infer_batch`` with ``compute_loss=False``:
no loss function, no logits hook) unless ``algorithm.rollout_correction.bypass_mode=True`` skips it. On that call
only, for a DPPO mode, this wrapper adds two response-only fields, which verl's TransferQueue stores with the pass's
other outputs and ships to ``update_actor`` with every other field of the batch:

- ``old_topk_logprobs`` ``[B, R_b, K]`` (Top-K modes, ``anchor=old``): log pi_old at the rollout's top-K ids, the
  anchor of the decoupled trust region. The engine is handed a processor-only function for the pass (verl's
  logits-hook flag raised); it evaluates the vocab-parallel op at the K ids (:func:`~.topk_hook.old_topk_outputs`,
  FSDP and Megatron alike) and returns one output per rank (verl's engines accept 1-D per-row outputs only), which
  are regrouped here. Called as a loss, the function returns 0 and no metrics, as verl's forward-only pass expects.
- ``dppo_start_divergence`` ``[B, R_b]`` (every DPPO mode): each token's divergence from the mode's anchor at the
  step's start, for ``actor/dppo/masked_at_start_frac``. ``anchor=old``: 0 (pi_old is the anchor). Rollout anchor,
  Top-K: the update hook's own divergence evaluated on pi_old's logits (same support, same normalisation over the
  samplable ids). Rollout anchor, binary: the binary divergence between verl's ``log_probs`` of this pass and mu,
  renormalised over the samplable ids like the update (the excluded-mass hook runs in the pass when rows are
  masked, :mod:`dppo_verl.ops.sampled_vocab`).

Not the reference pass (its worker has no DPPO loss; with LoRA, ``no_lora_adapter`` marks it), not the update.
"""

from __future__ import annotations

import functools

import torch

from ...contract import (
    OLD_TOPK_LOGPROBS, OUT_DIVERGENCE, OUT_EXCLUDED, OUT_OLD_TOPK_PREFIX, ROLLOUT_LOG_PROBS, START_DIVERGENCE,
)
from ...ops.sampled_vocab import log_kept_mass
from ...knobs import parse_loss_mode, resolve_knobs
from ..patching import patch_on_import, raise_if_drifted

__all__ = ["apply_old_pass_outputs", "PATCH", "old_pass_of"]

PATCH = "actor.old_pass_outputs"
MODULE = "verl.workers.engine_workers"
SIGNATURE = "self, data"


def old_pass_of(loss_function, data) -> "tuple[str, object, object] | None":
    """``(loss mode, parsed mode, knobs)`` when this ``infer_batch`` call is a DPPO mode's pi_old pass, else None."""
    from verl.utils import tensordict_utils as tu

    from .engine_flag import loss_mode_of

    mode = loss_mode_of(loss_function)
    parsed = parse_loss_mode(mode)
    if parsed is None:
        return None
    if tu.get_non_tensor_data(data=data, key="compute_loss", default=True):
        return None  # an evaluation that computes the loss: not verl's pi_old pass
    if tu.get_non_tensor_data(data=data, key="no_lora_adapter", default=False):
        return None  # the reference policy through the actor (LoRA): not pi_old
    return mode, parsed, resolve_knobs(mode, loss_function.keywords["config"].policy_loss)


def _processor(model_output=None, data=None, dp_group=None, student_logits=None, data_format=None, *, knobs, topk):
    """The pass's logits processor; as a loss (verl calls it once the outputs are made) it adds nothing."""
    if student_logits is None:
        return torch.zeros(()), {}
    from .loss_wrapper import _megatron_tp_group
    from .sampled_ids import current_sampled_ids, excluded_outputs
    from .topk_hook import old_topk_outputs, topk_outputs

    tp_group = None if data_format is None else _megatron_tp_group()
    if not topk:  # binary, rollout anchor, masked head rows: pi_old's mass on them
        return excluded_outputs(student_logits, current_sampled_ids(), tp_group=tp_group)
    if knobs.anchor == "old":
        return old_topk_outputs(student_logits, data, knobs, tp_group=tp_group, data_format=data_format)
    out = topk_outputs(student_logits, data, knobs, tp_group=tp_group, data_format=data_format,
                       sampled_ids=current_sampled_ids())
    return {OUT_DIVERGENCE: out[OUT_DIVERGENCE]}


def _nested_responses(values: torch.Tensor, pad) -> torch.Tensor:
    from .layout import offsets_of

    return torch.nested.nested_tensor_from_jagged(values.float(), offsets_of(pad.r_lens.to(values.device)))


def _add_fields(out, data, parsed, knobs) -> None:
    """The pass's outputs -> ``old_topk_logprobs`` / ``dppo_start_divergence`` (module docstring), response-only."""
    from ...ops.divergence import get_divergence
    from .layout import output_rows, response_padding, response_values

    pad = response_padding(data, padded=False)  # the fields stay nested: no padded width
    if knobs.anchor == "old":
        if parsed.is_topk:
            ranks = [output_rows(pad, out.pop(f"{OUT_OLD_TOPK_PREFIX}{k}")) for k in range(knobs.num_topk)]
            out[OLD_TOPK_LOGPROBS] = _nested_responses(torch.stack(ranks, -1), pad)  # [R, K]
        start = torch.zeros(int(pad.full_rows.numel()), device=pad.full_rows.device)
    elif parsed.is_topk:
        start = output_rows(pad, out.pop(OUT_DIVERGENCE))
    elif ROLLOUT_LOG_PROBS in data.keys():
        old = output_rows(pad, out["log_probs"]).float()  # [R] verl's log pi_old(a_t), full head
        if OUT_EXCLUDED in out.keys():  # over the samplable ids, like mu: log pi_A = log pi - log(1 - m)
            log_m = output_rows(pad, out.pop(OUT_EXCLUDED)).float() + old
            old = old - log_kept_mass(log_m)
        mu = response_values(ROLLOUT_LOG_PROBS, data[ROLLOUT_LOG_PROBS], pad.r_lens).float().to(old.device)
        start = get_divergence(knobs.divergence).fn(old.unsqueeze(-1), mu.unsqueeze(-1))
    else:
        return  # no mu in the batch: the update refuses the mode with its own message
    out[START_DIVERGENCE] = _nested_responses(start, pad)


def _wrap_infer_batch(orig):
    @functools.wraps(orig)
    def infer_batch(self, data):
        found = old_pass_of(getattr(self, "loss_fn", None), data)
        if found is None:
            return orig(self, data)
        mode, parsed, knobs = found
        from .engine_flag import _sampled_ids

        if parsed.is_topk or (knobs.anchor == "rollout" and _sampled_ids(self.engine, knobs) is not None):
            out = _with_processor(orig, self, data, mode, knobs, parsed.is_topk)
        else:
            out = orig(self, data)
        if out is not None:  # the ranks holding outputs (verl: is_mp_src_rank_with_outputs)
            _add_fields(out, data, parsed, knobs)
        return out

    return infer_batch


def _with_processor(orig, worker, data, mode: str, knobs, topk: bool):
    """Run verl's pass with the logits hook raised and :func:`_processor` as its only function."""
    from verl.utils import tensordict_utils as tu

    from .engine_flag import _refuse_engine_modes, _sampled_ids
    from .sampled_ids import sampled_ids_scope

    raise_if_drifted(("dppo", "topk"), mode)
    _refuse_engine_modes(worker.engine, data, mode, topk, "pi_old's divergence at the step's start")
    tu.assign_non_tensor(data, distillation_use_topk=True, distillation_only=False, compute_loss=True)
    saved = worker.loss_fn
    worker.loss_fn = functools.partial(_processor, knobs=knobs, topk=topk)
    try:
        with sampled_ids_scope(_sampled_ids(worker.engine, knobs)):
            return orig(worker, data)
    finally:
        worker.loss_fn = saved
        tu.assign_non_tensor(data, distillation_use_topk=False, compute_loss=False)


def apply_old_pass_outputs() -> None:
    """Wrap ``TrainingWorker.infer_batch`` when ``verl.workers.engine_workers`` is first imported."""
    patch_on_import(MODULE, "TrainingWorker.infer_batch", _wrap_infer_batch, name=PATCH, signature=SIGNATURE,
                    needed_by="dppo")
