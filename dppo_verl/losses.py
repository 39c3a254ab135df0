"""DPPO policy losses with verl 0.9.1's ``PolicyLossFn`` signature, one per registered divergence x estimator.

Shapes: ``[B, T]`` per response token (the padded layout verl's ``ppo_loss`` hands a policy loss).

Per token (Eq. 11 with truncated importance sampling)::

    loss_t = -A_t * stopgrad(min(r_t, C)) * M_t * log pi_t,    r_t = pi_t / mu_t

so the gradient is -A_t min(r_t, C) M_t grad log pi_t, M_t being the Eq. 12 trust-region mask
(:func:`dppo_verl.ops.mask.trust_region_mask`). Aggregation is verl's own ``agg_loss`` with
``config.global_batch_info``, as in every verl loss.

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

from .config import DPPOKnobs, resolve_knobs
from .handoff import HandOff, current_handoff
from .ops.checks import check_finite_logprobs, check_shape
from .ops.divergence import DivergenceSpec, add_registration_listener, get_divergence
from .ops.mask import trust_region_mask

__all__ = ["MAX_METRICS", "METRIC_PREFIX", "compute_dppo_loss", "make_policy_loss", "register_loss_modes"]

METRIC_PREFIX = "actor/dppo/"
# Metrics that must be aggregated as maxima across micro-batches and ranks (verl averages by default; the
# actor integration's ppo_loss wrapper re-types these).
MAX_METRICS = (METRIC_PREFIX + "divergence_max", METRIC_PREFIX + "ratio_max")
_ENABLE_MU = (
    "actor_rollout_ref.rollout.calculate_log_probs=True (the rollout must return log-probs) and dppo_verl loaded "
    "in every worker (pip install dppo-verl, or actor_rollout_ref.model.external_lib=dppo_verl)"
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


def _metrics(keep, divergence, log_prob, mu, log_ratio, advantages, mask, cap, support_size) -> dict[str, float]:
    dropped = ~keep
    ratio = torch.exp(log_ratio.clamp(max=20.0))  # clamp as verl does: the metric stays finite
    m = {
        "masked_frac": _mean(dropped, mask),
        "masked_frac_pos": _mean(dropped, mask & (advantages > 0)),
        "masked_frac_neg": _mean(dropped, mask & (advantages < 0)),
        "divergence_mean": _mean(divergence, mask),
        "divergence_max": _max(divergence, mask),
        "mismatch_abs_mean": _mean((log_prob.exp() - mu.exp()).abs(), mask),
        "truncated_frac": _mean(log_ratio > math.log(cap), mask),
        "ratio_mean": _mean(ratio, mask),
        "ratio_max": _max(ratio, mask),
        "support_size": _mean(support_size, mask),
        "ppo_kl": _mean(mu - log_prob, mask),
    }
    values = torch.stack(list(m.values())).tolist()  # one device sync for all metrics
    m = dict(zip(m, values))
    ppo_kl = m.pop("ppo_kl")
    out = {METRIC_PREFIX + k: v for k, v in m.items()}
    # verl's usual names, so existing dashboards keep working.
    out["actor/pg_clipfrac"] = m["masked_frac"]
    out["actor/ppo_kl"] = ppo_kl
    return out


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
) -> tuple[torch.Tensor, dict[str, float]]:
    """Eq. 11 loss and metrics from per-token tensors ``[B, T]`` (``divergence`` already computed)."""
    from verl.trainer.ppo.core_algos import agg_loss

    mask = response_mask.bool()
    lp = log_prob.detach().float()
    mu = mu_logp.float()
    keep = trust_region_mask(
        divergence, lp, mu, advantages, delta_low=knobs.delta_low, delta_high=knobs.delta_high, push=push
    )
    log_ratio = lp - mu
    # min(r, C) = exp(min(log r, log C)): no overflow however far pi and mu drift apart.
    weight = torch.exp(log_ratio.clamp(max=math.log(knobs.truncation_cap)))
    # Zero outside the response (and for masked tokens) *before* multiplying by log pi, so padding (which
    # may hold -inf / garbage logprobs) can neither reach the sum nor turn the gradient into NaN.
    coeff = torch.where(mask & keep, -advantages.float() * weight, 0.0).detach()
    pg_losses = coeff * log_prob
    if rollout_is_weights is not None:
        pg_losses = pg_losses * rollout_is_weights
    pg_loss = agg_loss(
        loss_mat=pg_losses, loss_mask=response_mask, loss_agg_mode=loss_agg_mode, **(global_batch_info or {})
    )
    size = torch.ones_like(mu) if support_size is None else support_size
    return pg_loss, _metrics(keep, divergence, lp, mu, log_ratio, advantages, mask, knobs.truncation_cap, size)


def _mu_from(handoff: Optional[HandOff], old_log_prob, knobs: DPPOKnobs, mode: str) -> torch.Tensor:
    if knobs.anchor == "old":
        return old_log_prob
    if handoff is None or handoff.rollout_log_probs is None:
        raise ValueError(
            f"{mode}: the rollout log-probs mu (batch key 'rollout_log_probs') did not reach the loss. Set "
            f"{_ENABLE_MU}. (policy_loss.anchor=old anchors on the recomputed pi_old instead; an ablation only.)"
        )
    return handoff.rollout_log_probs


def _topk_inputs(handoff: Optional[HandOff], knobs: DPPOKnobs, mode: str, shape):
    div = None if handoff is None else handoff.divergence
    if div is None:
        raise ValueError(
            f"{mode}: the Top-K divergence ('dppo_divergence', computed from the actor's logits and the batch keys "
            "'rollout_topk_ids'/'rollout_topk_logprobs') did not reach the loss. The dppo_verl actor integration "
            "must be active in the worker and the rollout must return top-K logprobs "
            f"(+actor_rollout_ref.rollout.custom.dppo_num_topk={knobs.num_topk}); it never falls back to binary."
        )
    check_shape("dppo_divergence", div, list(shape))
    push = None
    if knobs.direction == "predictive":
        if handoff.ddot is None:
            raise ValueError(f"{mode}: direction=predictive needs 'dppo_ddot' from the actor integration")
        push = handoff.ddot
    return div, push, handoff.support_size


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
    shape = list(log_prob.shape)
    for name, t in (("old_log_prob", old_log_prob), ("advantages", advantages), ("response_mask", response_mask)):
        check_shape(name, t, shape)
    mask = response_mask.bool()
    handoff = current_handoff()
    mu = _mu_from(handoff, old_log_prob, knobs, loss_mode)
    mu_name = "rollout_log_probs" if knobs.anchor == "rollout" else "old_log_prob"
    check_shape(mu_name, mu, shape)
    check_finite_logprobs(mu_name, mu, mask)
    check_finite_logprobs("log_prob", log_prob.detach(), mask)
    if knobs.estimator == "topk":
        divergence, push, support_size = _topk_inputs(handoff, knobs, loss_mode, shape)
    else:
        with torch.no_grad():  # binary: support {a_t}, rest = everything else (Eqs. 13/14)
            divergence = get_divergence(knobs.divergence).fn(log_prob.detach().unsqueeze(-1), mu.unsqueeze(-1))
        push, support_size = None, None
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
    )


def make_policy_loss(loss_mode: str):
    """A function with verl's ``PolicyLossFn`` signature for ``dppo_<divergence>_<binary|topk>``."""
    fn = functools.partial(_policy_loss, loss_mode=loss_mode)
    fn = functools.update_wrapper(fn, _policy_loss)
    fn.__name__ = fn.__qualname__ = f"compute_policy_loss_{loss_mode}"
    fn.dppo_loss_mode = loss_mode  # marks the registry entry as ours (idempotent re-registration)
    return fn


def _register_modes_for(spec: DivergenceSpec) -> None:
    from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY, register_policy_loss

    for estimator in ("binary", "topk"):
        mode = f"dppo_{spec.name}_{estimator}"
        existing = POLICY_LOSS_REGISTRY.get(mode)
        if existing is not None:
            if getattr(existing, "dppo_loss_mode", None) == mode:
                continue  # ours already (plugin loaded twice): idempotent
            raise ValueError(f"verl policy loss {mode!r} is already registered by {existing!r}; refusing to overwrite")
        register_policy_loss(mode)(make_policy_loss(mode))


_REGISTERED = False


def register_loss_modes() -> None:
    """Register ``dppo_<name>_{binary,topk}`` in verl for every divergence, now and registered later."""
    global _REGISTERED
    if not _REGISTERED:
        _REGISTERED = True
        add_registration_listener(_register_modes_for)
