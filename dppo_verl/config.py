"""DPPO knobs (SPEC, "Config and data contract") as a subclass of verl's ``PolicyLossConfig``.

Loss modes are ``<shape>_<divergence>_<estimator>``: shape ``dppo`` / ``drpo`` / ``cppo`` (:mod:`dppo_verl.ops.shapes`),
a registered divergence (:mod:`dppo_verl.ops.divergence`), estimator ``binary`` or ``topk``.

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
from typing import Any, NamedTuple, Optional

from verl.workers.config import PolicyLossConfig

from .ops.mask import SEQ_AGGS
from .ops.shapes import loss_shape_names

__all__ = [
    "ANCHORS", "DIRECTIONS", "SEQ_AGGS", "DPPOKnobs", "DPPOPolicyLossConfig", "LossMode", "resolve_knobs",
    "parse_loss_mode", "split_loss_mode",
]

ANCHORS = ("rollout", "old")
DIRECTIONS = ("sampled", "predictive")
ESTIMATORS = ("binary", "topk")
DEFAULTS = dict(
    delta_low=None, delta_high=None, truncation_cap=20.0, num_topk=20, anchor="rollout", direction="sampled",
    delta_seq=None, seq_agg="max", cppo_w_min=0.8, cppo_delta_pre=0.02, fused_logprobs=False,
)
# Knobs read by one shape only; setting them for another shape is an error rather than a silent no-op.
_SHAPE_KNOBS = {"cppo_w_min": "cppo", "cppo_delta_pre": "cppo"}


class LossMode(NamedTuple):
    shape: str  # "dppo" | "drpo" | "cppo" | any registered loss shape
    divergence: str
    estimator: str  # "binary" | "topk"


def split_loss_mode(loss_mode: str) -> Optional[LossMode]:
    """``"drpo_tv_binary" -> LossMode("drpo", "tv", "binary")``; None for modes that are not ours.

    verl's own ``dppo_tv`` / ``dppo_kl`` (no estimator suffix) are not ours.
    """
    if not isinstance(loss_mode, str):
        return None
    shape, _, rest = loss_mode.partition("_")
    body, _, estimator = rest.rpartition("_")
    if shape not in loss_shape_names() or not body or estimator not in ESTIMATORS:
        return None
    return LossMode(shape, body, estimator)


def parse_loss_mode(loss_mode: str) -> Optional[tuple[str, str]]:
    """``"dppo_tv_topk" -> ("tv", "topk")`` (any shape prefix); None for modes that are not ours."""
    parsed = split_loss_mode(loss_mode)
    return None if parsed is None else (parsed.divergence, parsed.estimator)


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
    ds = knobs["delta_seq"]
    if ds is not None and not (isinstance(ds, (int, float)) and not isinstance(ds, bool) and math.isfinite(ds) and ds > 0):
        raise ValueError(f"{where}.delta_seq (TRM sequence threshold) must be a positive number or null, got {ds!r}")
    if knobs["seq_agg"] not in SEQ_AGGS:
        raise ValueError(f"{where}.seq_agg must be one of {list(SEQ_AGGS)}, got {knobs['seq_agg']!r}")
    w = knobs["cppo_w_min"]
    if not (isinstance(w, (int, float)) and 0.0 < w <= 1.0):
        raise ValueError(f"{where}.cppo_w_min (weight of the last token) must be in (0, 1], got {w!r}")
    dp = knobs["cppo_delta_pre"]
    if not (isinstance(dp, (int, float)) and math.isfinite(dp) and dp >= 0.0):
        raise ValueError(f"{where}.cppo_delta_pre (prefix budget rate) must be a number >= 0, got {dp!r}")
    if not isinstance(knobs["fused_logprobs"], bool):
        raise ValueError(f"{where}.fused_logprobs must be true or false, got {knobs['fused_logprobs']!r}")


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
        direction: ``sampled`` (Eq. 12's test on pi_t - mu_t) or ``predictive`` (Top-K only: the sign of the rate
            D_dot_t at which the update changes the Top-K divergence, :mod:`dppo_verl.ops.predictive`).
        delta_seq: TRM sequence veto: drop a whole response when ``seq_agg_t D_t > delta_seq``; null = off.
        seq_agg: ``max`` or ``mean``, the aggregation of ``D_t`` over a response for ``delta_seq``.
        cppo_w_min: ``cppo_*`` modes: position weight of the last response token (first is 1).
        cppo_delta_pre: ``cppo_*`` modes: prefix budget rate floor; the rate is the P90 of ``D_t`` clamped to
            ``[cppo_delta_pre, 2 cppo_delta_pre]``.
        fused_logprobs: Top-K modes, experimental: the hook's Triton pass over the logits also yields verl's
            ``log_probs`` with their gradient, replacing the engine's own read (:mod:`dppo_verl.integrations.fused_logprob`).
    """

    delta_low: Optional[float] = DEFAULTS["delta_low"]
    delta_high: Optional[float] = DEFAULTS["delta_high"]
    truncation_cap: float = DEFAULTS["truncation_cap"]
    num_topk: int = DEFAULTS["num_topk"]
    anchor: str = DEFAULTS["anchor"]
    direction: str = DEFAULTS["direction"]
    delta_seq: Optional[float] = DEFAULTS["delta_seq"]
    seq_agg: str = DEFAULTS["seq_agg"]
    cppo_w_min: float = DEFAULTS["cppo_w_min"]
    cppo_delta_pre: float = DEFAULTS["cppo_delta_pre"]
    fused_logprobs: bool = DEFAULTS["fused_logprobs"]

    def __post_init__(self):
        sup = getattr(super(), "__post_init__", None)
        if sup is not None:
            sup()
        _check_knobs({k: getattr(self, k) for k in DEFAULTS}, "actor_rollout_ref.actor.policy_loss")
        parsed = split_loss_mode(self.loss_mode)
        if parsed is not None:
            _check_mode_knobs(self.loss_mode, parsed, {k: getattr(self, k) for k in DEFAULTS})


def _check_mode_knobs(loss_mode: str, parsed: LossMode, knobs: dict[str, Any]) -> None:
    if parsed.estimator == "topk" and knobs["anchor"] == "old":
        raise ValueError(
            f"policy_loss.anchor=old is not available for {loss_mode}: the Top-K support and its mu come from the "
            "rollout engine, there is no recomputed pi_old distribution; use anchor=rollout or a binary mode"
        )
    if knobs["direction"] == "predictive" and parsed.estimator != "topk":
        # For the binary support {a_t}, d pi_k / d eps = pi_k (1 - 2 pi_k + sum pi^2) >= 0: D_dot has the sign of
        # pi_k - mu_k, so the predictive test would silently equal the sampled one (dppo_verl.ops.predictive).
        raise ValueError(
            f"policy_loss.direction=predictive needs a Top-K mode, got {loss_mode}: for the binary support "
            "{a_t} the predictive test equals the sampled one; use direction=sampled or a *_topk mode"
        )
    if knobs["fused_logprobs"] and parsed.estimator != "topk":
        # Binary modes never call the logits processor: there is no pass of ours for verl's log-probs to ride on.
        raise ValueError(
            f"policy_loss.fused_logprobs=True needs a Top-K mode, got {loss_mode}: binary modes do not read the "
            "logits themselves; set fused_logprobs=False"
        )
    for key, shape in _SHAPE_KNOBS.items():
        if knobs[key] != DEFAULTS[key] and parsed.shape != shape:
            raise ValueError(
                f"policy_loss.{key}={knobs[key]!r} is read only by {shape}_* loss modes, not by {loss_mode}"
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
    shape: str = "dppo"
    delta_seq: Optional[float] = None
    seq_agg: str = "max"
    cppo_w_min: float = DEFAULTS["cppo_w_min"]
    cppo_delta_pre: float = DEFAULTS["cppo_delta_pre"]
    fused_logprobs: bool = False


def resolve_knobs(loss_mode: str, policy_loss: Any) -> DPPOKnobs:
    """The knobs of ``loss_mode`` from ``actor.policy_loss`` (ours, verl's plain config, or a DictConfig)."""
    from .ops.divergence import get_divergence

    parsed = split_loss_mode(loss_mode)
    if parsed is None:
        raise ValueError(
            f"{loss_mode!r} is not a <shape>_<divergence>_<binary|topk> loss mode (shapes: {loss_shape_names()})"
        )
    spec = get_divergence(parsed.divergence)
    get = policy_loss.get if hasattr(policy_loss, "get") else (lambda k, d=None: getattr(policy_loss, k, d))
    knobs = {k: get(k, d) for k, d in DEFAULTS.items()}
    knobs = {k: (DEFAULTS[k] if v is None and DEFAULTS[k] is not None else v) for k, v in knobs.items()}
    _check_knobs(knobs, "actor_rollout_ref.actor.policy_loss")
    _check_mode_knobs(loss_mode, parsed, knobs)
    dl = spec.default_delta if knobs["delta_low"] is None else float(knobs["delta_low"])
    dh = spec.default_delta if knobs["delta_high"] is None else float(knobs["delta_high"])
    return DPPOKnobs(
        divergence=parsed.divergence,
        estimator=parsed.estimator,
        delta_low=dl,
        delta_high=dh,
        truncation_cap=float(knobs["truncation_cap"]),
        num_topk=int(knobs["num_topk"]),
        anchor=knobs["anchor"],
        direction=knobs["direction"],
        shape=parsed.shape,
        delta_seq=None if knobs["delta_seq"] is None else float(knobs["delta_seq"]),
        seq_agg=knobs["seq_agg"],
        cppo_w_min=float(knobs["cppo_w_min"]),
        cppo_delta_pre=float(knobs["cppo_delta_pre"]),
        fused_logprobs=knobs["fused_logprobs"],
    )
