"""DPPO knobs (SPEC, "Config and data contract"), declared once: the fields of :class:`DPPOKnobFields`.

Pure Python (no verl import), so every process and module can parse a loss mode and resolve knobs without importing
verl. verl's config class :class:`dppo_verl.config.DPPOPolicyLossConfig` inherits these fields; everything else is
derived from the same declaration: :data:`DEFAULTS` (the launcher's ``+`` list, the rules), :class:`DPPOKnobs` (the
resolved, frozen values a loss reads) and :func:`resolve_knobs` (which also reads verl's plain ``PolicyLossConfig``
or a ``DictConfig``, where every knob takes its default).

Loss modes are ``<shape>_<divergence>_<estimator>``: shape ``dppo`` / ``drpo`` / ``cppo`` (:mod:`dppo_verl.ops.shapes`),
a registered divergence (:mod:`dppo_verl.ops.divergence`), estimator ``binary`` or ``topk``; :func:`parse_loss_mode`
returns one typed :class:`LossMode`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, NamedTuple, Optional

from .contract import DEFAULT_NUM_TOPK, POLICY_LOSS
from .ops.mask import SEQ_AGGS
from .ops.shapes import loss_shape_names

__all__ = [
    "ANCHORS", "DEFAULTS", "SAMPLED_IDS", "DIRECTIONS", "ESTIMATORS", "SEQ_AGGS", "DPPOKnobFields", "DPPOKnobs", "LossMode",
    "check_knob_values", "parse_loss_mode", "resolve_knobs",
]

ANCHORS = ("rollout", "old")
SAMPLED_IDS = ("vllm", "all")
DIRECTIONS = ("sampled", "predictive")
ESTIMATORS = ("binary", "topk")


@dataclass
class DPPOKnobFields:
    """The DPPO knobs (the one place they are declared), with their defaults.

    Args:
        delta_low: Eq. 12 threshold for A_t < 0; null -> the divergence's default (TV 0.15, KL 0.05).
        delta_high: Eq. 12 threshold for A_t > 0; null -> the divergence's default.
        truncation_cap: C of Eq. 11, the cap of the stop-gradient importance ratio (keep it large).
        num_topk: K, the number of rollout top-K logprobs per token (must equal the rollout's
            ``+actor_rollout_ref.rollout.custom.dppo_num_topk``).
        anchor: ``rollout`` (mu, the paper's choice) or ``old`` (decoupled: Eq. 12's trust region around verl's
            recomputed pi_old, over the same support, while Eq. 11's weight stays min(pi / mu, C); needs verl's
            pi_old pass, which the Top-K modes extend with ``old_topk_logprobs``, :mod:`.integrations.actor.old_pass`).
        direction: ``sampled`` (Eq. 12's test on pi_t - mu_t) or ``predictive`` (Top-K only: the sign of the rate
            D_dot_t at which the update changes the Top-K divergence, :mod:`dppo_verl.ops.predictive`).
        delta_seq: TRM sequence veto: drop a whole response when ``seq_agg_t D_t > delta_seq``; null = off.
        seq_agg: ``max`` or ``mean``, the aggregation of ``D_t`` over a response for ``delta_seq``.
        cppo_w_min: ``cppo_*`` modes: position weight of the last response token (first is 1).
        cppo_delta_pre: ``cppo_*`` modes: prefix budget rate floor; the rate is the P90 of ``D_t`` clamped to
            ``[cppo_delta_pre, 2 cppo_delta_pre]``.
        fused_logprobs: Top-K modes, experimental: the hook's Triton pass over the logits also yields verl's
            ``log_probs`` with their gradient, replacing the engine's own read
            (:mod:`dppo_verl.integrations.actor.fused_logprob`).
        sampled_ids: the ids the rollout engine samples from, over which the trainer's log-probs are normalised
            like mu (:mod:`dppo_verl.ops.sampled_vocab`): ``vllm`` (verl's vLLM server: ids below
            ``len(tokenizer)``, vision placeholders excluded) or ``all`` (every head row, e.g. SGLang).
    """

    delta_low: Optional[float] = None
    delta_high: Optional[float] = None
    truncation_cap: float = 20.0
    num_topk: int = DEFAULT_NUM_TOPK
    anchor: str = "rollout"
    direction: str = "sampled"
    delta_seq: Optional[float] = None
    seq_agg: str = "max"
    cppo_w_min: float = 0.8
    cppo_delta_pre: float = 0.02
    fused_logprobs: bool = False
    sampled_ids: str = "vllm"


_KNOB_FIELDS = dataclasses.fields(DPPOKnobFields)
DEFAULTS: dict[str, Any] = {f.name: f.default for f in _KNOB_FIELDS}
# Knobs read by one shape only; setting them for another shape is an error rather than a silent no-op.
_SHAPE_KNOBS = {"cppo_w_min": "cppo", "cppo_delta_pre": "cppo"}

# The resolved knobs of one loss mode (deltas filled in from the divergence's default), frozen.
DPPOKnobs = dataclasses.make_dataclass(
    "DPPOKnobs",
    [("divergence", str), ("estimator", str), ("shape", str)] + [(f.name, f.type) for f in _KNOB_FIELDS],
    frozen=True,
    namespace={"__module__": __name__, "__doc__": "Resolved DPPO knobs of one loss mode (see resolve_knobs)."},
)


def weighs_against_mu(knobs: "DPPOKnobs") -> bool:
    """Eq. 11's weight is min(pi / mu, C) for the rollout anchor and for Top-K ``anchor=old`` (decoupled: only Eq. 12's
    trust region moves to pi_old); binary ``anchor=old`` weighs against pi_old too (verl's own dppo_tv / dppo_kl).
    Where it weighs against mu, pi is normalised over the ids the rollout samples from (:mod:`.ops.sampled_vocab`)."""
    return knobs.anchor == "rollout" or knobs.estimator == "topk"


class LossMode(NamedTuple):
    shape: str  # "dppo" | "drpo" | "cppo" | any registered loss shape
    divergence: str  # "tv" | "kl" | any registered divergence
    estimator: str  # "binary" | "topk"

    @property
    def is_topk(self) -> bool:
        return self.estimator == "topk"


def parse_loss_mode(loss_mode: Any) -> Optional[LossMode]:
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


def _positive_or_none(v) -> bool:
    return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0)


def check_knob_values(knobs: dict[str, Any], loss_mode: Optional[str] = None) -> None:
    """Every knob on its own and, for one of our loss modes, the knobs that mode cannot take (``ValueError`` naming
    the config key)."""
    _check_knobs(knobs)
    parsed = parse_loss_mode(loss_mode)
    if parsed is not None:
        _check_mode_knobs(loss_mode, parsed, knobs)


def _check_knobs(knobs: dict[str, Any]) -> None:
    """Each knob on its own; the message names the config key to set."""
    where = POLICY_LOSS
    rules = (
        ("delta_low", _positive_or_none, "a positive number or null"),
        ("delta_high", _positive_or_none, "a positive number or null"),
        ("truncation_cap", lambda c: isinstance(c, (int, float)) and c >= 1.0, ">= 1 (C of Eq. 11)"),
        ("num_topk", lambda k: isinstance(k, int) and not isinstance(k, bool) and k >= 1, "a positive integer (K)"),
        ("anchor", lambda a: a in ANCHORS, f"one of {list(ANCHORS)}"),
        ("direction", lambda d: d in DIRECTIONS, f"one of {list(DIRECTIONS)}"),
        ("delta_seq", _positive_or_none, "a positive number or null (TRM sequence threshold)"),
        ("seq_agg", lambda s: s in SEQ_AGGS, f"one of {list(SEQ_AGGS)}"),
        ("cppo_w_min", lambda w: isinstance(w, (int, float)) and 0.0 < w <= 1.0, "in (0, 1] (last token's weight)"),
        ("cppo_delta_pre", lambda d: isinstance(d, (int, float)) and math.isfinite(d) and d >= 0.0,
         "a number >= 0 (prefix budget rate)"),
        ("fused_logprobs", lambda b: isinstance(b, bool), "true or false"),
        ("sampled_ids", lambda v: v in SAMPLED_IDS, f"one of {list(SAMPLED_IDS)}"),
    )
    for key, ok, want in rules:
        if not ok(knobs[key]):
            raise ValueError(f"{where}.{key} must be {want}, got {knobs[key]!r}")


def _check_mode_knobs(loss_mode: str, parsed: LossMode, knobs: dict[str, Any]) -> None:
    if knobs["anchor"] == "old" and knobs["fused_logprobs"]:
        raise ValueError(f"{POLICY_LOSS}.fused_logprobs=True is not available with anchor=old ({loss_mode}): set "
                         "fused_logprobs=False")
    if knobs["direction"] == "predictive" and not parsed.is_topk:
        # For the binary support {a_t}, d pi_k / d eps = pi_k (1 - 2 pi_k + sum pi^2) >= 0: D_dot has the sign of
        # pi_k - mu_k, so the predictive test would silently equal the sampled one (dppo_verl.ops.predictive).
        raise ValueError(
            f"{POLICY_LOSS}.direction=predictive needs a Top-K mode, got {loss_mode}: for the binary support "
            "{a_t} the predictive test equals the sampled one; use direction=sampled or a *_topk mode"
        )
    if knobs["fused_logprobs"] and not parsed.is_topk:
        # Binary modes never call the logits processor: there is no pass of ours for verl's log-probs to ride on.
        raise ValueError(
            f"{POLICY_LOSS}.fused_logprobs=True needs a Top-K mode, got {loss_mode}: binary modes do not read the "
            "logits themselves; set fused_logprobs=False"
        )
    for key, shape in _SHAPE_KNOBS.items():
        if knobs[key] != DEFAULTS[key] and parsed.shape != shape:
            raise ValueError(f"{POLICY_LOSS}.{key}={knobs[key]!r} is read only by {shape}_* loss modes, not by {loss_mode}")


def resolve_knobs(loss_mode: str, policy_loss: Any) -> "DPPOKnobs":
    """The knobs of ``loss_mode`` from ``actor.policy_loss`` (ours, verl's plain config, or a DictConfig)."""
    from .ops.divergence import get_divergence

    parsed = parse_loss_mode(loss_mode)
    if parsed is None:
        raise ValueError(
            f"{loss_mode!r} is not a <shape>_<divergence>_<binary|topk> loss mode (shapes: {loss_shape_names()})"
        )
    spec = get_divergence(parsed.divergence)
    get = policy_loss.get if hasattr(policy_loss, "get") else (lambda k, d=None: getattr(policy_loss, k, d))
    knobs = {k: get(k, d) for k, d in DEFAULTS.items()}
    knobs = {k: (DEFAULTS[k] if v is None and DEFAULTS[k] is not None else v) for k, v in knobs.items()}
    _check_knobs(knobs)
    _check_mode_knobs(loss_mode, parsed, knobs)
    for key in ("delta_low", "delta_high"):
        knobs[key] = spec.default_delta if knobs[key] is None else float(knobs[key])
    for key in ("truncation_cap", "cppo_w_min", "cppo_delta_pre"):
        knobs[key] = float(knobs[key])
    if knobs["delta_seq"] is not None:
        knobs["delta_seq"] = float(knobs["delta_seq"])
    return DPPOKnobs(divergence=parsed.divergence, estimator=parsed.estimator, shape=parsed.shape, **knobs)
