"""``policy_loss.fused_logprobs``: the Top-K hook's read of the logits also yields verl's ``log_probs`` (issue #10).

In a Top-K mode both engines call our logits processor and *then*, on the same logits, their own sampled-token
pass (verl_0.9.1_internals.md §4.1; checked in the installed verl):

- FSDP ``FSDPEngineWithLMHead.prepare_model_outputs``: processor, then
  ``logprobs_from_logits(logits=logits_rmpad, labels=input_ids_rmpad_rolled)`` (rmpad and non-rmpad branches);
- Megatron ``MegatronEngineWithLMHead._lm_head_logits_processor``: processor (:1237), then
  ``vocab_parallel_log_probs_from_logits(logits_bak, label)`` (:1239).

So the hand-off runs forwards. With the option on, the processor computes log pi(label) with
:func:`dppo_verl.ops.fused_logprob.fused_logprobs` (the same Triton pass as the support log-probs, with a
gradient) and :func:`offer` parks it; our wrapper of the engine's log-prob function returns it instead of
reading the logits again, and only when the call is for the very same logits (data pointer, rows, strides, dtype,
version counter: an in-place write in between means "not the same") and the very same label tensor object.
Anything else goes to verl's original (with a warning when a parked result goes unused, so a changed engine
cannot silently cost a second read). The processor needs verl's labels, which it is not given:
:mod:`.engine_context` exposes them (:func:`current_labels`) for the duration of the two engine methods above, and
the parked result is dropped when that call ends, so nothing outlives its micro-batch and no reference to the logits
is kept beyond autograd's own.
"""

from __future__ import annotations

import functools
import logging
from typing import NamedTuple, Optional

import torch

from ..patching import patch_on_import
from .engine_context import EngineCall, current_call, on_exit

__all__ = ["STATS", "apply_fused_logprob_handoff", "current_labels", "flat_rows", "offer", "require_triton"]

logger = logging.getLogger(__name__)
FSDP_MODULE = "verl.workers.engine.fsdp.transformer_impl"
MEGATRON_MODULE = "verl.workers.engine.megatron.transformer_impl"
KEY = "actor_rollout_ref.actor.policy_loss.fused_logprobs"
STATS = {"handed_off": 0, "verl_pass": 0, "unused": 0}  # per process; read by tests and for debugging


class _Parked(NamedTuple):
    logits_key: tuple
    labels: torch.Tensor
    labels_version: int
    logp: torch.Tensor  # labels' shape, fp32, with grad




def _logits_key(logits: torch.Tensor) -> Optional[tuple]:
    """Identity of the rows of ``[..., V]`` logits, independent of a leading size-1 dim (FSDP hands the processor
    ``logits_rmpad.unsqueeze(0)`` and the log-prob pass ``logits_rmpad``); None when rows cannot be viewed flat."""
    try:
        rows = logits.view(-1, logits.shape[-1])
    except RuntimeError:
        return None
    return (rows.data_ptr(), tuple(rows.shape), tuple(rows.stride()), rows.dtype, rows.device, logits._version)


def _warn_unused(call: EngineCall) -> None:
    """At the end of an engine call: a fused result the engine's log-prob pass did not take means a second read."""
    if call.parked:
        STATS["unused"] += 1
        logger.warning("dppo_verl: %s=True computed log pi(a_t) but the engine's log-prob pass did not take it "
                       "(the logits or labels differ); verl's own pass read the logits again", KEY)


on_exit(_warn_unused)


def require_triton(logits: torch.Tensor) -> None:
    """The fused op runs Triton kernels: refuse, naming the key, where they cannot run."""
    from ...ops.kernels import load_vocab_stats_triton

    try:
        kernels = load_vocab_stats_triton()
    except ImportError as e:
        raise ValueError(f"{KEY}=True needs the `triton` package (CUDA builds of torch ship it); "
                         "install it or set fused_logprobs=False") from e
    if logits.device.type == "cpu" and not kernels.INTERPRETED:
        raise ValueError(f"{KEY}=True runs Triton kernels, which need GPU logits (got CPU; the interpreter, "
                         "TRITON_INTERPRET=1, is for tests): set fused_logprobs=False on CPU")


def flat_rows(logits: torch.Tensor) -> torch.Tensor:
    """``[..., V_local]`` -> ``[R, V_local]`` as a view (never a copy of the logits), or a ValueError."""
    try:
        return logits.view(-1, logits.shape[-1])
    except RuntimeError as e:
        raise ValueError(f"{KEY}=True needs logits whose rows flatten without a copy; got shape "
                         f"{list(logits.shape)} strides {logits.stride()}: set fused_logprobs=False") from e


def current_labels(logits: torch.Tensor) -> torch.Tensor:
    """verl's labels for the engine call in progress, shaped like ``logits.shape[:-1]`` (error if unavailable)."""
    call = current_call()
    labels = None if call is None else call.labels
    if labels is None:
        raise RuntimeError(
            f"{KEY}=True: no verl engine call exposes the labels here (the processor must run inside "
            "FSDPEngineWithLMHead.prepare_model_outputs or MegatronEngineWithLMHead._lm_head_logits_processor, "
            "patched by dppo_verl.integrations.actor.engine_context.apply_engine_context)"
        )
    if labels.numel() != logits[..., 0].numel():
        raise ValueError(f"{KEY}=True: verl's labels {list(labels.shape)} do not match the logits rows "
                         f"{list(logits.shape[:-1])}")
    return labels


def offer(logits: torch.Tensor, labels: torch.Tensor, logp: torch.Tensor) -> None:
    """Park log pi(labels) (shaped like ``labels``) computed from ``logits`` for the engine's log-prob pass of
    this call. The caller shapes it under grad mode: a view made under no_grad would cut the graph."""
    call = current_call()
    parked = None if call is None else call.parked
    key = _logits_key(logits)
    if parked is None or key is None:
        raise RuntimeError(f"{KEY}=True: nothing to hand log pi(a_t) to (no engine call in progress, or logits "
                           f"{list(logits.shape)} strides {logits.stride()} whose rows do not flatten)")
    if logp.shape != labels.shape:
        raise ValueError(f"{KEY}=True: log pi(a_t) {list(logp.shape)} is not shaped like verl's labels {list(labels.shape)}")
    parked[:] = [_Parked(key, labels, labels._version, logp)]


def _take(logits: torch.Tensor, labels: torch.Tensor) -> Optional[torch.Tensor]:
    call = current_call()
    parked = None if call is None else call.parked
    if not parked:
        return None
    p = parked[0]
    if p.labels is not labels or p.labels_version != labels._version or p.logits_key != _logits_key(logits):
        return None  # not our call: verl's original runs (and the engine call warns that ours went unused)
    parked.clear()
    STATS["handed_off"] += 1
    return p.logp


def _wrap_logprob_fn(orig):
    """verl's sampled-token log-prob function (``(logits, labels, ...)``), taking our parked result when it fits."""

    @functools.wraps(orig)
    def logprobs(logits, labels, *args, **kwargs):
        got = _take(logits, labels)
        if got is not None:
            return got
        STATS["verl_pass"] += 1
        return orig(logits, labels, *args, **kwargs)

    return logprobs


# (module, verl's sampled-token log-prob function there, its signature)
_TARGETS = (
    (FSDP_MODULE, "logprobs_from_logits", "logits, labels, inplace_backward="),
    (MEGATRON_MODULE, "vocab_parallel_log_probs_from_logits", "logits, labels"),
)


def apply_fused_logprob_handoff() -> None:
    """Wrap the two engines' sampled-token log-prob functions when each engine module is first imported. Inert
    unless the option is on: the wrappers find nothing parked. The labels come from :mod:`.engine_context`."""
    for module, fn, signature in _TARGETS:
        engine = module.rsplit(".", 2)[-2]  # fsdp | megatron
        patch_on_import(module, fn, _wrap_logprob_fn, name=f"actor.fused_logprob.{engine}", signature=signature,
                        needed_by="fused")
