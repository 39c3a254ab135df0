"""vLLM rollout server: return the engine's top-K of the sampling distribution for every generated token.

verl 0.9.1's ``vLLMHttpServer.generate`` (``verl/workers/rollout/vllm_rollout/vllm_async_server.py``) asks vLLM
for ``logprobs=0`` (the sampled token only) and returns ``TokenOutput(log_probs=...)``. When the rollout config
has ``custom.dppo_num_topk = K`` (set by our launcher for Top-K modes; binary modes request nothing extra) this
runtime patch, request by request:

1. runs verl's ``generate`` in its own context holding a :class:`_TopKRequest` (concurrent requests share one
   event loop, so the request state lives in a ``ContextVar``, never on the server object);
2. builds the request's ``SamplingParams`` with ``logprobs=K`` (verl's 0 -> K) and ``flat_logprobs=True`` (a few
   flat lists instead of G dicts of K+1 ``Logprob`` objects), and ``detokenize=False`` unless the request has stop
   strings (verl uses token ids only; detokenizing K+1 candidates per token is the main CPU cost of logprobs);
3. when the engine's output stream ends, reads ranks 1..K into ``[G, K]`` arrays and hands verl a slimmed
   ``logprobs`` holding only the sampled entry (verl's own sampled-token extraction is unchanged);
4. adds ``rollout_topk_ids`` (int32) / ``rollout_topk_logprobs`` (fp32) ``[G, K]`` to ``TokenOutput.extra_fields``,
   where verl's agent loops pick them up (see :mod:`.agent_loop`).

Which distribution the log-probs describe is the engine's ``logprobs_mode`` (``processed_logprobs`` = after
temperature, the one the token was sampled from); :mod:`.rollout_rules` requires it at launch.
``patches/verl-0.9.1-vllm-rollout-topk.diff`` makes the same change in verl's source; the two must not be
combined (the patch refuses to wrap a server already patched that way).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from . import mark_applied
from ._lazy import when_imported
from .rollout_topk import requested_topk, topk_arrays_from_flat, topk_arrays_from_vllm
from .topk_hook import TOPK_KEYS

__all__ = ["apply_vllm_server_topk", "MODULE", "PATCHED_SOURCE_MARKER"]

MODULE = "verl.workers.rollout.vllm_rollout.vllm_async_server"
PATCHED_SOURCE_MARKER = "DPPO_TOPK_PATCHED"  # left in verl's source by the patches/ diff


@dataclass
class _TopKRequest:
    k: int
    arrays: Optional[tuple[np.ndarray, np.ndarray]] = None  # ([G, K] int32, [G, K] fp32)


_REQUEST: contextvars.ContextVar[Optional[_TopKRequest]] = contextvars.ContextVar("dppo_vllm_topk", default=None)


# Ray pickles the server class by value (cloudpickle), wrappers included; a ContextVar cannot be pickled, so the
# wrappers below reach it only through these module-level functions (pickled by reference).
def _current_request() -> Optional[_TopKRequest]:
    return _REQUEST.get()


def _context_with(req: _TopKRequest) -> contextvars.Context:
    ctx = contextvars.copy_context()
    ctx.run(_REQUEST.set, req)
    return ctx


def _sampling_params_factory(cls):
    """Stands in for ``SamplingParams`` inside verl's server module only: a no-op without a top-K request."""

    @functools.wraps(cls, updated=())
    def make(*args, **kwargs):
        req = _current_request()
        if req is not None:
            if kwargs.get("logprobs") is None:
                raise ValueError(
                    "dppo_verl: the Top-K loss needs rollout log-probs but this request did not ask for any: "
                    "set actor_rollout_ref.rollout.calculate_log_probs=True"
                )
            kwargs["logprobs"] = req.k
            kwargs["flat_logprobs"] = True
            if not kwargs.get("stop"):
                kwargs.setdefault("detokenize", False)
        return cls(*args, **kwargs)

    make.dppo_wrapped = cls
    return make


def _capture(req: _TopKRequest, final) -> None:
    """Final ``RequestOutput`` -> top-K arrays on ``req``; slim ``outputs[0].logprobs`` to the sampled entries."""
    completion = final.outputs[0]
    logprobs = completion.logprobs
    if logprobs is None:
        raise ValueError("vLLM returned no logprobs although the request asked for top-K")
    if hasattr(logprobs, "start_indices"):  # FlatLogprobs
        req.arrays = topk_arrays_from_flat(logprobs, req.k)
        completion.logprobs = _sampled_only(logprobs)
    else:
        req.arrays = topk_arrays_from_vllm(logprobs, req.k)


def _sampled_only(flat):
    """A ``FlatLogprobs`` with the first entry of every position (the sampled token, with its true rank)."""
    first = list(flat.start_indices)
    return type(flat)(
        start_indices=list(range(len(first))),
        end_indices=list(range(1, len(first) + 1)),
        token_ids=[flat.token_ids[i] for i in first],
        logprobs=[flat.logprobs[i] for i in first],
        ranks=[flat.ranks[i] for i in first],
        decoded_tokens=[flat.decoded_tokens[i] if flat.decoded_tokens else None for i in first],
    )


def _wrap_engine_generate(orig):
    @functools.wraps(orig)
    async def generate(self, *args, **kwargs):
        req = _current_request()
        last = None
        async for output in orig(self, *args, **kwargs):
            last = output
            yield output
        # Runs when verl's ``async for`` asks past the last output, i.e. before verl reads ``final_res``.
        if req is not None and last is not None and last.outputs:
            _capture(req, last)

    generate.dppo_wrapped = orig
    return generate


def _ensure_engine_patched(engine) -> None:
    cls = type(engine)
    if not hasattr(cls.generate, "dppo_wrapped"):
        cls.generate = _wrap_engine_generate(cls.generate)


def _wrap_server_generate(orig):
    @functools.wraps(orig)
    async def generate(self, *args, **kwargs):
        k = requested_topk(self.config)
        if k is None:
            return await orig(self, *args, **kwargs)
        _ensure_engine_patched(self.engine)
        req = _TopKRequest(k)
        out = await asyncio.create_task(orig(self, *args, **kwargs), context=_context_with(req))
        if out.stop_reason == "aborted" and not out.token_ids:
            return out  # verl re-submits aborted requests; nothing was generated
        if req.arrays is None:
            raise RuntimeError("dppo_verl: vLLM finished a top-K request without returning its logprobs")
        ids, logp = req.arrays
        if ids.shape[0] != len(out.token_ids):
            raise RuntimeError(f"vLLM top-K has {ids.shape[0]} rows for {len(out.token_ids)} generated tokens")
        out.extra_fields.update(dict(zip(TOPK_KEYS, (ids, logp))))
        return out

    generate.dppo_wrapped = orig
    return generate


def _patch(module) -> None:
    from .._compat import require

    cls = require(module, "vLLMHttpServer")
    require(cls, "generate")
    import inspect

    if PATCHED_SOURCE_MARKER in inspect.getsource(cls.generate):
        return  # verl was patched from patches/: the source change already does this
    if not hasattr(cls.generate, "dppo_wrapped"):
        cls.generate = _wrap_server_generate(cls.generate)
    sp = require(module, "SamplingParams")
    if not hasattr(sp, "dppo_wrapped"):
        module.SamplingParams = _sampling_params_factory(sp)


def apply_vllm_server_topk() -> None:
    """Patch verl's vLLM server when its module is imported (idempotent; inert without ``dppo_num_topk``)."""
    if mark_applied("vllm_server_topk"):
        when_imported(MODULE, _patch)
