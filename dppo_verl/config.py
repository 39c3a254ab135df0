"""verl's config class for the DPPO knobs: ``policy_loss._target_=dppo_verl.config.DPPOPolicyLossConfig``.

The knobs themselves are declared once, verl-free, in :mod:`dppo_verl.knobs` (``DPPOKnobFields``); this class adds
them to verl's ``PolicyLossConfig`` and checks them when verl builds the config. Select it with::

    actor_rollout_ref.actor.policy_loss._target_=dppo_verl.config.DPPOPolicyLossConfig
    +actor_rollout_ref.actor.policy_loss.delta_high=0.2

verl's ``clip_ratio*`` and ``clip_ratio_c`` are never read by the DPPO modes: delta is a divergence bound, not
a ratio, and verl's ``clip_ratio_c`` default (3.0) would silently truncate far below the paper's cap.
"""

from __future__ import annotations

from dataclasses import dataclass

from verl.workers.config import PolicyLossConfig

from .knobs import (  # noqa: F401  (re-exported: the names users and tests know from here)
    ANCHORS, DEFAULTS, DIRECTIONS, ESTIMATORS, SEQ_AGGS, DPPOKnobFields, DPPOKnobs, LossMode, check_knob_values,
    parse_loss_mode, resolve_knobs,
)

__all__ = ["DPPOPolicyLossConfig", "DPPOKnobs", "DEFAULTS", "LossMode", "parse_loss_mode", "resolve_knobs"]


@dataclass
class DPPOPolicyLossConfig(PolicyLossConfig, DPPOKnobFields):
    """verl ``PolicyLossConfig`` plus :class:`dppo_verl.knobs.DPPOKnobFields` (see there for every knob)."""

    def __post_init__(self):
        sup = getattr(super(), "__post_init__", None)
        if sup is not None:
            sup()
        check_knob_values({k: getattr(self, k) for k in DEFAULTS}, self.loss_mode)
