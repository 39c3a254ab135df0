"""Actor side, verl surface ``verl.workers.utils.losses.ppo_loss``: hand mu (and the Top-K per-token scalars) to
the DPPO losses.

verl 0.9.1 builds ``self.loss_fn = partial(ppo_loss, config=actor_config)`` in ``verl.workers.engine_workers``
from the module attribute ``verl.workers.utils.losses.ppo_loss``; wrapping that attribute (and rebinding the name
in ``engine_workers`` if it was imported first) reaches FSDP and Megatron alike, since both engines call the same
loss function.

The wrapper, for DPPO modes only (every other mode is delegated untouched, arguments and all):
- called as a logits processor (``student_logits=...``, Top-K modes; see :mod:`.topk_hook`), returns the
  per-row ``dppo_divergence`` / ``dppo_support_size`` / ``dppo_topk_valid``;
- reads ``rollout_log_probs`` (and the Top-K hook's ``dppo_*`` model outputs) into a :class:`HandOff`,
  in the same padded ``[B, T]`` layout ``ppo_loss`` gives ``old_log_probs`` / ``log_prob``;
- runs verl's own ``ppo_loss`` inside :func:`handoff_scope` (entropy bonus, KL loss, metric logic stay verl's);
- re-types the ``*_max`` metrics as ``Metric(MAX)`` so verl reports true maxima across micro-batches and ranks.
"""

from __future__ import annotations

import functools
import sys

import torch

from ...knobs import parse_loss_mode, resolve_knobs
from ...contract import (
    OUT_DDOT, OUT_DIVERGENCE, OUT_EXCLUDED, OUT_SUPPORT_SIZE, OUT_TOPK_VALID, ROLLOUT_LOG_PROBS, START_DIVERGENCE,
    TOPK_KEYS,
)
from ...handoff import HandOff, defer_hook_checks, handoff_scope, take_hook_checks
from ...ops.checks import DeferredChecks
from ...losses import MAX_METRICS
from ..patching import patch_attr
from .layout import pad_model_outputs, pad_responses, response_padding, response_values

__all__ = ["apply_ppo_loss_wrapper", "PATCH", "SIGNATURE"]

PATCH = "actor.ppo_loss"
SIGNATURE = "config, model_output, data, dp_group="
_MODEL_OUTPUT_TO_FIELD = {OUT_DIVERGENCE: "divergence", OUT_SUPPORT_SIZE: "support_size", OUT_DDOT: "ddot",
                          OUT_TOPK_VALID: "topk_valid", OUT_EXCLUDED: "excluded_log_ratio"}


def _padded_field(data, key, checks=None, pad=None):
    """``data[key]`` (response-only, nested or padded) as ``[B, T]`` padded exactly like verl pads ``log_prob``
    in ``no_padding_2_padding`` (:class:`~.layout.ResponsePadding`), or None when absent. No device read in verl's
    engine path (nested fields, ``max_response_len`` set): the length check is queued on ``checks`` and the values
    are scattered by index, not by a boolean mask."""
    if key not in data.keys():
        return None
    pad = response_padding(data) if pad is None else pad
    return pad_responses(pad, response_values(key, data[key], pad.r_lens, checks))  # [sum R, ...] -> [B, T, ...]


def _describe_token(data, b: int, t: int) -> str:
    """Response token ``t`` of sample ``b`` of this micro-batch (the padded ``[B, T]`` indices the loss sees), in words:
    its id, ``rollout_log_probs`` and top-K row. Error path only: it pads the batch's fields again."""
    parts = [f"sample {b} of this micro-batch, response token {t}"]
    labels = {"responses": "token id", ROLLOUT_LOG_PROBS: ROLLOUT_LOG_PROBS, **{k: k for k in TOPK_KEYS}}
    for key, label in labels.items():
        field = _padded_field(data, key)
        if field is not None and b < field.shape[0] and t < field.shape[1]:
            parts.append(f"{label} {field[b, t].tolist()}")
    return ", ".join(parts)


def _handoff_from(model_output, data) -> HandOff:
    checks = take_hook_checks() or DeferredChecks()  # the hook's (Top-K), then the hand-off's own
    pad = response_padding(data)  # one index for every field below
    handoff = HandOff(rollout_log_probs=_padded_field(data, ROLLOUT_LOG_PROBS, checks, pad),
                      start_divergence=_padded_field(data, START_DIVERGENCE, checks, pad),
                      describe_token=functools.partial(_describe_token, data), checks=checks)
    ours = {key: model_output[key] for key in _MODEL_OUTPUT_TO_FIELD if model_output is not None and key in model_output}
    for key, value in pad_model_outputs(pad, ours).items():
        setattr(handoff, _MODEL_OUTPUT_TO_FIELD[key], value)
    return handoff


def _retype_max_metrics(metrics: dict) -> None:
    from verl.utils.metric import AggregationType, Metric

    for key in MAX_METRICS:
        m = metrics.get(key)
        if isinstance(m, Metric) and m.aggregation != AggregationType.MAX:
            retyped = Metric(AggregationType.MAX)
            retyped.values = list(m.values)
            metrics[key] = retyped


def _megatron_tp_group():
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_group()


def _wrap(orig):
    @functools.wraps(orig)
    def ppo_loss(config, model_output=None, data=None, dp_group=None, student_logits=None, data_format=None, **kwargs):
        mode = config.policy_loss.get("loss_mode", "vanilla")
        parsed = parse_loss_mode(mode)
        if parsed is None:
            if student_logits is not None:  # only our flag makes an engine call ppo_loss as a processor
                raise ValueError(f"ppo_loss called as a logits processor for non-DPPO loss_mode={mode!r}")
            return orig(config, model_output, data, dp_group, **kwargs)
        if student_logits is not None:  # the engine's logits-processor call (Top-K modes, masked rollout ids)
            from .sampled_ids import current_sampled_ids, excluded_outputs
            from .topk_hook import topk_outputs

            knobs = resolve_knobs(mode, config.policy_loss)
            tp_group = None if data_format is None else _megatron_tp_group()
            if not parsed.is_topk:
                return excluded_outputs(student_logits, current_sampled_ids(), tp_group=tp_group)
            checks = DeferredChecks()  # read by this micro-batch's loss with its metrics (one device read)
            out = topk_outputs(student_logits, data, knobs, tp_group=tp_group, data_format=data_format, checks=checks,
                               sampled_ids=current_sampled_ids())
            defer_hook_checks(checks)
            return out
        with handoff_scope(_handoff_from(model_output, data)):
            loss, metrics = orig(config, model_output, data, dp_group, **kwargs)
        _retype_max_metrics(metrics)
        return loss, metrics

    return ppo_loss


def apply_ppo_loss_wrapper() -> bool:
    """Wrap ``verl.workers.utils.losses.ppo_loss`` (idempotent; recorded; a drifted signature disables DPPO only)."""
    import verl.workers.utils.losses as losses_mod

    ok = patch_attr(losses_mod, "ppo_loss", _wrap, name=PATCH, signature=SIGNATURE)
    engine_workers = sys.modules.get("verl.workers.engine_workers")
    if ok and engine_workers is not None and getattr(engine_workers, "ppo_loss", None) is losses_mod.ppo_loss.dppo_wrapped:
        # imported by name before we ran: the same wrapper there
        patch_attr(engine_workers, "ppo_loss", lambda _orig: losses_mod.ppo_loss, name=PATCH + ".engine_workers",
                   signature=SIGNATURE)
    return ok
