"""Actor side: the ``ppo_loss`` wrapper that hands mu (and the Top-K per-token scalars) to the DPPO losses.

verl 0.9.1 builds ``self.loss_fn = partial(ppo_loss, config=actor_config)`` in
``verl.workers.engine_workers`` from the module attribute ``verl.workers.utils.losses.ppo_loss``; wrapping
that attribute (and rebinding the name in ``engine_workers`` if it was imported first) reaches FSDP and
Megatron alike, since both engines call the same loss function.

The wrapper, for ``dppo_*`` modes only (every other mode is delegated untouched):
- called as a logits processor (``student_logits=...``, Top-K modes; see :mod:`.topk_hook`), returns the
  per-row ``dppo_divergence`` / ``dppo_support_size``;
- reads ``rollout_log_probs`` (and the Top-K hook's ``dppo_*`` model outputs) into a :class:`HandOff`,
  in the same padded ``[B, T]`` layout ``ppo_loss`` gives ``old_log_probs`` / ``log_prob``;
- runs verl's own ``ppo_loss`` inside :func:`handoff_scope` (entropy bonus, KL loss, metric logic stay verl's);
- re-types the ``*_max`` metrics as ``Metric(MAX)`` so verl reports true maxima across micro-batches and ranks.
"""

from __future__ import annotations

import functools
import sys

import torch

from ..config import parse_loss_mode, resolve_knobs
from ..handoff import HandOff, handoff_scope
from ..losses import MAX_METRICS
from . import mark_applied
from ._lazy import when_imported
from .topk_hook import TOPK_KEYS, response_values, sequence_lengths, topk_outputs

__all__ = ["apply_ppo_loss_wrapper", "apply_train_batch_topk_flag", "loss_mode_of"]

_MODEL_OUTPUT_TO_FIELD = {"dppo_divergence": "divergence", "dppo_support_size": "support_size", "dppo_ddot": "ddot"}


def _padded_field(data, key):
    """``data[key]`` (response-only, nested or padded) as ``[B, T]`` padded exactly like verl pads ``log_prob``
    in ``no_padding_2_padding`` (T = ``max_response_len`` or the longest response), or None when absent."""
    if key not in data.keys():
        return None
    from verl.utils import tensordict_utils as tu

    _, r_lens = sequence_lengths(data)
    width = tu.get_non_tensor_data(data=data, key="max_response_len", default=-1)
    width = int(r_lens.max()) if width is None or width < 0 else int(width)
    if not data["prompts"].is_nested:
        width = data["responses"].shape[1]  # dense legacy layout: verl keeps the padded width
    values = response_values(key, data[key], r_lens)  # [sum R, ...]
    out = values.new_zeros((len(r_lens), width) + tuple(values.shape[1:]))
    keep = torch.arange(width, device=values.device)[None, :] < r_lens.to(values.device)[:, None]
    out[keep] = values
    return out


def _handoff_from(model_output, data) -> HandOff:
    from verl.workers.utils.padding import no_padding_2_padding

    handoff = HandOff(rollout_log_probs=_padded_field(data, "rollout_log_probs"))
    for key, attr in _MODEL_OUTPUT_TO_FIELD.items():
        if model_output is not None and key in model_output:
            setattr(handoff, attr, no_padding_2_padding(model_output[key], data))
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
        if parse_loss_mode(mode) is None:
            if student_logits is not None:  # only our flag makes an engine call ppo_loss as a processor
                raise ValueError(f"ppo_loss called as a logits processor for non-DPPO loss_mode={mode!r}")
            return orig(config, model_output, data, dp_group, **kwargs)
        if student_logits is not None:  # the engine's logits-processor call (Top-K modes)
            knobs = resolve_knobs(mode, config.policy_loss)
            tp_group = None if data_format is None else _megatron_tp_group()
            return topk_outputs(student_logits, data, knobs, tp_group=tp_group, data_format=data_format)
        with handoff_scope(_handoff_from(model_output, data)):
            loss, metrics = orig(config, model_output, data, dp_group, **kwargs)
        _retype_max_metrics(metrics)
        return loss, metrics

    ppo_loss.dppo_wrapped = orig
    return ppo_loss


def apply_ppo_loss_wrapper() -> None:
    """Wrap ``verl.workers.utils.losses.ppo_loss`` (idempotent; recorded in ``APPLIED``)."""
    import verl.workers.utils.losses as losses_mod

    if not mark_applied("ppo_loss_wrapper") or hasattr(losses_mod.ppo_loss, "dppo_wrapped"):
        return
    losses_mod.ppo_loss = _wrap(losses_mod.ppo_loss)
    engine_workers = sys.modules.get("verl.workers.engine_workers")
    if engine_workers is not None and hasattr(engine_workers, "ppo_loss"):
        engine_workers.ppo_loss = losses_mod.ppo_loss


def loss_mode_of(loss_function) -> str | None:
    """The ``policy_loss.loss_mode`` bound into verl's ``partial(ppo_loss, config=...)``, or None."""
    config = getattr(loss_function, "keywords", {}).get("config")
    policy_loss = getattr(config, "policy_loss", None)
    return None if policy_loss is None else policy_loss.get("loss_mode", None)


def _refuse_engine_modes(engine, data) -> None:
    """First-use twins of the launch-time rules (:mod:`.rules`) that the engine itself can see."""
    from verl.utils import tensordict_utils as tu

    if tu.get_non_tensor_data(data=data, key="distillation_use_topk", default=False):
        raise ValueError("Top-K DPPO cannot run together with top-K distillation: set distillation.enabled=False")
    if tu.get_non_tensor_data(data=data, key="use_fused_kernels", default=False):
        raise ValueError("Top-K DPPO needs the logits: set actor_rollout_ref.model.use_fused_kernels=False")
    if getattr(engine, "pad_to_length", False):
        raise ValueError("Top-K DPPO cannot run with pad_to_length: set actor_rollout_ref.actor.fsdp_config.pad_to_length=False")


def _wrap_train_batch(orig):
    @functools.wraps(orig)
    def train_batch(self, data, loss_function):
        parsed = parse_loss_mode(loss_mode_of(loss_function))
        if parsed is not None and parsed[1] == "topk":
            from verl.utils import tensordict_utils as tu

            _refuse_engine_modes(self, data)
            missing = [k for k in TOPK_KEYS if k not in data.keys()]
            if missing:
                raise ValueError(
                    f"{loss_mode_of(loss_function)}: the actor batch lacks {missing}; the rollout must return top-K "
                    "logprobs (+actor_rollout_ref.rollout.custom.dppo_num_topk=K). No silent binary run."
                )
            # Makes both engines call the loss function as a logits processor (verl's OPD hook).
            tu.assign_non_tensor(data, distillation_use_topk=True, distillation_only=False)
        return orig(self, data, loss_function)

    train_batch.dppo_wrapped = orig
    return train_batch


def _patch_base_engine(module) -> None:
    from .._compat import require

    require(require(module, "BaseEngine"), "train_batch")
    if not hasattr(module.BaseEngine.train_batch, "dppo_wrapped"):
        module.BaseEngine.train_batch = _wrap_train_batch(module.BaseEngine.train_batch)


def apply_train_batch_topk_flag() -> None:
    """Wrap ``BaseEngine.train_batch`` (the one implementation for every engine) to raise the hook flag.

    Applied when ``verl.workers.engine.base`` is first imported (importing it here would load every engine
    backend, megatron-core included, in every process that imports verl).
    """
    if mark_applied("train_batch_topk_flag"):
        when_imported("verl.workers.engine.base", _patch_base_engine)
