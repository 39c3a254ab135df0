"""Rollout client, verl surface ``verl.workers.rollout.llm_server``: keep the rollout top-K through verl's resume loop.

verl 0.9.1's V1 async trainers (``colocate_async``, ``separate_async``) talk to the rollout servers through
``FullyAsyncLLMServerClient.generate``. When the trainer aborts generation for a weight update, that client
re-submits the request (prompt + tokens so far) and merges the attempts into a *fresh* ``TokenOutput``: token ids,
log-probs and routed experts are concatenated, but of the servers' ``extra_fields`` only the step numbers survive,
so the per-token top-K (``rollout_topk_ids`` / ``rollout_topk_logprobs`` ``[G_i, K]``, put there by
:mod:`.vllm_server` / :mod:`.sglang_server`) never reached the actor.

Two wrappers, for every request (binary modes and non-DPPO runs included; a request whose attempts carry no
top-K is returned untouched):

1. ``FullyAsyncLLMServerClient.generate`` runs verl's resume loop with a per-request :class:`_Attempts` collector in
   a ``ContextVar`` (concurrent requests are separate asyncio tasks, each with its own context);
2. ``LLMServerClient.generate`` (the loop's ``super().generate``, one call per attempt) appends each attempt's
   token count and top-K arrays to the collector, when there is one (the synchronous trainer has none and its
   client returns the server's ``TokenOutput`` as is, top-K included);
3. after the loop, the attempts' rows are concatenated in token order into the final ``extra_fields``. A resumed
   request's rows then span policy versions, exactly like its ``log_probs``: each token keeps the distribution
   (mu) it was sampled from. An attempt aborted before its first token contributes no row.
"""

from __future__ import annotations

import contextvars
import functools
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from ...contract import TOPK_KEYS
from ..patching import patch_on_import

__all__ = ["apply_async_client_topk", "merge_attempts", "MODULE", "SIGNATURE"]

MODULE = "verl.workers.rollout.llm_server"
# Both classes' ``generate`` (through verl's ``rollout_trace_op``, which keeps the signature).
SIGNATURE = ("self, request_id, *, prompt_ids, sampling_params, image_data=, video_data=, audio_data=, "
             "mm_processor_kwargs=, **kwargs")


@dataclass
class _Attempts:
    """One request's attempts, in order: generated tokens and the top-K arrays (None when the server sent none)."""

    tokens: list[int] = field(default_factory=list)
    arrays: list[Optional[tuple[np.ndarray, np.ndarray]]] = field(default_factory=list)


_ATTEMPTS: contextvars.ContextVar[Optional[_Attempts]] = contextvars.ContextVar("dppo_async_attempts", default=None)


# Ray may pickle the client class by value (cloudpickle) and a ContextVar cannot be pickled: the wrappers reach it
# only through these module-level functions (pickled by reference).
def _current() -> Optional[_Attempts]:
    return _ATTEMPTS.get()


def _enter(attempts: _Attempts):
    return _ATTEMPTS.set(attempts)


def _leave(token) -> None:
    _ATTEMPTS.reset(token)


def _topk_of(extra: dict, request_id) -> Optional[tuple[np.ndarray, np.ndarray]]:
    ids, logp = (extra.get(k) for k in TOPK_KEYS)
    if (ids is None) != (logp is None):
        raise ValueError(f"request {request_id}: the rollout server returned only one of {TOPK_KEYS} in extra_fields")
    return None if ids is None else (np.asarray(ids), np.asarray(logp))


def merge_attempts(attempts: _Attempts, total_tokens: int, request_id=None):
    """The attempts' ``[G_i, K]`` rows concatenated in token order -> ``([G, K] int32, [G, K] fp32)``, or None when
    no attempt carried a top-K. Every attempt that generated tokens must carry exactly one row per token."""
    if all(a is None for a in attempts.arrays):
        return None
    ids_parts, logp_parts, k = [], [], None
    for i, (n, arrays) in enumerate(zip(attempts.tokens, attempts.arrays)):
        if arrays is None:
            if n:
                raise ValueError(
                    f"request {request_id}: attempt {i} generated {n} tokens without a rollout top-K while other "
                    f"attempts carried one ({TOPK_KEYS}): every rollout server must return the top-K")
            continue  # aborted before its first token: nothing to merge
        ids, logp = arrays
        if ids.ndim != 2 or logp.shape != ids.shape or ids.shape[0] != n or (k is not None and ids.shape[1] != k):
            raise ValueError(
                f"request {request_id}: attempt {i} returned top-K arrays of shapes {list(ids.shape)} / "
                f"{list(logp.shape)} for {n} generated tokens (K={k} in earlier attempts): expected [{n}, K]")
        k = ids.shape[1]
        ids_parts.append(ids.astype(np.int32, copy=False))
        logp_parts.append(logp.astype(np.float32, copy=False))
    if sum(attempts.tokens) != total_tokens:
        raise ValueError(f"request {request_id}: the attempts generated {sum(attempts.tokens)} tokens but the merged "
                         f"response has {total_tokens}: verl's resume loop changed; rows would not line up")
    return np.concatenate(ids_parts), np.concatenate(logp_parts)


def _wrap_attempt(orig):
    """``LLMServerClient.generate``: one attempt; recorded when a resume loop is collecting."""

    @functools.wraps(orig)
    async def generate(self, request_id, **kwargs):
        output = await orig(self, request_id, **kwargs)
        attempts = _current()
        if attempts is not None:
            attempts.tokens.append(len(output.token_ids))
            attempts.arrays.append(_topk_of(output.extra_fields, request_id))
        return output

    return generate


def _wrap_resume_loop(orig):
    """``FullyAsyncLLMServerClient.generate``: verl's resume loop, then the attempts' top-K rows merged in."""

    @functools.wraps(orig)
    async def generate(self, request_id, **kwargs):
        attempts = _Attempts()
        token = _enter(attempts)
        try:
            output = await orig(self, request_id, **kwargs)
        finally:
            _leave(token)
        merged = merge_attempts(attempts, len(output.token_ids), request_id)
        if merged is not None:
            output.extra_fields.update(dict(zip(TOPK_KEYS, merged)))
        return output

    return generate


def apply_async_client_topk() -> None:
    """Wrap both clients' ``generate`` when ``verl.workers.rollout.llm_server`` is imported (idempotent)."""
    patch_on_import(MODULE, "LLMServerClient.generate", _wrap_attempt, name="rollout.client.attempt",
                    signature=SIGNATURE, needed_by="topk")
    patch_on_import(MODULE, "FullyAsyncLLMServerClient.generate", _wrap_resume_loop, name="rollout.client.resume_loop",
                    signature=SIGNATURE, needed_by="topk")
