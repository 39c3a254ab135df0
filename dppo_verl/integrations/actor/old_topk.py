"""Actor side, verl surface ``verl.workers.engine_workers.TrainingWorker.infer_batch``: verl's pi_old pass also
evaluates pi_old at the rollout's top-K ids, for the Top-K modes with ``policy_loss.anchor=old``.

verl 0.9.1's V1 trainer recomputes pi_old with ``compute_log_prob`` (``infer_batch`` with ``compute_loss=False``,
so no loss function and no logits hook). For an old-anchored Top-K mode this wrapper, on that call only:

- raises verl's logits-hook flag and hands the engine a processor-only function for the pass (the engine then
  calls it with the logits: :func:`~.topk_hook.old_topk_outputs`, the vocab-parallel op at the K ids, FSDP and
  Megatron alike; called as a loss, it returns 0 and no metrics, as verl's forward-only pass expects);
- turns the K per-row outputs (verl's engines accept 1-D outputs per row only) into one response-only field
  ``old_topk_logprobs`` ``[B, R_b, K]`` (nested, like ``rollout_topk_logprobs``), which verl's TransferQueue
  stores with the pass's other outputs and ships to ``update_actor`` with every other field of the batch.

Not the reference pass (its worker has no DPPO loss; with LoRA, ``no_lora_adapter`` marks it), not the update.
"""

from __future__ import annotations

import functools

import torch

from ...contract import OLD_TOPK_LOGPROBS, OUT_OLD_TOPK_PREFIX
from ...knobs import parse_loss_mode, resolve_knobs
from ..patching import patch_on_import, raise_if_drifted

__all__ = ["apply_old_topk_pass", "PATCH", "wants_old_topk"]

PATCH = "actor.old_topk_pass"
MODULE = "verl.workers.engine_workers"
SIGNATURE = "self, data"


def wants_old_topk(loss_function, data) -> "tuple[str, object] | None":
    """``(loss mode, knobs)`` when this ``infer_batch`` call is an old-anchored Top-K mode's pi_old pass, else None."""
    from verl.utils import tensordict_utils as tu

    from .engine_flag import loss_mode_of

    mode = loss_mode_of(loss_function)
    parsed = parse_loss_mode(mode)
    if parsed is None or not parsed.is_topk:
        return None
    if tu.get_non_tensor_data(data=data, key="compute_loss", default=True):
        return None  # an evaluation that computes the loss: not verl's pi_old pass
    if tu.get_non_tensor_data(data=data, key="no_lora_adapter", default=False):
        return None  # the reference policy through the actor (LoRA): not pi_old
    knobs = resolve_knobs(mode, loss_function.keywords["config"].policy_loss)
    return (mode, knobs) if knobs.anchor == "old" else None


def _processor(model_output=None, data=None, dp_group=None, student_logits=None, data_format=None, *, knobs):
    """The pass's logits processor; as a loss (verl calls it once the outputs are made) it contributes nothing."""
    if student_logits is not None:
        from .loss_wrapper import _megatron_tp_group
        from .topk_hook import old_topk_outputs

        tp_group = None if data_format is None else _megatron_tp_group()
        return old_topk_outputs(student_logits, data, knobs, tp_group=tp_group, data_format=data_format)
    return torch.zeros(()), {}


def _response_field(out, data, k: int) -> torch.Tensor:
    """The K per-row outputs (nested over the full sequences ``[B, S_b]``) -> nested ``[B, R_b, K]`` response-only."""
    from .layout import jagged_parts, response_padding

    pad = response_padding(data)
    ranks = []
    for j in range(k):
        x = out.pop(f"{OUT_OLD_TOPK_PREFIX}{j}")
        parts = jagged_parts(x)
        ranks.append(x if parts is None else parts[0])
    full = torch.stack(ranks, -1)  # [N, K]
    values = full[pad.full_rows.to(full.device)]  # [R, K], response rows in sample order
    offsets = torch.zeros(len(pad.r_lens) + 1, dtype=torch.long, device=values.device)
    offsets[1:] = pad.r_lens.to(values.device).cumsum(0)
    return torch.nested.nested_tensor_from_jagged(values.float(), offsets)


def _wrap_infer_batch(orig):
    @functools.wraps(orig)
    def infer_batch(self, data):
        wanted = wants_old_topk(getattr(self, "loss_fn", None), data)
        if wanted is None:
            return orig(self, data)
        mode, knobs = wanted
        from verl.utils import tensordict_utils as tu

        from .engine_flag import _refuse_engine_modes

        raise_if_drifted(("dppo", "topk"), mode)
        _refuse_engine_modes(self.engine, data, mode, True, "pi_old at the rollout's top-K ids")
        tu.assign_non_tensor(data, distillation_use_topk=True, distillation_only=False, compute_loss=True)
        saved = self.loss_fn
        self.loss_fn = functools.partial(_processor, knobs=knobs)
        try:
            out = orig(self, data)
        finally:
            self.loss_fn = saved
            tu.assign_non_tensor(data, distillation_use_topk=False, compute_loss=False)
        if out is not None:  # the ranks holding outputs (verl: is_mp_src_rank_with_outputs)
            out[OLD_TOPK_LOGPROBS] = _response_field(out, data, knobs.num_topk)
        return out

    return infer_batch


def apply_old_topk_pass() -> None:
    """Wrap ``TrainingWorker.infer_batch`` when ``verl.workers.engine_workers`` is first imported."""
    patch_on_import(MODULE, "TrainingWorker.infer_batch", _wrap_infer_batch, name=PATCH, signature=SIGNATURE,
                    needed_by="topk")
