"""Rollout side, engine-agnostic part: turn an engine's per-token top-K log-probs into the batch tensors.

Data contract (SPEC): per response token the engine's ranks 1..K **untouched** -- the sampled token is never
written into a slot (the loss side appends it from the response ids and ``rollout_log_probs``). Arrays are
``rollout_topk_ids`` int32 and ``rollout_topk_logprobs`` fp32, ``[T, K]`` per sample, padded with id 0 and -inf
(missing ranks, and rows past the response end when batched to ``[B, T, K]``).

Shapes: ``T`` response tokens of one sample, ``K`` = ``+actor_rollout_ref.rollout.custom.dppo_num_topk``.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import numpy as np

__all__ = [
    "NUM_TOPK_KEY",
    "requested_topk",
    "topk_arrays_from_vllm",
    "topk_arrays_from_flat",
    "pad_topk_batch",
    "align_to_response",
]

NUM_TOPK_KEY = "dppo_num_topk"  # in actor_rollout_ref.rollout.custom


def requested_topk(rollout_config: Any) -> Optional[int]:
    """K from ``rollout.custom.dppo_num_topk`` (None when the rollout should return no top-K)."""
    custom = getattr(rollout_config, "custom", None) if not isinstance(rollout_config, Mapping) else rollout_config.get("custom")
    value = (custom or {}).get(NUM_TOPK_KEY)
    if value is None:
        return None
    k = int(value)
    if k < 1:
        raise ValueError(f"actor_rollout_ref.rollout.custom.{NUM_TOPK_KEY} must be a positive integer, got {value!r}")
    return k


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
    return ids, lps


def topk_arrays_from_flat(flat: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
    """vLLM's ``FlatLogprobs`` (``SamplingParams(flat_logprobs=True)``) -> ``([G, K] int32, [G, K] float32)``.

    With ``logprobs=K`` vLLM stores K+1 entries per position: the sampled token first (its own rank, which may
    exceed K), then ranks 1..K in order (vllm/logprobs.py ``append_logprobs_for_next_position``). We read the
    flat lists with numpy instead of building G dicts of K+1 ``Logprob`` objects; the layout is checked, not
    assumed: any other rank pattern raises.
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
    return np.ascontiguousarray(ids), np.ascontiguousarray(logp)


def pad_topk_batch(per_sample: Sequence[tuple[np.ndarray, np.ndarray]], length: int):
    """``[(ids [T_i, K], logp [T_i, K]), ...]`` -> torch ``([B, length, K] int32, [B, length, K] fp32)``, right-padded
    with id 0 / -inf and truncated to ``length`` (verl's ``response_length``)."""
    import torch

    if not per_sample:
        raise ValueError("pad_topk_batch needs at least one sample")
    k = per_sample[0][0].shape[1]
    ids = torch.zeros(len(per_sample), length, k, dtype=torch.int32)
    lps = torch.full((len(per_sample), length, k), float("-inf"), dtype=torch.float32)
    for b, (i_arr, l_arr) in enumerate(per_sample):
        if i_arr.shape != l_arr.shape or i_arr.ndim != 2 or i_arr.shape[1] != k:
            raise ValueError(f"sample {b}: top-K arrays of shapes {i_arr.shape} / {l_arr.shape}, expected [T, {k}]")
        n = min(length, i_arr.shape[0])
        ids[b, :n] = torch.from_numpy(i_arr[:n])
        lps[b, :n] = torch.from_numpy(l_arr[:n])
    return ids, lps


def align_to_response(ids: np.ndarray, logp: np.ndarray, response_mask: Sequence[int]):
    """Generated-token rows ``[G, K]`` -> response rows ``[R, K]``: the g-th generated token sits at the g-th
    position with ``response_mask == 1`` (agent loops may insert mask-0 tokens: tool output, chat-template
    boundaries); the other rows get id 0 / -inf. Rows past the truncated response are dropped."""
    mask = np.asarray(response_mask, dtype=bool)
    pos = np.flatnonzero(mask)
    if ids.shape[0] < len(pos):
        raise ValueError(
            f"rollout top-K has {ids.shape[0]} rows but the response has {len(pos)} generated tokens "
            "(response_mask == 1): the engine's top-K must cover every generated token"
        )
    out_ids = np.zeros((mask.shape[0], ids.shape[1]), dtype=np.int32)
    out_lp = np.full((mask.shape[0], ids.shape[1]), -np.inf, dtype=np.float32)
    out_ids[pos] = ids[: len(pos)]
    out_lp[pos] = logp[: len(pos)]
    return out_ids, out_lp
