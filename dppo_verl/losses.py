"""Policy losses with verl 0.9.1's ``PolicyLossFn`` signature, one per loss shape x divergence x estimator.

Shapes: ``[B, T]`` per response token (the padded layout verl's ``ppo_loss`` hands a policy loss).

Per token (Eq. 11 with truncated importance sampling; ``w_t`` the loss shape's weight, :mod:`dppo_verl.ops.shapes`)::

    loss_t = -A_t * stopgrad(min(r_t, C) * w_t * V_b) * log pi_t,    r_t = pi_t / mu_t

so the gradient is -A_t min(r_t, C) w_t V_b grad log pi_t. ``w_t`` is the Eq. 12 trust-region mask M_t for ``dppo_*``
and ``cppo_*`` modes (:func:`dppo_verl.ops.mask.trust_region_mask`) and DRPO's smooth weight for ``drpo_*``;
``V_b`` is the optional TRM sequence veto (``delta_seq``, :func:`dppo_verl.ops.mask.sequence_keep`), 1 when off.
Aggregation is verl's own ``agg_loss`` with ``config.global_batch_info``, as in every verl loss.

The anchor mu is the rollout engine's ``rollout_log_probs`` (the paper's choice), read from the hand-off
(:mod:`dppo_verl.handoff`) for binary and Top-K modes alike; ``anchor=old`` (binary only) uses the
recomputed pi_old instead, as an explicit ablation. Nothing falls back silently: a missing mu or a missing
Top-K divergence is an error that says what to enable.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Optional

import torch

from .knobs import DPPOKnobs, resolve_knobs, weighs_against_mu
from .contract import (
    CALCULATE_LOG_PROBS, EXTERNAL_LIB, METRIC_PREFIX, OUT_DDOT, OUT_DIVERGENCE, OUT_EXCLUDED, OUT_TOPK_VALID,
    PLUGIN_MODULE, ROLLOUT_LOG_PROBS, ROLLOUT_NUM_TOPK, SAMPLED_IDS_KNOB, TOPK_KEYS,
)
from .handoff import HandOff, current_handoff
from .integrations.patching import raise_if_drifted
from .ops.checks import DeferredChecks, check_shape, nonfinite_logprob_flags
from .ops.consistency import VALID, describe_status
from .ops.divergence import DivergenceSpec, add_registration_listener, divergence_names, get_divergence
from .ops.mask import sequence_keep
from .ops.sampled_vocab import log_kept_mass
from .ops.shapes import LossShape, TokenView, add_shape_listener, get_loss_shape, loss_shape_names

__all__ = [
    "MAX_METRICS", "METRIC_PREFIX", "compute_dppo_loss", "loss_mode_names", "make_policy_loss", "register_loss_modes",
]

# Metrics that must be aggregated as maxima across micro-batches and ranks (verl averages by default; the
# actor integration's ppo_loss wrapper re-types these).
MAX_METRICS = (METRIC_PREFIX + "divergence_max", METRIC_PREFIX + "ratio_max")
_ENABLE_MU = (
    f"{CALCULATE_LOG_PROBS}=True (the rollout must return log-probs) and dppo_verl loaded "
    f"in every worker (pip install dppo-verl, or {EXTERNAL_LIB}={PLUGIN_MODULE})"
)


def _mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked mean as a 0-d tensor (0 for an empty mask)."""
    return torch.where(mask, x.float(), 0.0).sum() / mask.sum().clamp(min=1)


def _max(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked max as a 0-d tensor (0 for an empty mask)."""
    if x.numel() == 0:
        return x.new_zeros((), dtype=torch.float32)
    top = torch.where(mask, x.float(), float("-inf")).max()
    return torch.where(mask.any(), top, 0.0)


def _masked_means(values: dict, mask: torch.Tensor) -> torch.Tensor:
    """``[F]`` masked means of ``F`` per-token tensors ``[B, T]`` (each a tensor averaged over ``mask``, or a
    ``(tensor, its own mask)`` pair), 0 for an empty mask: one stacked reduction instead of F small ones (the
    metrics run per micro-batch, where op count, not arithmetic, is the cost)."""
    pairs = [v if isinstance(v, tuple) else (v, mask) for v in values.values()]
    x = torch.stack([v.float() for v, _ in pairs]).flatten(1)  # [F, B * T]
    sel = torch.stack([torch.broadcast_to(w, v.shape) for v, w in pairs]).flatten(1)  # [F, B * T]
    return torch.where(sel, x, 0.0).sum(-1) / sel.sum(-1).clamp(min=1)


def _metrics(t: dict[str, torch.Tensor], mask: torch.Tensor, cap: float,
             checks: Optional[DeferredChecks] = None) -> dict[str, float]:
    """``t``: ``keep``, ``weight``, ``divergence``, ``log_prob``, ``mu``, ``log_ratio``, ``advantages``,
    ``support_size``, ``push`` (None unless predictive), ``topk_valid`` (None for binary modes) ``[B, T]`` and
    ``seq_keep`` ``[B]`` (all True when the TRM veto is off). Raises when a response token's top-K row is invalid:
    the count rides in the same single device read as the metrics, and so do the queued data ``checks`` (the
    Top-K hook's and the loss's own: :class:`~dppo_verl.ops.checks.DeferredChecks`), raised first."""
    dropped, adv = ~t["keep"], t["advantages"]
    ratio = torch.exp(t["log_ratio"].clamp(max=20.0))  # clamp as verl does: the metric stays finite
    log_m = t.get("log_excluded_mass")  # ops.sampled_vocab: 0 when the rollout samples from every head row
    # name -> per-token value [B, T] averaged over the response tokens (or the tokens given beside it)
    means = {
        "masked_frac": dropped,
        "masked_frac_pos": (dropped, mask & (adv > 0)),
        "masked_frac_neg": (dropped, mask & (adv < 0)),
        "weight_mean": t["weight"],
        "divergence_mean": t["divergence"],
        "mismatch_abs_mean": (t["log_prob"].exp() - t["mu"].exp()).abs(),
        "truncated_frac": t["log_ratio"] > math.log(cap),
        "ratio_mean": ratio,
        "support_size": t["support_size"],
        "ppo_kl": t["mu"] - t["log_prob"],
        "excluded_mass_mean": torch.exp(log_m) if log_m is not None else torch.zeros_like(t["mu"]),
    }
    if t.get("start_outside") is not None:  # of the masked tokens, those already outside delta at the step's start
        means["masked_at_start_frac"] = (t["start_outside"], mask & dropped)
    if t.get("push") is not None:  # direction=predictive: where its direction disagrees with Eq. 12's pi - mu
        means["direction_flip_frac"] = torch.sign(t["push"].float()) != torch.sign(t["log_ratio"])
    m = dict(zip(means, _masked_means(means, mask)))
    m["seq_dropped_frac"] = _mean(~t["seq_keep"], mask.any(-1))
    m["divergence_max"] = _max(t["divergence"], mask)
    m["ratio_max"] = _max(ratio, mask)
    if t.get("topk_valid") is not None:  # Top-K modes: each token's row checked by the hook (ops.consistency)
        valid = t["topk_valid"] == VALID
        invalid = (mask & ~valid).sum().float()
        m["topk_valid_frac"] = 1.0 - invalid / mask.sum().clamp(min=1)  # 1 on an empty micro-batch: nothing invalid
        m["topk_invalid_count"] = invalid
    # the one device read of the micro-batch: data checks, metrics and the top-K row check together
    values = (checks or DeferredChecks()).read(torch.stack(list(m.values())))
    m = dict(zip(m, values))
    if m.pop("topk_invalid_count", 0.0):
        _raise_invalid_topk(t, mask)
    ppo_kl = m.pop("ppo_kl")
    out = {METRIC_PREFIX + k: v for k, v in m.items()}
    # verl's usual names, so existing dashboards keep working.
    out["actor/pg_clipfrac"] = m["masked_frac"]
    out["actor/ppo_kl"] = ppo_kl
    return out


def _raise_invalid_topk(t: dict, mask: torch.Tensor) -> None:
    """Error path of the top-K check: name the first bad token, its status and values (reads freely: it raises)."""
    bad = mask & (t["topk_valid"] != VALID)
    b, i = bad.nonzero()[0].tolist()
    code, n = float(t["topk_valid"][b, i]), int(bad.sum())
    describe = t.get("describe_token")
    where = (describe(b, i) if describe is not None else
             f"sample {b} of this micro-batch, response token {i} ({ROLLOUT_LOG_PROBS}={float(t['mu'][b, i]):.9g})")
    raise ValueError(
        f"rollout top-K ({OUT_TOPK_VALID}): {n} response token(s) with response_mask 1 have an invalid top-K row. "
        f"The first, {where}: it {describe_status(code)}. The top-K rows do not belong to their tokens: the rollout "
        f"top-K ({list(TOPK_KEYS)}) and {ROLLOUT_LOG_PROBS} went through different paths (an async resume, a "
        "multi-turn agent loop, a batch reordering)")


def compute_dppo_loss(
    log_prob: torch.Tensor,
    mu_logp: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    divergence: torch.Tensor,
    knobs: DPPOKnobs,
    *,
    loss_agg_mode: str = "token-mean",
    global_batch_info: Optional[dict] = None,
    rollout_is_weights: Optional[torch.Tensor] = None,
    push: Optional[torch.Tensor] = None,
    support_size: Optional[torch.Tensor] = None,
    topk_valid: Optional[torch.Tensor] = None,
    describe_token=None,
    checks: Optional[DeferredChecks] = None,
    log_excluded_mass: Optional[torch.Tensor] = None,
    anchor_logp: Optional[torch.Tensor] = None,
    start_divergence: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss (module docstring) and metrics from per-token tensors ``[B, T]`` (``divergence`` already computed).
    ``topk_valid``: the Top-K hook's row status codes (``dppo_topk_valid``); any invalid response token raises,
    named through ``describe_token(b, t)`` when given. ``checks``: data checks to read with the metrics (one read).
    ``log_excluded_mass``: ``log m_t``, the trainer's mass on ids the rollout never samples (``log_prob`` already
    normalised without them); None when there are none. ``anchor_logp``: Eq. 12's anchor at a_t when it is not mu
    (``anchor=old``: pi_old, the decoupled trust region; Eq. 11's weight stays min(pi / mu, C)). ``start_divergence``:
    each token's D_t from the anchor at the step's start (verl's pi_old pass), for ``masked_at_start_frac``."""
    from verl.trainer.ppo.core_algos import agg_loss

    mask = response_mask.bool()
    lp = log_prob.detach().float()
    mu = mu_logp.float()
    view = TokenView(divergence.float(), lp, mu if anchor_logp is None else anchor_logp.float(), advantages, mask, push)
    shaped = get_loss_shape(knobs.shape).fn(view, knobs)
    seq_keep = torch.ones(mask.shape[:-1], dtype=torch.bool, device=mask.device)  # [B]
    if knobs.delta_seq is not None:
        seq_keep, _ = sequence_keep(divergence, mask, delta_seq=knobs.delta_seq, agg=knobs.seq_agg)
    weight = shaped.weight * seq_keep.unsqueeze(-1)  # [B, T]
    log_ratio = lp - mu
    # min(r, C) = exp(min(log r, log C)): no overflow however far pi and mu drift apart.
    truncated = torch.exp(log_ratio.clamp(max=math.log(knobs.truncation_cap)))
    # Zero outside the response *before* multiplying by log pi, so padding (which may hold -inf / garbage
    # logprobs, or a NaN divergence) can neither reach the sum nor turn the gradient into NaN.
    coeff = torch.where(mask, -advantages.float() * truncated * weight, 0.0).detach()
    pg_losses = coeff * log_prob
    if rollout_is_weights is not None:
        pg_losses = pg_losses * rollout_is_weights
    pg_loss = agg_loss(
        loss_mat=pg_losses, loss_mask=response_mask, loss_agg_mode=loss_agg_mode, **(global_batch_info or {})
    )
    parts = dict(keep=shaped.keep, weight=weight, divergence=divergence, log_prob=lp, mu=mu, log_ratio=log_ratio,
                 advantages=advantages, seq_keep=seq_keep, push=push, topk_valid=topk_valid,
                 describe_token=describe_token, log_excluded_mass=log_excluded_mass,
                 start_outside=None if start_divergence is None else (
                     start_divergence.float() > torch.where(advantages > 0, knobs.delta_high, knobs.delta_low)),
                 support_size=torch.ones_like(mu) if support_size is None else support_size)
    return pg_loss, _metrics(parts, mask, knobs.truncation_cap, checks)


def _mu_from(handoff: Optional[HandOff], old_log_prob, knobs: DPPOKnobs, mode: str) -> torch.Tensor:
    """The denominator of Eq. 11's weight (:func:`~.knobs.weighs_against_mu`)."""
    if not weighs_against_mu(knobs):
        return old_log_prob
    if handoff is None or handoff.rollout_log_probs is None:
        raise ValueError(
            f"{mode}: the rollout log-probs mu (batch key '{ROLLOUT_LOG_PROBS}') did not reach the loss. Set "
            f"{_ENABLE_MU}. (A Top-K mode weighs every token by min(pi/mu, C) for either anchor.)"
        )
    return handoff.rollout_log_probs


def _topk_inputs(handoff: Optional[HandOff], knobs: DPPOKnobs, mode: str, shape):
    div = None if handoff is None else handoff.divergence
    if div is None:
        raise ValueError(
            f"{mode}: the Top-K divergence ('{OUT_DIVERGENCE}', computed from the actor's logits and the batch keys "
            f"{list(TOPK_KEYS)}) did not reach the loss. The dppo_verl actor integration must be active in the "
            f"worker and the rollout must return top-K logprobs (+{ROLLOUT_NUM_TOPK}={knobs.num_topk}); it never "
            "falls back to binary."
        )
    check_shape(OUT_DIVERGENCE, div, list(shape))
    push = None
    if knobs.direction == "predictive":
        if handoff.ddot is None:
            raise ValueError(
                f"{mode}: direction=predictive needs '{OUT_DDOT}' (the Top-K divergence's rate along the sampled "
                "token's gradient) from the dppo_verl actor integration's logits hook; it did not reach the loss"
            )
        push = handoff.ddot
        check_shape(OUT_DDOT, push, list(shape))
    if handoff.topk_valid is None:
        raise ValueError(f"{mode}: the Top-K row check ('{OUT_TOPK_VALID}') from the dppo_verl actor integration's "
                         "logits hook did not reach the loss")
    check_shape(OUT_TOPK_VALID, handoff.topk_valid, list(shape))
    return div, push, handoff.support_size, handoff.topk_valid


def _sampled_normalisation(handoff: Optional[HandOff], log_prob: torch.Tensor, mask: torch.Tensor, knobs: DPPOKnobs,
                           mode: str, checks: DeferredChecks):
    """``log pi_A(a_t) = log pi(a_t) - log(1 - m_t)`` over the ids the rollout samples from, like mu
    (:mod:`dppo_verl.ops.sampled_vocab`); the correction is a constant for autograd. Returns ``(log_prob, log m)``,
    ``log m`` None when nothing is excluded (or binary anchor=old: pi and pi_old share the trainer's normalisation)."""
    from .integrations.actor.sampled_ids import current_sampled_ids

    g = None if handoff is None else handoff.excluded_log_ratio
    if not weighs_against_mu(knobs):
        return log_prob, None
    if g is None:
        if current_sampled_ids() is not None:
            raise ValueError(
                f"{mode}: the rollout samples from fewer ids than the model's head ({current_sampled_ids()}), but "
                f"'{OUT_EXCLUDED}' from the dppo_verl logits hook did not reach the loss: pi and mu would be normalised "
                f"over different ids. The actor integration must be active (or set {SAMPLED_IDS_KNOB}=all if the rollout "
                "samples from every head row)")
        return log_prob, None
    check_shape(OUT_EXCLUDED, g, list(log_prob.shape))
    log_m = torch.where(mask, g.float() + log_prob.detach().float(), float("-inf"))  # [B, T]
    bad = mask & ~(log_m < 0)  # m >= 1 or NaN: no mass left on the samplable ids
    checks.add(bad, lambda idx: (
        f"{OUT_EXCLUDED}: at sample {idx[0]} (micro-batch row), response token {idx[-1]} the trainer puts all its "
        f"probability (log m = {log_m[tuple(idx)].item()!r}) on ids the rollout never samples ({SAMPLED_IDS_KNOB}="
        f"{knobs.sampled_ids}: {current_sampled_ids()}); pi over the samplable ids is undefined"))
    log_keep = torch.where(mask & (log_m < 0), log_kept_mass(log_m), 0.0)
    return log_prob - log_keep, log_m


def _token_checks(checks: DeferredChecks, mu_name: str, mu, log_prob, advantages, mask) -> DeferredChecks:
    """Queue: NaN/+inf log-probs (mu, pi) and non-finite advantages on response tokens (read with the metrics).

    A poisoned reward (NaN or inf advantage) would make every gradient of the step NaN (Eq. 11 multiplies log pi by
    A_t), and the optimizer would write NaN into the weights; the read raises naming the sample before the loss
    is returned.
    """
    nonfinite_logprob_flags(checks, mu_name, mu, mask)
    nonfinite_logprob_flags(checks, "log_prob", log_prob, mask)
    bad = ~torch.isfinite(advantages) & mask
    checks.add(bad, lambda idx: (
        f"advantages (shape {list(advantages.shape)}) is {advantages[tuple(idx)].item()} at sample {idx[0]} "
        f"(micro-batch row), response token {idx[-1]}: a NaN/inf reward or advantage reached the DPPO "
        "loss; it would turn the whole gradient into NaN. Check the reward function and the advantage estimator "
        "for this sample"))
    return checks


def _policy_loss(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: Any = None,
    rollout_is_weights: Optional[torch.Tensor] = None,
    *,
    loss_mode: str,
) -> tuple[torch.Tensor, dict[str, Any]]:
    if config is None or getattr(config, "policy_loss", None) is None:
        raise ValueError(f"{loss_mode} needs the actor config (verl's ActorConfig with .policy_loss)")
    knobs = resolve_knobs(loss_mode, config.policy_loss)
    raise_if_drifted(("dppo", "topk") if knobs.estimator == "topk" else ("dppo",), loss_mode)
    shape = list(log_prob.shape)
    for name, t in (("old_log_prob", old_log_prob), ("advantages", advantages), ("response_mask", response_mask)):
        check_shape(name, t, shape)
    mask = response_mask.bool()
    handoff = current_handoff()
    mu = _mu_from(handoff, old_log_prob, knobs, loss_mode)
    mu_name = ROLLOUT_LOG_PROBS if weighs_against_mu(knobs) else "old_log_prob"
    check_shape(mu_name, mu, shape)
    anchor = mu if knobs.anchor == "rollout" else old_log_prob  # Eq. 12's anchor (pi_old: the trainer's own normalisation)
    # the Top-K hook's data checks first (they describe the rollout data), then the loss's own
    checks = DeferredChecks()
    if handoff is not None and handoff.checks is not None:
        checks.extend(handoff.checks)
    corrected, log_m = _sampled_normalisation(handoff, log_prob, mask, knobs, loss_mode, checks)
    if anchor is not mu:  # shifted like pi: Eq. 12's direction test stays pi - pi_old under one normalisation
        anchor = anchor + (corrected - log_prob).detach()
    log_prob = corrected
    _token_checks(checks, mu_name, mu, log_prob.detach(), advantages, mask)
    if anchor is not mu:
        nonfinite_logprob_flags(checks, "old_log_prob", old_log_prob, mask)
    if rollout_is_weights is not None and weighs_against_mu(knobs):
        # First-use twin of the launch rule: Eq. 11 already weights by min(pi/mu, C); verl's pi_old/mu on top of it
        # would count the correction twice.
        raise ValueError(f"{loss_mode} already weights every token by min(pi/mu, C); verl's rollout correction "
                         "weights would apply on top: set algorithm.rollout_correction.rollout_is=null")
    if knobs.estimator == "topk":
        divergence, push, support_size, topk_valid = _topk_inputs(handoff, knobs, loss_mode, shape)
    else:
        with torch.no_grad():  # binary: support {a_t}, rest = everything else (Eqs. 13/14)
            divergence = get_divergence(knobs.divergence).fn(log_prob.detach().unsqueeze(-1), anchor.unsqueeze(-1))
        push, support_size, topk_valid = None, None, None
    return compute_dppo_loss(
        log_prob,
        mu,
        advantages,
        response_mask,
        divergence,
        knobs,
        loss_agg_mode=loss_agg_mode,
        global_batch_info=getattr(config, "global_batch_info", None),
        rollout_is_weights=rollout_is_weights,
        push=push,
        support_size=support_size,
        topk_valid=topk_valid,
        describe_token=None if handoff is None else handoff.describe_token,
        checks=checks,
        log_excluded_mass=log_m,
        anchor_logp=None if anchor is mu else anchor,
        start_divergence=None if handoff is None else handoff.start_divergence,
    )


def make_policy_loss(loss_mode: str):
    """A function with verl's ``PolicyLossFn`` signature for ``<shape>_<divergence>_<binary|topk>``."""
    fn = functools.partial(_policy_loss, loss_mode=loss_mode)
    fn = functools.update_wrapper(fn, _policy_loss)
    fn.__name__ = fn.__qualname__ = f"compute_policy_loss_{loss_mode}"
    fn.dppo_loss_mode = loss_mode  # marks the registry entry as ours (idempotent re-registration)
    return fn


def _register_mode(shape: str, divergence: str) -> None:
    from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY, register_policy_loss

    for estimator in ("binary", "topk"):
        mode = f"{shape}_{divergence}_{estimator}"
        existing = POLICY_LOSS_REGISTRY.get(mode)
        if existing is not None:
            if getattr(existing, "dppo_loss_mode", None) == mode:
                continue  # ours already (plugin loaded twice): idempotent
            raise ValueError(f"verl policy loss {mode!r} is already registered by {existing!r}; refusing to overwrite")
        register_policy_loss(mode)(make_policy_loss(mode))


def _register_modes_for(spec: DivergenceSpec) -> None:
    """Every shape's ``<shape>_<spec.name>_{binary,topk}`` (called for each divergence, now and registered later)."""
    for shape in loss_shape_names():
        _register_mode(shape, spec.name)


def _on_shape(shape: LossShape) -> None:
    for name in divergence_names():
        _register_mode(shape.name, name)


def loss_mode_names() -> list[str]:
    """Every ``<shape>_<divergence>_<estimator>`` mode of the registered shapes and divergences."""
    return [f"{s}_{d}_{e}" for s in loss_shape_names() for d in divergence_names() for e in ("binary", "topk")]


_REGISTERED = False


def register_loss_modes() -> None:
    """Register ``<shape>_<divergence>_{binary,topk}`` in verl for every shape x divergence, now and later."""
    global _REGISTERED
    if not _REGISTERED:
        _REGISTERED = True
        add_registration_listener(_register_modes_for)
        add_shape_listener(_on_shape)
