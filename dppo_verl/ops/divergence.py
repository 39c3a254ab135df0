"""Divergences between the rollout policy mu and the trainer policy pi over a support set plus a rest bucket.

Notation (used throughout ``dppo_verl.ops``)::

    B   batch (sequences)           T   response tokens per sequence
    K   rollout top-K size          M   support slots per token: 1 (binary) or K + 1 (Top-K)
    V   full vocabulary             V_local = V / tp, one tensor-parallel rank's shard

Every estimator sees the vocabulary partitioned into the M support ids and one "rest" bucket holding all
other tokens (mu_rest = 1 - sum_S mu, pi_rest = 1 - sum_S pi). With M = 1 (the sampled token alone) this is
the Bernoulli {a_t, everything else} of Eqs. 13/14; with M = K + 1 it is Eqs. 15/16. One code path serves
both: binary is Top-K with an empty top-K set. Coarser partitions only lose information, so each value is a
lower bound of the full-vocabulary divergence (data-processing inequality).

Numerics: inputs are log-probabilities, everything is computed in fp32. The rest mass is
``-expm1(logsumexp_S)`` rather than ``1 - sum_S p``: when the support holds almost all the mass (p ~ 1,
the classic bf16 failure) the subtraction cancels catastrophically while expm1 stays exact. Rest buckets are
clamped at ``REST_EPS`` so that a support that (through rounding) sums past 1 never yields log(0) or NaN.
TV needs no rest bucket at all (``mu_rest - pi_rest = sum_S (pi - mu)``) and takes each ``pi - mu`` by expm1 of
the log-ratio, exact at p ~ 1 as well (:func:`tv`).

The registry maps a divergence name to its function and default threshold; the loss layer turns every
registered name into the loss modes ``dppo_<name>_binary`` and ``dppo_<name>_topk``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .registry import NamedRegistry

__all__ = [
    "REST_EPS",
    "DivergenceFn",
    "DivergenceSpec",
    "register_divergence",
    "get_divergence",
    "divergence_names",
    "add_registration_listener",
    "support_probs",
    "tv",
    "kl",
]

# Smallest rest mass (and smallest support probability inside a log) we let through: far below any
# threshold of interest (delta ~ 0.05) and far above fp32's denormals.
REST_EPS = 1e-12

DivergenceFn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class DivergenceSpec:
    """A registered divergence: ``fn(pi_logp, mu_logp, valid=None) -> [...]`` and its default threshold."""

    name: str
    fn: DivergenceFn
    default_delta: float

    def __post_init__(self):
        if not self.name.isidentifier() or "__" in self.name:
            raise ValueError(f"divergence name {self.name!r} must be a Python identifier without '__'")
        if not (math.isfinite(self.default_delta) and self.default_delta > 0):
            raise ValueError(f"divergence {self.name!r}: default_delta must be > 0, got {self.default_delta}")


_REGISTRY: NamedRegistry[DivergenceSpec] = NamedRegistry("divergence")


def register_divergence(name: str, *, default_delta: float) -> Callable[[DivergenceFn], DivergenceFn]:
    """Decorator: register ``fn(pi_logp [..., M], mu_logp [..., M], valid=None) -> [...]`` under ``name``.

    Refuses a name that is already taken (verl's own registry silently overwrites; we do not).
    """

    def decorator(fn: DivergenceFn) -> DivergenceFn:
        _REGISTRY.add(name, DivergenceSpec(name=name, fn=fn, default_delta=float(default_delta)))
        return fn

    return decorator


def get_divergence(name: str) -> DivergenceSpec:
    return _REGISTRY.get(name)


def divergence_names() -> list[str]:
    return _REGISTRY.names()


def add_registration_listener(listener: Callable[[DivergenceSpec], None]) -> None:
    """Call ``listener(spec)`` for every divergence registered so far and every one registered later.

    This is how the loss layer creates ``dppo_<name>_{binary,topk}`` for user-registered divergences without
    this pure-torch module knowing about verl.
    """
    _REGISTRY.listen(listener)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, accurate at both ends (Maechler's switch at -ln 2)."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def support_probs(logp: torch.Tensor, valid: Optional[torch.Tensor]):
    """Probabilities on the support and of the rest bucket, in fp32.

    Args:
        logp: ``[..., M]`` log-probabilities at the support ids (any float dtype; padding may be -inf).
        valid: ``[..., M]`` bool, False for padded or duplicate slots (their mass goes to the rest bucket).

    Returns:
        ``(p [..., M], log_p [..., M], rest [...], log_rest [...])``; invalid slots have p = 0, log_p = -inf.
    """
    logp = logp.float()
    if valid is not None:
        logp = logp.masked_fill(~valid, float("-inf"))
    # log of the support's total mass, clamped so the rest bucket keeps at least REST_EPS.
    log_mass = torch.logsumexp(logp, dim=-1).clamp(max=math.log1p(-REST_EPS))
    log_rest = _log1mexp(log_mass)
    return logp.exp(), logp, log_rest.exp(), log_rest


@register_divergence("tv", default_delta=0.15)
def tv(pi_logp: torch.Tensor, mu_logp: torch.Tensor, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Total variation over support + rest (Eq. 13 for M = 1, Eq. 15 for M = K + 1).

    ``1/2 * (sum_S |mu - pi| + |mu_rest - pi_rest|)``, evaluated as ``1/2 * (sum_S |d| + |sum_S d|)`` with
    ``d = pi - mu`` per slot (``mu_rest - pi_rest = sum_S (pi - mu)`` exactly): no rest bucket, no clamp, no
    log-sum-exp (the two it replaces were the most expensive of the ~20 small ops here). ``d`` is
    ``-pi expm1(-g)`` for ``g = log pi - log mu > 0``, else ``mu expm1(g)``: relative-exact even at p ~ 1, where
    ``pi - mu`` from two ``exp`` would cancel, and smooth through a tie (the predictive direction differentiates
    this function; only ``|d|`` has the kink there). Inputs ``[..., M]``, output ``[...]`` fp32.
    """
    pi, mu = pi_logp.float(), mu_logp.float()
    if valid is not None:
        pi, mu = pi.masked_fill(~valid, float("-inf")), mu.masked_fill(~valid, float("-inf"))
    # 0 where both are -inf (an invalid or zero-mass slot: d = 0) instead of -inf - -inf = NaN
    g = torch.where(torch.maximum(pi, mu) == float("-inf"), 0.0, pi - mu)
    # each branch clamped to its own side so that the one not taken stays finite, in autograd too
    d = torch.where(g > 0, -pi.exp() * torch.expm1(-g.clamp(min=0.0)), mu.exp() * torch.expm1(g.clamp(max=0.0)))
    return 0.5 * (d.abs().sum(-1) + d.sum(-1).abs())


@register_divergence("kl", default_delta=0.05)
def kl(pi_logp: torch.Tensor, mu_logp: torch.Tensor, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """KL(mu || pi) over support + rest (Eq. 14 for M = 1, Eq. 16 for M = K + 1).

    ``sum_S mu log(mu/pi) + mu_rest log(mu_rest/pi_rest)``. Inputs ``[..., M]``, output ``[...]`` fp32.
    Slots with mu = 0 contribute 0 (0 log 0 = 0); pi is floored at REST_EPS inside the log.
    """
    _, log_p, _, log_p_rest = support_probs(pi_logp, valid)
    q, log_q, q_rest, log_q_rest = support_probs(mu_logp, valid)
    floor = math.log(REST_EPS)
    terms = torch.where(q > 0, q * (log_q - log_p.clamp(min=floor)), torch.zeros_like(q))
    return terms.sum(-1) + q_rest * (log_q_rest - log_p_rest)
