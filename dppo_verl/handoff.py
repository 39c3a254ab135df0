"""The hand-off from the actor integration to the policy loss (SPEC: "How mu reaches the loss").

verl 0.9.1's ``ppo_loss`` passes a policy loss exactly seven arguments and never ``rollout_log_probs``, and
the FSDP logits hook can only return per-token scalars. So the actor integration's ``ppo_loss`` wrapper
(the producer) reads what DPPO needs from the micro-batch, puts it in a :class:`HandOff`, and runs verl's
``ppo_loss`` inside :func:`handoff_scope`; the DPPO losses (the consumers) read it with
:func:`current_handoff`. A ``ContextVar`` keeps concurrent micro-batches (threads, asyncio) apart.

All tensors are per response token, ``[B, T]`` in the padded layout the policy loss receives.
Batch / model-output keys (contract names): ``rollout_log_probs``, ``dppo_divergence``,
``dppo_support_size``, ``dppo_ddot``, ``dppo_topk_valid``, ``dppo_excluded_log_ratio``.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch

from .ops.checks import DeferredChecks
from .contract import TOKEN_OUTPUT_KEYS  # per-token outputs of the Top-K logits hook (keys of verl's model_output)

__all__ = ["HandOff", "handoff_scope", "current_handoff", "TOKEN_OUTPUT_KEYS", "defer_hook_checks", "take_hook_checks"]


@dataclass
class HandOff:
    rollout_log_probs: Optional[torch.Tensor] = None  # [B, T] log mu(a_t)
    divergence: Optional[torch.Tensor] = None  # [B, T] dppo_divergence (Top-K modes)
    support_size: Optional[torch.Tensor] = None  # [B, T] dppo_support_size (valid slots, 1..K+1)
    ddot: Optional[torch.Tensor] = None  # [B, T] dppo_ddot (direction=predictive)
    topk_valid: Optional[torch.Tensor] = None  # [B, T] dppo_topk_valid (Top-K row status codes, ops.consistency)
    # [B, T] dppo_excluded_log_ratio: log(mass on ids the rollout never samples / pi(a_t)) (ops.sampled_vocab)
    excluded_log_ratio: Optional[torch.Tensor] = None
    # [B, T] dppo_start_divergence: D_t from the anchor at the step's start (verl's pi_old pass; None when skipped)
    start_divergence: Optional[torch.Tensor] = None
    # (b, t) -> the token's rollout data in words, for error messages (reads the micro-batch; error path only)
    describe_token: Optional[Callable[[int, int], str]] = None
    # the Top-K hook's queued data checks (rollout data, ids, finite logits), read with the loss's metrics
    checks: Optional[DeferredChecks] = None


_CURRENT: ContextVar[Optional[HandOff]] = ContextVar("dppo_verl_handoff", default=None)


@contextmanager
def handoff_scope(handoff: HandOff) -> Iterator[HandOff]:
    token = _CURRENT.set(handoff)
    try:
        yield handoff
    finally:
        _CURRENT.reset(token)


def current_handoff() -> Optional[HandOff]:
    return _CURRENT.get()


# The Top-K hook (the engine's logits-processor call) runs just before the loss of the same micro-batch, in the
# same thread; its data checks wait here so that the loss reads them with its metrics: one device read per
# micro-batch instead of one per check. Checks that no loss takes (a forward-only call) are read at the latest
# when _MAX_PENDING have piled up, never dropped.
_PENDING = threading.local()
_MAX_PENDING = 16  # hook calls whose checks no loss has taken (forward-only passes): then they are read on the spot


def defer_hook_checks(checks: DeferredChecks) -> None:
    """Queue one hook call's checks for the next loss read in this thread."""
    pending = _PENDING.__dict__.setdefault("items", DeferredChecks())
    pending.extend(checks)
    _PENDING.calls = getattr(_PENDING, "calls", 0) + 1
    if _PENDING.calls > _MAX_PENDING:
        take_hook_checks().run()


def take_hook_checks() -> Optional[DeferredChecks]:
    """The queued checks of the hook calls since the last take (None when there are none)."""
    _PENDING.calls = 0
    pending = _PENDING.__dict__.pop("items", None)
    return pending if pending is not None and len(pending) else None
