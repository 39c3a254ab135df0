"""Where verl's actor puts each token: response-only batch tensors -> the rows of the logits the engine hands the hook.

Row semantics everywhere: logits row r predicts token r + 1, so response token j of a sequence with prompt
length P sits at row P - 1 + j. The rollout tensors are response-only (``rollout_topk_ids`` /
``rollout_topk_logprobs`` ``[B, R, K]``, ``rollout_log_probs`` ``[B, R]``, padded or nested); we scatter them
onto the packed full-sequence rows ``[N, ...]``, then reuse verl's own layout helpers (Ulysses
``slice_input_tensor``, Megatron ``preprocess_thd_engine`` / ``preprocess_bshd_engine``) so our rows line up with
the logits exactly as verl's distillation tensors do.
"""

from __future__ import annotations

from typing import Optional

import torch

from ...contract import ROLLOUT_LOG_PROBS, ROLLOUT_TOPK_IDS, ROLLOUT_TOPK_LOGPROBS, ROLLOUT_NUM_TOPK, TOPK_KEYS

__all__ = ["sequence_lengths", "response_values", "packed_support_inputs", "layout_like_logits", "megatron_layout_of"]


def sequence_lengths(data) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample prompt and response lengths ``([B], [B])``, exactly as verl's ``no_padding_2_padding``."""
    prompts, responses = data["prompts"], data["responses"]
    if prompts.is_nested:
        return prompts.offsets().diff(), responses.offsets().diff()
    attn = data["attention_mask"]
    p = prompts.shape[1]
    return attn[:, :p].sum(1), attn[:, p:].sum(1)


def response_values(name: str, x: torch.Tensor, resp_lens: torch.Tensor) -> torch.Tensor:
    """Response-only ``[B, R(_i), ...]`` (nested or right-padded) -> packed ``[sum_b R_b, ...]``."""
    if x.is_nested:
        got = x.offsets().diff()
        if not torch.equal(got.cpu(), resp_lens.cpu()):
            raise ValueError(f"{name}: per-sample lengths {got.tolist()} differ from the responses' {resp_lens.tolist()}")
        return x.values()
    if x.shape[1] < int(resp_lens.max()):
        raise ValueError(f"{name} has shape {list(x.shape)}: shorter than the longest response ({int(resp_lens.max())})")
    keep = torch.arange(x.shape[1], device=x.device)[None, :] < resp_lens.to(x.device)[:, None]  # [B, T]
    return x[keep]


def packed_support_inputs(data, num_topk: int) -> dict[str, torch.Tensor]:
    """Scatter the response-only rollout tensors onto packed full-sequence rows ``[N_total, ...]``.

    Returns ``topk_ids [N, K]`` int64, ``topk_logp [N, K]`` fp32 (-inf off-response), ``sampled [N]`` int64,
    ``mu [N]`` fp32, ``row_valid [N]`` bool (True on rows that predict a response token with
    ``response_mask`` 1) and ``offsets [B + 1]`` (packed sequence boundaries).
    """
    missing = [k for k in TOPK_KEYS + (ROLLOUT_LOG_PROBS,) if k not in data.keys()]
    if missing:
        raise ValueError(
            f"Top-K DPPO needs batch keys {missing}: the rollout must return top-K logprobs "
            f"(+{ROLLOUT_NUM_TOPK}={num_topk}, rollout.calculate_log_probs=True); "
            "a Top-K mode never falls back to binary"
        )
    p_lens, r_lens = sequence_lengths(data)
    seq_lens = p_lens + r_lens
    offsets = torch.zeros(len(seq_lens) + 1, dtype=torch.long, device=seq_lens.device)
    offsets[1:] = seq_lens.cumsum(0)
    # row of response token j of sample b: offsets[b] + P_b - 1 + j
    starts = offsets[:-1] + p_lens - 1
    rows = torch.repeat_interleave(starts, r_lens) + _arange_within(r_lens)  # [sum R]
    n = int(offsets[-1])

    ids = response_values(ROLLOUT_TOPK_IDS, data[ROLLOUT_TOPK_IDS], r_lens)
    logp = response_values(ROLLOUT_TOPK_LOGPROBS, data[ROLLOUT_TOPK_LOGPROBS], r_lens)
    if ids.dim() != 2 or ids.shape[-1] != num_topk or logp.shape != ids.shape:
        raise ValueError(
            f"rollout_topk_ids / rollout_topk_logprobs have per-token shapes {list(ids.shape[1:])} / "
            f"{list(logp.shape[1:])}, expected [{num_topk}] (policy_loss.num_topk); set "
            f"+{ROLLOUT_NUM_TOPK}={num_topk} on the rollout side"
        )
    dev = ids.device
    out = {
        "topk_ids": torch.zeros(n, num_topk, dtype=torch.long, device=dev),
        "topk_logp": torch.full((n, num_topk), float("-inf"), dtype=torch.float32, device=dev),
        "sampled": torch.zeros(n, dtype=torch.long, device=dev),
        "mu": torch.zeros(n, dtype=torch.float32, device=dev),
        "row_valid": torch.zeros(n, dtype=torch.bool, device=dev),
    }
    rows = rows.to(dev)
    out["topk_ids"][rows] = ids.long()
    out["topk_logp"][rows] = logp.float()
    out["sampled"][rows] = response_values("responses", data["responses"], r_lens).long()
    out["mu"][rows] = response_values(ROLLOUT_LOG_PROBS, data[ROLLOUT_LOG_PROBS], r_lens).float()
    out["row_valid"][rows] = response_values("response_mask", data["response_mask"], r_lens).bool()
    out["offsets"] = offsets
    return out


def _arange_within(lens: torch.Tensor) -> torch.Tensor:
    """``[0..l_0-1, 0..l_1-1, ...]`` for lengths ``[B]``."""
    total = int(lens.sum())
    starts = torch.repeat_interleave(lens.cumsum(0) - lens, lens)
    return torch.arange(total, device=lens.device) - starts


def megatron_layout_of(data) -> "MegatronLayout":
    """The row layout verl's Megatron forward gave the logits of this micro-batch: from the engine call in progress
    (:mod:`.engine_context`), else (the processor called outside an engine, e.g. directly) what the batch says."""
    from verl.utils import tensordict_utils as tu

    from .engine_context import MegatronLayout, current_call

    call = current_call()
    if call is not None and call.megatron is not None:
        return call.megatron
    return MegatronLayout(local_cp_size=tu.get_non_tensor_data(data=data, key="local_cp_size", default=None),
                          forced_max_seqlen=tu.get_non_tensor_data(data=data, key="forced_max_seqlen", default=None))


def layout_like_logits(x: torch.Tensor, offsets: torch.Tensor, data_format: Optional[str],
                       megatron: "Optional[MegatronLayout]" = None) -> torch.Tensor:
    """Packed ``[N, ...]`` -> the logits' row layout, with verl's own helpers and the very arguments verl's
    ``gptmodel_forward_model_engine`` gave them (``megatron``; defaults when None)."""
    if data_format is None:  # FSDP: packed rows, Ulysses-sliced when SP > 1
        from verl.utils.ulysses import get_ulysses_sequence_parallel_world_size, slice_input_tensor

        x = x.unsqueeze(0)
        if get_ulysses_sequence_parallel_world_size() > 1:
            x = slice_input_tensor(x, dim=1)
        return x
    from ..._compat import require
    from .engine_context import MegatronLayout

    m = megatron or MegatronLayout()
    util = "verl.models.mcore.util"
    nested = torch.nested.nested_tensor_from_jagged(x, offsets)
    if data_format == "thd":  # [1, N_pad / cp, ...]: per-sequence padding, CP split (zigzag or contiguous)
        return require(util, "preprocess_thd_engine")(
            nested, pre_process=True, use_fp8_padding=m.use_fp8_padding, local_cp_size=m.local_cp_size,
            pad_to_length_bucket=m.pad_to_length_bucket, cp_layout=m.cp_layout)[0]
    if data_format == "bshd":  # [B, S_pad, ...]: S_pad = forced_max_seqlen (the mini-batch maximum) when verl sets it
        return require(util, "preprocess_bshd_engine")(
            nested, pre_process=True, use_fp8_padding=m.use_fp8_padding, forced_max_seqlen=m.forced_max_seqlen)[0]
    raise ValueError(f"unknown data_format {data_format!r} from the Megatron engine")
