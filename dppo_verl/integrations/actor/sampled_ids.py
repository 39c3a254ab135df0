"""Actor side: which ids the rollout engine samples from, for the one normalisation of mu and pi
(:mod:`dppo_verl.ops.sampled_vocab`, knob ``policy_loss.sampled_ids``).

- ``vllm`` (default): what verl 0.9.1's vLLM server samples from. ``vLLMHttpServer.run_server`` calls
  ``monkey_patch_model(vocab_size=len(tokenizer), banned_token_ids=get_vision_placeholder_token_ids(processor))``,
  which sets those logits to -inf; the actor engine holds the same ``HFModelConfig`` (tokenizer and processor from
  ``actor_rollout_ref.model``), so the same two calls here give the same set.
- ``all``: every head row (verl 0.9.1's SGLang server masks nothing; the launch rules ask for it there).

The engine's ``train_batch`` wrapper (:mod:`.engine_flag`) resolves the set once per call and exposes it for the
duration of that call (a ``ContextVar``) to the logits hook and the loss, which run inside it.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator, Optional

import torch

from ...contract import OUT_EXCLUDED, SAMPLED_IDS_KNOB
from ...ops.sampled_vocab import SampledIds, excluded_stats

__all__ = ["sampled_ids_of", "sampled_ids_scope", "current_sampled_ids", "excluded_outputs"]

_CURRENT: contextvars.ContextVar[Optional[SampledIds]] = contextvars.ContextVar("dppo_sampled_ids", default=None)


def sampled_ids_of(model_config, choice: str) -> SampledIds:
    """The samplable ids for knob value ``choice`` from the engine's ``HFModelConfig``."""
    if choice == "all":
        return SampledIds()
    tokenizer = getattr(model_config, "tokenizer", None)
    if tokenizer is None:
        raise ValueError(
            f"{SAMPLED_IDS_KNOB}=vllm needs the actor's tokenizer (verl's vLLM server masks ids >= len(tokenizer)) "
            f"but the actor model config has none (model.load_tokenizer=False?); set {SAMPLED_IDS_KNOB}=all only if "
            "the rollout engine samples from every row of the model's head")
    from verl.workers.rollout.utils import get_vision_placeholder_token_ids

    banned = get_vision_placeholder_token_ids(getattr(model_config, "processor", None))
    return SampledIds(limit=len(tokenizer), banned=tuple(int(b) for b in banned))


@contextlib.contextmanager
def sampled_ids_scope(ids: Optional[SampledIds]) -> Iterator[None]:
    token = _CURRENT.set(ids)
    try:
        yield
    finally:
        _CURRENT.reset(token)


def current_sampled_ids() -> Optional[SampledIds]:
    """The set of the engine call in progress; None outside one (the hook and the loss then correct nothing)."""
    return _CURRENT.get()


def excluded_outputs(student_logits: torch.Tensor, ids: SampledIds, *, tp_group=None) -> dict:
    """Binary modes' logits-processor call: ``dppo_excluded_log_ratio`` ``[b, s]`` (the logits' leading shape), from
    verl's own labels for these logits (the engine call in progress, :mod:`.engine_context`)."""
    from .engine_context import current_call
    from .layout import logit_slabs

    call = current_call()
    labels = None if call is None else call.labels
    lead = tuple(student_logits.shape[:-1])
    if labels is None or labels.numel() != student_logits[..., 0].numel():
        raise ValueError(
            f"dppo_verl: the engine's labels for logits {list(student_logits.shape)} are not available "
            f"({None if labels is None else list(labels.shape)}), so the mass on ids the rollout never samples "
            f"cannot be measured; the actor integration must be active (or set {SAMPLED_IDS_KNOB}=all if the "
            "rollout samples from every head row)")
    g = [excluded_stats(logits, part["labels"], ids, tp_group=tp_group).log_ratio
         for logits, part in logit_slabs(student_logits, {"labels": labels.reshape(lead)})]
    return {OUT_EXCLUDED: torch.stack(g).view(lead)}
