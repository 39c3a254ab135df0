"""Loss shapes: how the per-token divergence ``D_t`` weighs a token's policy-gradient term.

Every loss mode is ``<shape>_<divergence>_<estimator>`` (e.g. ``dppo_tv_topk``, ``drpo_tv_binary``); the shape
gives the weight ``w_t`` in the per-token loss (Eq. 11 with ``w_t`` in place of ``M_t``)::

    loss_t = -A_t * stopgrad(min(r_t, C) * w_t) * log pi_t,        grad = -A_t min(r_t, C) w_t grad log pi_t

Shapes (all ``[B, T]``; ``delta_t = delta_high`` if ``A_t > 0`` else ``delta_low``; ``s_t`` the direction: the sign
of ``pi_t - mu_t``, or of ``D_dot_t`` for ``direction=predictive``):

- ``dppo`` (Qi et al., arXiv 2602.04879, Eq. 12): ``w_t = M_t``, the hard trust-region mask.
- ``cppo`` (arXiv 2606.10968): ``w_t = M_t`` with CPPO's position-weighted divergence and prefix-budget thresholds
  (:mod:`.cppo`), through the same mask function.
- ``drpo`` (Yao, Zhou, Qi et al., arXiv 2606.09821): ``w_t = 1 - sign(A_t) s_t D_t / delta_t``, a smooth weight
  instead of a mask: 1 at ``D = 0``, shrinking linearly while the update moves away from ``mu``, exactly 0 at the
  boundary ``D_t = delta_t``, negative (corrective: the gradient pulls back toward ``mu``) beyond it, and above 1
  for moves back toward ``mu``. For Binary TV (``D_t s_t = pi_t - mu_t``) and ``r_t <= C`` the gradient is exactly
  that of the reported DRPO objective ``-A_t r_t + |A_t| (pi_t - mu_t)^2 / (2 delta_t mu_t)``
  (d/d log pi of the penalty is ``|A_t| r_t (pi_t - mu_t) / delta_t``); other registered divergences keep the same
  weight law with their own ``D_t`` and ``delta_t``.

Each shape also returns the Eq. 12 keep-mask of its own thresholds (for ``drpo``: the tokens not beyond the boundary
in the outward direction), which feeds ``masked_frac``. A new shape is a :func:`register_loss_shape` plus its math;
the loss layer turns it into ``<name>_<divergence>_{binary,topk}`` for every registered divergence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Optional

import torch

from .cppo import cppo_thresholds
from .mask import trust_region_mask
from .registry import NamedRegistry

__all__ = [
    "TokenView",
    "ShapeOut",
    "LossShape",
    "register_loss_shape",
    "get_loss_shape",
    "loss_shape_names",
    "add_shape_listener",
    "direction_sign",
]


class TokenView(NamedTuple):
    """What a shape sees, all ``[B, T]`` (``push`` None unless ``direction=predictive``)."""

    divergence: torch.Tensor  # D_t, fp32
    logp: torch.Tensor  # log pi_t, fp32, detached
    mu_logp: torch.Tensor  # log mu_t (the anchor), fp32
    advantages: torch.Tensor  # A_t
    response_mask: torch.Tensor  # bool
    push: Optional[torch.Tensor]  # D_dot_t (predictive direction) or None


class ShapeOut(NamedTuple):
    weight: torch.Tensor  # [B, T] fp32 w_t, detached
    keep: torch.Tensor  # [B, T] bool, the Eq. 12 keep-mask at this shape's thresholds (metrics)


ShapeFn = Callable[[TokenView, Any], ShapeOut]


@dataclass(frozen=True)
class LossShape:
    """A registered shape: ``fn(view, knobs) -> ShapeOut``; ``knobs`` carries ``delta_low``/``delta_high`` and the
    shape's own knobs (duck-typed: this module knows nothing about verl's config)."""

    name: str
    fn: ShapeFn

    def __post_init__(self):
        if not self.name.isidentifier() or "_" in self.name:
            raise ValueError(f"loss shape name {self.name!r} must be an identifier without '_' (modes split on it)")


_SHAPES: NamedRegistry[LossShape] = NamedRegistry("loss shape")


def register_loss_shape(name: str) -> Callable[[ShapeFn], ShapeFn]:
    """Decorator: register a loss shape under ``name`` (refuses a taken name)."""

    def decorator(fn: ShapeFn) -> ShapeFn:
        _SHAPES.add(name, LossShape(name, fn))
        return fn

    return decorator


def get_loss_shape(name: str) -> LossShape:
    return _SHAPES.get(name)


def loss_shape_names() -> list[str]:
    return _SHAPES.names()


def add_shape_listener(listener: Callable[[LossShape], None]) -> None:
    """Call ``listener(shape)`` for every shape registered so far and every one registered later."""
    _SHAPES.listen(listener)


def direction_sign(v: TokenView) -> torch.Tensor:
    """``s_t``: sign of ``pi_t - mu_t`` (Eq. 12) or of ``D_dot_t`` (predictive), in {-1, 0, 1}, ``[B, T]``."""
    return torch.sign(v.logp - v.mu_logp if v.push is None else v.push.float())


def _eq12(v: TokenView, divergence, delta_low, delta_high) -> torch.Tensor:
    return trust_region_mask(divergence, v.logp, v.mu_logp, v.advantages,
                             delta_low=delta_low, delta_high=delta_high, push=v.push)


@register_loss_shape("dppo")
def dppo_shape(v: TokenView, knobs) -> ShapeOut:
    """Eq. 12: w_t = M_t."""
    keep = _eq12(v, v.divergence, knobs.delta_low, knobs.delta_high)
    return ShapeOut(keep.float(), keep)


@register_loss_shape("cppo")
def cppo_shape(v: TokenView, knobs) -> ShapeOut:
    """CPPO: Eq. 12 on ``w_t d_t`` with the prefix-budget thresholds ``tau_t`` (:func:`.cppo.cppo_thresholds`)."""
    scaled, tau_low, tau_high = cppo_thresholds(
        v.divergence, v.response_mask, delta_low=knobs.delta_low, delta_high=knobs.delta_high,
        w_min=knobs.cppo_w_min, delta_pre=knobs.cppo_delta_pre,
    )
    keep = _eq12(v, scaled, tau_low, tau_high)
    return ShapeOut(keep.float(), keep)


@register_loss_shape("drpo")
def drpo_shape(v: TokenView, knobs) -> ShapeOut:
    """DRPO: ``w_t = 1 - sign(A_t) s_t D_t / delta_t`` (zero at the boundary, corrective beyond)."""
    adv = v.advantages.float()
    delta = torch.where(adv > 0, knobs.delta_high, knobs.delta_low)  # [B, T]
    outward = torch.sign(adv) * direction_sign(v)  # +1 away from mu, -1 toward, 0 for A = 0 or no move
    weight = 1.0 - outward * v.divergence.float() / delta
    return ShapeOut(weight, _eq12(v, v.divergence, knobs.delta_low, knobs.delta_high))
