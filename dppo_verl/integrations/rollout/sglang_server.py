"""SGLang rollout server: return the engine's top-K log-probs for every generated token.

verl 0.9.1's ``SGLangHttpServer.generate`` (``verl/workers/rollout/sglang_rollout/async_sglang_server.py``) pops
``sampling_params["logprobs"]`` into ``return_logprob``, sends one ``GenerateReqInput`` with
``self.tokenizer_manager.generate_request(generate_request, None).__anext__()`` and reads the sampled-token
log-probs from ``meta_info["output_token_logprobs"]``. When the rollout config has ``custom.dppo_num_topk = K``
this runtime patch, request by request:

1. runs verl's ``generate`` with a :class:`_TopKRequest` in a ``ContextVar`` (concurrent requests share the
   server's event loop, so per-request state never lives on the server object);
2. on the way to the engine, sets ``top_logprobs_num = K`` on verl's ``GenerateReqInput`` (the hook wraps the
   server's ``tokenizer_manager.generate_request``; it is inert outside a top-K request, e.g. for SGLang's own
   HTTP endpoints, which share that tokenizer manager);
3. on the way back, keeps the output's ``meta_info`` and, once verl has built its ``TokenOutput``, adds
   ``rollout_topk_ids`` (int32) / ``rollout_topk_logprobs`` (fp32) ``[G, K]`` to its ``extra_fields``.

Prompt-scoring requests (``sampling_params["prompt_logprobs"]``, the distillation teacher's) are left alone: verl
already uses ``top_logprobs_num`` for their input tokens.

Which distribution SGLang's log-probs describe (sglang ``layers/sampler.py``): ``log(softmax(z' / T))`` where
``z'`` are the logits after logit bias, grammar mask and penalties, taken *before* top-k / top-p / min-p
truncation (no renormalisation, unlike vLLM's ``processed_logprobs``); all-greedy batches report
``log_softmax(z')``, and ``SGLANG_RETURN_ORIGINAL_LOGPROB=1`` reports the pre-temperature ``log_softmax(z')``.
The top-K entries are ``torch.topk`` of those log-probs, so they come in rank order.

``patches/verl-0.9.1-sglang-rollout-topk.diff`` makes the same change in verl's source with the helpers below;
this patch steps aside when it finds that diff's marker in ``generate``. Shapes: ``G`` generated tokens, ``K``
requested ranks.
"""

from __future__ import annotations

import contextvars
import functools
import logging
import math
import numbers
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from ...contract import CALCULATE_LOG_PROBS, PATCHED_SOURCE_MARKER, ROLLOUT_NUM_TOPK, TOPK_KEYS
from ..patching import patch_attr, raise_if_drifted, record_applied, record_drift, source_has_marker, when_imported
from .topk_arrays import requested_topk

__all__ = [
    "MODULE",
    "apply_sglang_server_topk",
    "generation_topk",
    "topk_arrays_from_sglang",
    "topk_fields_from_meta_info",
]

logger = logging.getLogger(__name__)

MODULE = "verl.workers.rollout.sglang_rollout.async_sglang_server"
GENERATE_SIGNATURE = ("self, prompt_ids, sampling_params, request_id, image_data=, video_data=, bootstrap_host=, "
                      "bootstrap_port=, bootstrap_room=")
TOPK_IDS, TOPK_LOGPROBS = TOPK_KEYS  # the extra_fields keys the agent-loop patch carries into the batch
_MAX_ID = 2**31  # ids are stored as int32


def generation_topk(rollout_config: Any, want_logprobs: Any, prompt_logprobs: Any = None) -> Optional[int]:
    """K to request for a generation request, or None (no top-K configured, or a prompt-scoring request).

    Raises when top-K is configured but the request does not ask for the sampled-token log-probs: the loss
    needs both, and silently returning top-K without ``rollout_log_probs`` would fail far from the cause.
    """
    k = requested_topk(rollout_config)
    if k is None or prompt_logprobs is not None:
        return None
    if not want_logprobs:
        raise ValueError(
            f"dppo_verl: rollout top-K ({ROLLOUT_NUM_TOPK}={k}) needs the rollout log-probs too, but this "
            f"request did not ask for any: set {CALCULATE_LOG_PROBS}=True"
        )
    return k


def topk_arrays_from_sglang(output_top_logprobs: Sequence[Sequence[Any]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """SGLang's ``meta_info["output_top_logprobs"]`` (per generated token a list of ``(logprob, token_id, text)``
    in rank order) -> ``(ids [G, K] int32, logp [G, K] float32)``.

    Ranks are kept in SGLang's order, untouched; entries past K are dropped, missing ranks get id 0 / -inf.
    A malformed payload raises ValueError naming the generated-token position (and rank).
    """
    if not isinstance(k, numbers.Integral) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if not isinstance(output_top_logprobs, (list, tuple)):
        raise ValueError(
            f"SGLang output_top_logprobs is {type(output_top_logprobs).__name__}, expected one list per "
            f"generated token: was the request sent with top_logprobs_num={k}?"
        )
    rows = output_top_logprobs
    try:
        arrays = _fast_arrays(rows, k)
    except (TypeError, IndexError, KeyError, ValueError):
        arrays = None  # the diagnostic pass below names the offending entry
    if arrays is None:
        _raise_first_problem(rows, k)
    return arrays


def _fast_arrays(rows: list, k: int) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """Happy path: values and ids checked as two numpy arrays (G * K entries per request, in the server's event
    loop; ~6x faster than the per-entry checks of the diagnostic pass). None when the layout is not the expected."""
    g = len(rows)
    ids = np.zeros((g, k), dtype=np.int32)
    logp = np.full((g, k), -np.inf, dtype=np.float32)
    if g == 0:
        return ids, logp
    if not all(isinstance(row, (list, tuple)) for row in rows):
        return None
    counts = np.fromiter((min(len(row), k) for row in rows), dtype=np.int64, count=g)
    if counts.min() == 0:
        return None
    entries = [e for row in rows for e in row[:k]]
    if not all(isinstance(e, (list, tuple)) and len(e) >= 2 for e in entries):
        return None
    vals = np.asarray([e[0] for e in entries])
    tids = np.asarray([e[1] for e in entries])
    if vals.ndim != 1 or vals.dtype.kind not in "fi" or tids.ndim != 1 or tids.dtype.kind not in "iu":
        return None
    if np.isnan(vals).any() or tids.min() < 0 or tids.max() >= _MAX_ID:
        return None
    row_idx = np.repeat(np.arange(g), counts)  # [N]: generated-token position of each entry
    rank_idx = np.arange(len(entries)) - np.repeat(np.cumsum(counts) - counts, counts)  # [N]: 0-based rank
    ids[row_idx, rank_idx] = tids
    logp[row_idx, rank_idx] = vals
    return ids, logp


def _raise_first_problem(rows: list, k: int) -> None:
    """Slow path, only after the fast path refused: raise ValueError on the first malformed row or entry."""
    for i, row in enumerate(rows):
        if row is None or (isinstance(row, (list, tuple)) and len(row) == 0):
            raise ValueError(
                f"SGLang returned no top log-probs for generated token {i}: was the request sent with "
                f"top_logprobs_num={k}?"
            )
        if not isinstance(row, (list, tuple)):
            raise ValueError(
                f"SGLang top log-probs of generated token {i} are a {type(row).__name__}, expected a list of "
                "(logprob, token_id, text) tuples"
            )
        for r, entry in enumerate(row[:k]):
            where = f"generated token {i}, rank {r + 1}"
            if not isinstance(entry, (list, tuple)) or len(entry) < 2:
                raise ValueError(
                    f"SGLang top log-prob entry at {where} is {entry!r}, expected (logprob, token_id, text)"
                )
            lp, tid = entry[0], entry[1]
            if isinstance(tid, bool) or not isinstance(tid, numbers.Integral) or not 0 <= tid < _MAX_ID:
                raise ValueError(f"SGLang top log-prob entry at {where} has token id {tid!r}, expected an int")
            if isinstance(lp, bool) or not isinstance(lp, numbers.Real) or math.isnan(lp):
                raise ValueError(f"SGLang top log-prob entry at {where} has log-prob {lp!r}, expected a float")
    raise ValueError(f"SGLang output_top_logprobs could not be read as [G, {k}] (logprob, token_id) ranks")


def topk_fields_from_meta_info(meta_info: Mapping[str, Any], num_generated: int, k: int) -> dict[str, np.ndarray]:
    """``extra_fields`` entries for one finished request: ``[G, K]`` arrays over the ``num_generated`` tokens of
    the ``TokenOutput`` (0 when verl dropped them: an abort, or SGLang's logprob / token length mismatch)."""
    if num_generated == 0:
        return {TOPK_IDS: np.zeros((0, k), dtype=np.int32), TOPK_LOGPROBS: np.zeros((0, k), dtype=np.float32)}
    rows = (meta_info or {}).get("output_top_logprobs")
    if rows is None:
        raise ValueError(f"SGLang returned no output_top_logprobs: was the request sent with top_logprobs_num={k}?")
    if len(rows) != num_generated:
        raise ValueError(f"SGLang returned top log-probs for {len(rows)} tokens but generated {num_generated}")
    ids, logp = topk_arrays_from_sglang(rows, k)
    return {TOPK_IDS: ids, TOPK_LOGPROBS: logp}


# --- runtime patch ---------------------------------------------------------------------------------------------


@dataclass
class _TopKRequest:
    k: int
    meta_info: Optional[dict] = None  # of the engine's (last) output for this request


_REQUEST: contextvars.ContextVar[Optional[_TopKRequest]] = contextvars.ContextVar("dppo_sglang_topk", default=None)


class _CapturingStream:
    """The tokenizer manager's output stream, keeping each output's ``meta_info`` on the request state.

    verl awaits ``__anext__()`` once and drops the stream; everything else is forwarded untouched."""

    def __init__(self, stream, req: _TopKRequest):
        self._stream, self._req = stream, req

    def __aiter__(self):
        return self

    async def __anext__(self):
        output = await self._stream.__anext__()
        self._req.meta_info = output.get("meta_info") or {}
        return output

    def __getattr__(self, name):  # aclose / asend / athrow
        return getattr(self._stream, name)


def _wrap_generate_request(orig):
    """``tokenizer_manager.generate_request(obj, request)`` that adds ``top_logprobs_num`` inside a top-K request."""

    @functools.wraps(orig)
    def generate_request(obj, *args, **kwargs):
        req = _REQUEST.get()
        if req is None:
            return orig(obj, *args, **kwargs)
        if not getattr(obj, "return_logprob", False):  # generation_topk checked the request; this checks verl
            raise ValueError("dppo_verl: a top-K request reached SGLang with return_logprob off")
        current = getattr(obj, "top_logprobs_num", None)
        if current not in (None, 0, req.k):
            raise ValueError(f"dppo_verl: request already asks for top_logprobs_num={current}, top-K needs {req.k}")
        obj.top_logprobs_num = req.k
        return _CapturingStream(orig(obj, *args, **kwargs), req)

    return generate_request


def _ensure_tokenizer_manager_patched(tokenizer_manager) -> None:
    # Per instance (the server's own manager), re-checked per request in case verl replaces the manager.
    if not patch_attr(tokenizer_manager, "generate_request", _wrap_generate_request,
                      name="rollout.sglang.generate_request", signature=("obj",), needed_by="topk"):
        raise_if_drifted(("topk",), "rollout top-K (SGLang)")


def _wrap_server_generate(orig):
    @functools.wraps(orig)
    async def generate(self, prompt_ids, sampling_params, request_id, *args, **kwargs):
        k = generation_topk(self.config, sampling_params.get("logprobs", False), sampling_params.get("prompt_logprobs"))
        if k is None:
            return await orig(self, prompt_ids, sampling_params, request_id, *args, **kwargs)
        _ensure_tokenizer_manager_patched(self.tokenizer_manager)
        req = _TopKRequest(k)
        token = _REQUEST.set(req)  # this task's context only: concurrent requests each see their own
        try:
            out = await orig(self, prompt_ids, sampling_params, request_id, *args, **kwargs)
        finally:
            _REQUEST.reset(token)
        if req.meta_info is None:
            if out.token_ids:
                raise RuntimeError(
                    "dppo_verl: SGLang produced tokens without passing through tokenizer_manager.generate_request "
                    "(prefill/decode disaggregation, or a verl change the top-K hook does not know)"
                )
            req.meta_info = {}
        out.extra_fields.update(topk_fields_from_meta_info(req.meta_info, len(out.token_ids), k))
        return out

    return generate


def patch_module(module) -> None:
    """Patch ``SGLangHttpServer.generate`` of verl's SGLang server module, or stand aside when verl's source already
    carries the patches/ diff."""
    server = getattr(module, "SGLangHttpServer", None)
    if server is None:
        record_drift("rollout.sglang.generate", f"{MODULE}.SGLangHttpServer", "topk", "does not exist")
        return
    if source_has_marker(getattr(server, "generate", None), PATCHED_SOURCE_MARKER):
        logger.info("verl's SGLang server carries %s (patches/ diff): runtime patch skipped", PATCHED_SOURCE_MARKER)
        record_applied("rollout.sglang.generate", f"{MODULE}.SGLangHttpServer.generate (patches/ diff: stood aside)",
                       "topk")
        return
    patch_attr(server, "generate", _wrap_server_generate, name="rollout.sglang.generate", signature=GENERATE_SIGNATURE,
               needed_by="topk", target=f"{MODULE}.SGLangHttpServer.generate")


def apply_sglang_server_topk() -> None:
    """Patch verl's SGLang server when its module is imported (idempotent; inert without ``dppo_num_topk``)."""
    when_imported(MODULE, patch_module)
