"""DPPO knobs (SPEC, "Config and data contract") as a subclass of verl's ``PolicyLossConfig``.

Select it in a verl config with::

    actor_rollout_ref.actor.policy_loss._target_=dppo_verl.config.DPPOPolicyLossConfig
    +actor_rollout_ref.actor.policy_loss.delta_high=0.2

With verl's plain ``PolicyLossConfig`` every knob takes its default (:func:`resolve_knobs`).
verl's ``clip_ratio*`` and ``clip_ratio_c`` are never read by the DPPO modes: delta is a divergence bound, not
a ratio, and verl's ``clip_ratio_c`` default (3.0) would silently truncate far below the paper's cap.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

from verl.workers.config import PolicyLossConfig

__all__ = ["ANCHORS", "DIRECTIONS", "DPPOKnobs", "DPPOPolicyLossConfig", "resolve_knobs", "parse_loss_mode"]

ANCHORS = ("rollout", "old")
DIRECTIONS = ("sampled", "predictive")
ESTIMATORS = ("binary", "topk")
DEFAULTS = dict(delta_low=None, delta_high=None, truncation_cap=20.0, num_topk=20, anchor="rollout", direction="sampled")


def parse_loss_mode(loss_mode: str) -> Optional[tuple[str, str]]:
    """``"dppo_tv_topk" -> ("tv", "topk")``; None for modes that are not ours (verl's ``dppo_tv`` included)."""
    if not isinstance(loss_mode, str) or not loss_mode.startswith("dppo_"):
        return None
    body, _, estimator = loss_mode[len("dppo_") :].rpartition("_")
    if not body or estimator not in ESTIMATORS:
        return None
    return body, estimator


def _check_knobs(knobs: dict[str, Any], where: str) -> None:
    for key in ("delta_low", "delta_high"):
        v = knobs[key]
        if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise ValueError(f"{where}.{key} must be a positive number or null, got {v!r}")
    c = knobs["truncation_cap"]
    if not (isinstance(c, (int, float)) and c >= 1.0):
        raise ValueError(f"{where}.truncation_cap (C of Eq. 11) must be >= 1, got {c!r}")
    k = knobs["num_topk"]
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"{where}.num_topk (K) must be a positive integer, got {k!r}")
    if knobs["anchor"] not in ANCHORS:
        raise ValueError(f"{where}.anchor must be one of {list(ANCHORS)}, got {knobs['anchor']!r}")
    if knobs["direction"] not in DIRECTIONS:
        raise ValueError(f"{where}.direction must be one of {list(DIRECTIONS)}, got {knobs['direction']!r}")


@dataclass
class DPPOPolicyLossConfig(PolicyLossConfig):
    """verl ``PolicyLossConfig`` plus the DPPO knobs.

    Args:
        delta_low: Eq. 12 threshold for A_t < 0; null -> the divergence's default (TV 0.15, KL 0.05).
        delta_high: Eq. 12 threshold for A_t > 0; null -> the divergence's default.
        truncation_cap: C of Eq. 11, the cap of the stop-gradient importance ratio (keep it large).
        num_topk: K, the number of rollout top-K logprobs per token (must equal the rollout's
            ``+actor_rollout_ref.rollout.custom.dppo_num_topk``).
        anchor: ``rollout`` (mu, the paper's choice) or ``old`` (recomputed pi_old; ablation, binary only).
        direction: ``sampled`` (Eq. 12's test on pi_t - mu_t) or ``predictive`` (Top-K only).
    """

    delta_low: Optional[float] = DEFAULTS["delta_low"]
    delta_high: Optional[float] = DEFAULTS["delta_high"]
    truncation_cap: float = DEFAULTS["truncation_cap"]
    num_topk: int = DEFAULTS["num_topk"]
    anchor: str = DEFAULTS["anchor"]
    direction: str = DEFAULTS["direction"]

    def __post_init__(self):
        sup = getattr(super(), "__post_init__", None)
        if sup is not None:
            sup()
        _check_knobs({k: getattr(self, k) for k in DEFAULTS}, "actor_rollout_ref.actor.policy_loss")
        parsed = parse_loss_mode(self.loss_mode)
        if parsed is not None:
            _check_mode_knobs(self.loss_mode, parsed[1], self.anchor, self.direction)


def _check_mode_knobs(loss_mode: str, estimator: str, anchor: str, direction: str) -> None:
    if estimator == "topk" and anchor == "old":
        raise ValueError(
            f"policy_loss.anchor=old is not available for {loss_mode}: the Top-K support and its mu come from the "
            "rollout engine, there is no recomputed pi_old distribution; use anchor=rollout or a binary mode"
        )
    if direction == "predictive":
        # SPEC's exact full-softmax D-dot needs the sum_{j not in S} pi_j^2 statistic (vocab_parallel_stats
        # computes it); the hook and its derivation tests arrive with the "Beyond the paper" issue.
        raise ValueError(
            f"policy_loss.direction=predictive is not available yet for {loss_mode}; use direction=sampled"
        )


@dataclass(frozen=True)
class DPPOKnobs:
    divergence: str
    estimator: str  # "binary" | "topk"
    delta_low: float
    delta_high: float
    truncation_cap: float
    num_topk: int
    anchor: str
    direction: str


def resolve_knobs(loss_mode: str, policy_loss: Any) -> DPPOKnobs:
    """The knobs of ``loss_mode`` from ``actor.policy_loss`` (ours, verl's plain config, or a DictConfig)."""
    from .ops.divergence import get_divergence

    parsed = parse_loss_mode(loss_mode)
    if parsed is None:
        raise ValueError(f"{loss_mode!r} is not a dppo_<divergence>_<binary|topk> loss mode")
    name, estimator = parsed
    spec = get_divergence(name)
    get = policy_loss.get if hasattr(policy_loss, "get") else (lambda k, d=None: getattr(policy_loss, k, d))
    knobs = {k: get(k, d) for k, d in DEFAULTS.items()}
    knobs = {k: (DEFAULTS[k] if v is None and DEFAULTS[k] is not None else v) for k, v in knobs.items()}
    _check_knobs(knobs, "actor_rollout_ref.actor.policy_loss")
    _check_mode_knobs(loss_mode, estimator, knobs["anchor"], knobs["direction"])
    dl = spec.default_delta if knobs["delta_low"] is None else float(knobs["delta_low"])
    dh = spec.default_delta if knobs["delta_high"] is None else float(knobs["delta_high"])
    return DPPOKnobs(
        divergence=name,
        estimator=estimator,
        delta_low=dl,
        delta_high=dh,
        truncation_cap=float(knobs["truncation_cap"]),
        num_topk=int(knobs["num_topk"]),
        anchor=knobs["anchor"],
        direction=knobs["direction"],
    )
