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
temperature, the one the token was sampled from); :mod:`dppo_verl.launch.rollout_rules` requires it at launch.
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

from ...contract import CALCULATE_LOG_PROBS, PATCHED_SOURCE_MARKER, TOPK_KEYS
from ..patching import patch_attr, raise_if_drifted, record_applied, record_drift, source_has_marker, when_imported
from .topk_arrays import k_vocabulary_problem, requested_topk

__all__ = ["apply_vllm_server_topk", "MODULE", "topk_arrays_from_flat", "topk_arrays_from_vllm"]

MODULE = "verl.workers.rollout.vllm_rollout.vllm_async_server"
GENERATE_SIGNATURE = ("self, prompt_ids, sampling_params, request_id, image_data=, video_data=, audio_data=, "
                      "mm_processor_kwargs=, priority=, kv_transfer_params=")


# --- vLLM's logprob containers -> [G, K] arrays -----------------------------------------------------------


def topk_arrays_from_vllm(step_logprobs: Sequence[Mapping[int, Any]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """vLLM's ``CompletionOutput.logprobs`` (one ``{token_id: Logprob(logprob, rank, ...)}`` per generated token,
    holding the top-K plus the sampled token when it ranks below K) -> ``([T, K] int32, [T, K] float32)``.

    Slots are filled by rank (1-based); entries ranked beyond K (the extra sampled token) are dropped.
    """
    t = len(step_logprobs)
    ids = np.zeros((t, k), dtype=np.int32)
    lps = np.full((t, k), -np.inf, dtype=np.float32)
    for i, entries in enumerate(step_logprobs):
        if entries is None:
            raise ValueError(f"vLLM returned no logprobs for generated token {i}: the request must set logprobs={k}")
        for token_id, lp in entries.items():
            rank = getattr(lp, "rank", None)
            if rank is None:
                raise ValueError(f"vLLM logprob entry for token {token_id} at position {i} has no rank")
            if 1 <= rank <= k:
                ids[i, rank - 1] = token_id
                lps[i, rank - 1] = lp.logprob
    return _pad_missing(ids, lps)


def _pad_missing(ids: np.ndarray, logp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ranks the engine could not fill with a samplable token come back with log-prob -inf (K above the number of
    ids the engine samples from: verl masks ids >= len(tokenizer) and banned ids to -inf). They are stored as the
    data contract's padding, id 0 / -inf, so every consumer sees one form of "no candidate" (the loss side drops
    -inf slots, :func:`dppo_verl.ops.support.build_support`)."""
    ids[np.isneginf(logp)] = 0
    return ids, logp


def topk_arrays_from_flat(flat: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
    """vLLM's ``FlatLogprobs`` (``SamplingParams(flat_logprobs=True)``) -> ``([G, K] int32, [G, K] float32)``.

    With ``logprobs=K`` vLLM stores K+1 entries per position: the sampled token first (its own rank, which may
    exceed K), then ranks 1..K in order (vllm/logprobs.py ``append_logprobs_for_next_position``). We read the
    flat lists with numpy instead of building G dicts of K+1 ``Logprob`` objects; the layout is checked, not
    assumed: any other rank pattern raises. vLLM always returns K+1 entries (K at most the model's vocabulary, see
    :func:`_check_k_fits`); ranks without a samplable token carry -inf and become id 0 / -inf padding.
    """
    starts = np.asarray(flat.start_indices, dtype=np.int64)
    ends = np.asarray(flat.end_indices, dtype=np.int64)
    g = starts.shape[0]
    if g == 0:
        return np.zeros((0, k), dtype=np.int32), np.zeros((0, k), dtype=np.float32)
    if not np.all(ends - starts == k + 1):
        raise ValueError(
            f"vLLM flat logprobs hold {sorted(set((ends - starts).tolist()))} entries per position, expected "
            f"{k + 1} (sampled token + top-{k}): was the request sent with logprobs={k}?"
        )
    at = starts[:, None] + np.arange(1, k + 1)  # [G, K] flat indices of ranks 1..K (skip the sampled entry)
    ranks = np.asarray(flat.ranks, dtype=np.int64)[at]
    if not np.array_equal(ranks, np.broadcast_to(np.arange(1, k + 1), (g, k))):
        bad = int(np.flatnonzero((ranks != np.arange(1, k + 1)).any(axis=1))[0])
        raise ValueError(f"vLLM flat logprobs at position {bad} have ranks {ranks[bad].tolist()}, expected 1..{k}")
    ids = np.asarray(flat.token_ids, dtype=np.int32)[at]
    logp = np.asarray(flat.logprobs, dtype=np.float32)[at]
    return _pad_missing(np.ascontiguousarray(ids), np.ascontiguousarray(logp))



# --- runtime patch -------------------------------------------------------------------------------------------


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
                    f"set {CALCULATE_LOG_PROBS}=True"
                )
            kwargs["logprobs"] = req.k
            kwargs["flat_logprobs"] = True
            if not kwargs.get("stop"):
                kwargs.setdefault("detokenize", False)
        return cls(*args, **kwargs)

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

    return generate


def _ensure_engine_patched(engine) -> None:
    """The engine class is only known at request time (vLLM's AsyncLLM, or verl's wrapper of it)."""
    if not patch_attr(type(engine), "generate", _wrap_engine_generate, name="rollout.vllm.engine_generate",
                      signature=("prompt", "sampling_params", "request_id"), needed_by="topk"):
        raise_if_drifted(("topk",), "rollout top-K (vLLM)")


def _check_k_fits(engine, k: int) -> None:
    """Refuse K above the model's vocabulary before the request reaches vLLM, whose engine core would die on it."""
    model_config = getattr(engine, "model_config", None)
    vocab = getattr(model_config, "get_vocab_size", lambda: None)()
    problem = k_vocabulary_problem(k, vocab, "vLLM model_config.get_vocab_size()")
    if problem:
        raise ValueError(f"dppo_verl: {problem}")


def _wrap_server_generate(orig):
    @functools.wraps(orig)
    async def generate(self, *args, **kwargs):
        k = requested_topk(self.config)
        if k is None:
            return await orig(self, *args, **kwargs)
        _ensure_engine_patched(self.engine)
        _check_k_fits(self.engine, k)
        req = _TopKRequest(k)
        # A task created inside ctx.run copies ctx (Python 3.10 has no create_task(context=)): the request state
        # is this task's alone.
        out = await _context_with(req).run(asyncio.ensure_future, orig(self, *args, **kwargs))
        if out.stop_reason == "aborted" and not out.token_ids:
            return out  # verl re-submits aborted requests; nothing was generated
        if req.arrays is None:
            raise RuntimeError("dppo_verl: vLLM finished a top-K request without returning its logprobs")
        ids, logp = req.arrays
        if ids.shape[0] != len(out.token_ids):
            raise RuntimeError(f"vLLM top-K has {ids.shape[0]} rows for {len(out.token_ids)} generated tokens")
        out.extra_fields.update(dict(zip(TOPK_KEYS, (ids, logp))))
        return out

    return generate


def patch_module(module) -> None:
    """Patch verl's vLLM server module (``vLLMHttpServer.generate`` and the module's ``SamplingParams``), or stand
    aside when verl's source already carries the patches/ diff."""
    server = getattr(module, "vLLMHttpServer", None)
    if server is not None and source_has_marker(getattr(server, "generate", None), PATCHED_SOURCE_MARKER):
        record_applied("rollout.vllm.generate", f"{MODULE}.vLLMHttpServer.generate (patches/ diff: stood aside)", "topk")
        return
    if server is None:
        record_drift("rollout.vllm.generate", f"{MODULE}.vLLMHttpServer", "topk", "does not exist")
        return
    patch_attr(server, "generate", _wrap_server_generate, name="rollout.vllm.generate", signature=GENERATE_SIGNATURE,
               needed_by="topk", target=f"{MODULE}.vLLMHttpServer.generate")
    patch_attr(module, "SamplingParams", _sampling_params_factory, name="rollout.vllm.sampling_params",
               signature=("logprobs", "flat_logprobs", "detokenize", "stop"), needed_by="topk",
               target=f"{MODULE}.SamplingParams")


def apply_vllm_server_topk() -> None:
    """Patch verl's vLLM server when its module is imported (idempotent; inert without ``dppo_num_topk``)."""
    when_imported(MODULE, patch_module)
