"""Rollout side, engine-agnostic part: the K a rollout server must return, and the per-sample top-K arrays
(each engine's parser sits beside its server: :mod:`.vllm_server`, :mod:`.sglang_server`) as batch tensors.

Data contract (SPEC): per response token the engine's ranks 1..K **untouched** -- the sampled token is never
written into a slot (the loss side appends it from the response ids and ``rollout_log_probs``). Arrays are
``rollout_topk_ids`` int32 and ``rollout_topk_logprobs`` fp32, ``[T, K]`` per sample, padded with id 0 and -inf
(missing ranks, and rows past the response end when batched to ``[B, T, K]``).

Shapes: ``T`` response tokens of one sample, ``K`` = ``+actor_rollout_ref.rollout.custom.dppo_num_topk``.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import numpy as np

from ...contract import NUM_TOPK_CUSTOM, ROLLOUT_NUM_TOPK

__all__ = ["requested_topk", "pad_topk_batch", "align_to_response", "k_vocabulary_problem"]


def requested_topk(rollout_config: Any) -> Optional[int]:
    """K from ``rollout.custom.dppo_num_topk`` (None when the rollout should return no top-K)."""
    custom = getattr(rollout_config, "custom", None) if not isinstance(rollout_config, Mapping) else rollout_config.get("custom")
    value = (custom or {}).get(NUM_TOPK_CUSTOM)
    if value is None:
        return None
    k = int(value)
    if k < 1:
        raise ValueError(f"{ROLLOUT_NUM_TOPK} must be a positive integer, got {value!r}")
    return k


def k_vocabulary_problem(k: int, vocab_size: Optional[int], where: str) -> Optional[str]:
    """The refusal message when K exceeds the model's vocabulary (None when it fits or the size is unknown).

    vLLM 0.27 takes ``torch.topk(logprobs, K)`` over the model's vocabulary: with ``max_logprobs >= K > V`` the
    engine core dies ("selected index k out of range", EngineDeadError), otherwise the request is refused. K up to
    V is served; ranks past the ids the engine samples from (verl masks ids >= len(tokenizer)) come back as -inf
    and are padded (id 0 / -inf), which the loss treats as absent.
    """
    if vocab_size is None or k <= int(vocab_size):
        return None
    return (f"{ROLLOUT_NUM_TOPK}={k} exceeds the model's vocabulary of {int(vocab_size)} ids ({where}): the engine "
            f"cannot return {k} candidates per token; set +{ROLLOUT_NUM_TOPK} (and policy_loss.num_topk) to at most "
            f"{int(vocab_size)}")


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
