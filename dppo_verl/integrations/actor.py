"""Actor side: the ``ppo_loss`` wrapper that hands mu (and the Top-K per-token scalars) to the DPPO losses.

verl 0.9.1 builds ``self.loss_fn = partial(ppo_loss, config=actor_config)`` in
``verl.workers.engine_workers`` from the module attribute ``verl.workers.utils.losses.ppo_loss``; wrapping
that attribute (and rebinding the name in ``engine_workers`` if it was imported first) reaches FSDP and
Megatron alike, since both engines call the same loss function.

The wrapper, for ``dppo_*`` modes only (every other mode is delegated untouched):
- reads ``rollout_log_probs`` (and the Top-K hook's ``dppo_*`` model outputs) into a :class:`HandOff`,
  in the same padded ``[B, T]`` layout ``ppo_loss`` gives ``old_log_probs`` / ``log_prob``;
- runs verl's own ``ppo_loss`` inside :func:`handoff_scope` (entropy bonus, KL loss, metric logic stay verl's);
- re-types the ``*_max`` metrics as ``Metric(MAX)`` so verl reports true maxima across micro-batches and ranks.
"""

from __future__ import annotations

import functools
import sys

from ..config import parse_loss_mode
from ..handoff import HandOff, handoff_scope
from ..losses import MAX_METRICS
from . import mark_applied

__all__ = ["apply_ppo_loss_wrapper"]

_MODEL_OUTPUT_TO_FIELD = {"dppo_divergence": "divergence", "dppo_support_size": "support_size", "dppo_ddot": "ddot"}


def _padded_field(data, key):
    """``data[key]`` as a padded ``[B, T]`` tensor (nested under the V1 trainer), or None when absent."""
    if key not in data.keys():
        return None
    value = data[key]
    if getattr(value, "is_nested", False):
        value = value.to_padded_tensor(0.0)
    return value


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


def _wrap(orig):
    @functools.wraps(orig)
    def ppo_loss(config, model_output=None, data=None, dp_group=None, **kwargs):
        if parse_loss_mode(config.policy_loss.get("loss_mode", "vanilla")) is None:
            return orig(config, model_output, data, dp_group, **kwargs)
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
