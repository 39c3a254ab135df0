"""Fused Triton kernel for step 1 of the vocab-parallel recipe: one read of a logits shard. Forward-only.

Notation: ``N`` rows (packed tokens), ``V_local`` shard width, ``M`` ids per row (K + 1 support slots). Ids are
*global*; this shard holds ``[vocab_start, vocab_start + V_local)`` (``vocab_start = rank * V_local``).

Per row ``n``, streaming once over ``x = logits[n, :]`` (any float dtype, accumulated in fp32)::

    row_max[n]     = m = max_j x_j                                         [N]     (-inf for an all -inf row)
    sumexp[n]      = sum_j exp(x_j - m)                                    [N]     (>= 1 unless the row is all -inf)
    gathered[n, i] = x[ids[n, i] - vocab_start] if the id is in this shard, else 0       [N, M]
    rest_sq[n]     = sum_{j in shard, j not in S_n} exp(2 (x_j - m))      [N]     (only with sq_exclude)
    with S_n = {ids[n, i] : sq_exclude[n, i]}

The all-reduces that combine ranks stay in torch (:func:`dppo_verl.ops.vocab_parallel.vocab_parallel_stats`,
``backend="triton"``). Naive equivalent (tp = 1, ``vocab_start = 0``)::

    m = x.float().amax(-1); sumexp = (x.float() - m[:, None]).exp().sum(-1); gathered = x.float().gather(1, ids)

Where it runs: CUDA (or XPU) compiled; CPU tensors only through Triton's interpreter, with ``TRITON_INTERPRET=1``
in the environment before triton itself is first imported (``tl.zeros`` & co. are jit functions too, so the flag
cannot be turned on later in a process). The interpreter is a correctness tool, not a speed measurement.
Interpreter dtype support (triton 3.9.0, checked in tests/test_triton_kernel_on_cpu.py): fp32, fp16 and bf16
logits all load and cast correctly (bf16 is held as uint16 and widened by the interpreter's own converter).
The same tests also compile the kernel ahead of time for sm_90 (frontend, LLVM, ptxas; no GPU needed).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from ..checks import check_shape

__all__ = ["INTERPRETED", "VocabShardStats", "default_block_v", "triton_vocab_stats"]
_NO_ID = tl.constexpr(2**62)  # pads the skip list: above any column, so the cursor stops there


@triton.jit
def _vocab_stats_kernel(
    x_ptr, stride_xn, stride_xv,  # [N, V_local] logits shard, any strides
    ids_ptr, skip_ptr,  # [N, M] int64 global ids; [N, M] int64 sorted local ids left out of rest_sq (HAS_SQ)
    max_ptr, sumexp_ptr, sq_ptr, gathered_ptr,  # [N], [N], [N], [N, M] fp32 outputs
    V_local, vocab_start, M,
    BLOCK_V: tl.constexpr, BLOCK_M: tl.constexpr, HAS_SQ: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride overflows int32 once N * V_local > 2^31
    x_row = x_ptr + row * stride_xn
    ids_row = ids_ptr + row * M
    offs = tl.arange(0, BLOCK_V)

    # Scalar running max, per-lane accumulators: lane i sums the ~V_local / BLOCK_V elements i, i + B, ...
    # and tl.sum adds the lanes at the end. That is a two-level sum (as the compiled torch path): one fp32
    # running sum over ~152k terms drifts by ~1e-5 in the lse, the two-level one stays at ~1e-6.
    m_run = float("-inf")
    acc = tl.zeros([BLOCK_V], dtype=tl.float32)
    acc_sq = tl.zeros([BLOCK_V], dtype=tl.float32)
    # rest_sq masks the support inside the pass (an OR of equalities), rather than subtracting support terms
    # afterwards: duplicates count once, and no sum_all - sum_S cancellation when pi peaks on a support id.
    # The skip list is sorted and blocks come in column order, so one cursor walks it: O(M + blocks) scalar
    # steps per row and a vector compare only where a block holds a support id.
    skip_row = skip_ptr + row * M
    cur = 0
    nxt = tl.load(skip_row, mask=M > 0, other=_NO_ID)  # (without HAS_SQ: a harmless read of ids, never used)
    for start in range(0, V_local, BLOCK_V):
        cols = start + offs
        x = tl.load(x_row + cols * stride_xv, mask=cols < V_local, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m_run, tl.max(x, axis=0))
        # While everything seen is -inf (masked vocabulary padding, the tail) shift by 0, not by -inf:
        # -inf - -inf would be NaN; exp(-inf - 0) = 0 keeps the sums exact.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_run - m_safe)  # <= 1: one exp per block to rescale, one per element below
        p = tl.exp(x - m_safe)  # <= 1
        acc = acc * alpha + p
        if HAS_SQ:
            # p * p = exp(2 (x - m)) <= 1: never exp(x)^2, which overflows fp32 for logits above ~44.
            hit = cols < 0  # all False
            while nxt < start + BLOCK_V:
                hit = hit | (cols == nxt)
                cur += 1
                nxt = tl.load(skip_row + cur, mask=cur < M, other=_NO_ID)
            acc_sq = acc_sq * (alpha * alpha) + tl.where(hit, 0.0, p * p)
        m_run = m_new
    tl.store(max_ptr + row, m_run)
    tl.store(sumexp_ptr + row, tl.sum(acc, axis=0))
    if HAS_SQ:
        tl.store(sq_ptr + row, tl.sum(acc_sq, axis=0))

    # The M support logits: a few scattered loads of the same row (cache-resident), not a second pass.
    for m0 in range(0, M, BLOCK_M):
        slot = m0 + tl.arange(0, BLOCK_M)
        ok = slot < M
        local = tl.load(ids_row + slot, mask=ok, other=-1) - vocab_start
        here = ok & (local >= 0) & (local < V_local)  # ids of other ranks' shards contribute 0
        xv = tl.load(x_row + local * stride_xv, mask=here, other=0.0).to(tl.float32)
        tl.store(gathered_ptr + row * M + slot, tl.where(here, xv, 0.0), mask=ok)


INTERPRETED = type(_vocab_stats_kernel).__name__ == "InterpretedFunction"


class VocabShardStats(NamedTuple):
    row_max: torch.Tensor  # [N] fp32, max of the shard's logits per row
    sumexp: torch.Tensor  # [N] fp32, sum_j exp(x_j - row_max)
    gathered: torch.Tensor  # [N, M] fp32, logits at the ids inside this shard, 0 for the others
    rest_sq: Optional[torch.Tensor]  # [N] fp32, sum_{j not in S} exp(2 (x_j - row_max)), or None


def default_block_v(v_local: int) -> int:
    """Block width: up to 4096 columns (the next power of two for narrower shards). Not tuned on a GPU yet."""
    return min(4096, triton.next_power_of_2(max(int(v_local), 16)))


def _check_device(logits: torch.Tensor, ids: torch.Tensor) -> None:
    if ids.device != logits.device:
        raise ValueError(f"ids are on {ids.device} but logits on {logits.device}")
    if logits.device.type not in ("cuda", "xpu", "cpu"):
        raise RuntimeError(f"vocab_parallel backend='triton' does not support {logits.device.type} tensors")
    if logits.device.type == "cpu" and not INTERPRETED:
        raise RuntimeError(
            "vocab_parallel backend='triton' got CPU logits: the kernel runs on a GPU, or on CPU only through "
            "Triton's interpreter (TRITON_INTERPRET=1 in the environment before triton is first imported; "
            "slow, for tests). Use backend='auto' (torch.compile) or 'eager' on CPU."
        )


@torch.no_grad()
def triton_vocab_stats(
    logits: torch.Tensor,
    ids: torch.Tensor,
    *,
    vocab_start: int,
    sq_exclude: Optional[torch.Tensor] = None,
    block_v: Optional[int] = None,
) -> VocabShardStats:
    """One read of this rank's shard: per-row max, sum-exp, the logits at ``ids`` and optionally ``rest_sq``.

    Args:
        logits: ``[N, V_local]`` bf16/fp16/fp32 shard (any strides). Read-only.
        ids: ``[N, M]`` int32/int64 global ids (range-checked by the caller); ids outside
            ``[vocab_start, vocab_start + V_local)`` give 0 in ``gathered`` and are never excluded here.
        vocab_start: global id of this shard's first column (``rank * V_local``).
        sq_exclude: ``[N, M]`` bool; when given, ``rest_sq`` leaves out ``{ids[n, i] : sq_exclude[n, i]}``.
        block_v: columns per block (power of two); None = :func:`default_block_v`.
    """
    check_shape("logits", logits, [None, None])
    check_shape("ids", ids, [logits.shape[0], None])
    _check_device(logits, ids)
    n, v_local = logits.shape
    m = ids.shape[1]
    block = default_block_v(v_local) if block_v is None else int(block_v)
    if block < 1 or block & (block - 1):
        raise ValueError(f"block_v must be a power of two, got {block}")
    f32 = dict(dtype=torch.float32, device=logits.device)
    out = VocabShardStats(torch.empty(n, **f32), torch.empty(n, **f32), torch.empty(n, m, **f32),
                          None if sq_exclude is None else torch.empty(n, **f32))
    if n == 0:
        return out
    ids64 = ids.to(torch.int64).contiguous()  # [N, M]
    if sq_exclude is not None:
        check_shape("sq_exclude", sq_exclude, [n, m])
        local = ids64 - vocab_start
        skip = sq_exclude.to(logits.device) & (local >= 0) & (local < v_local)  # [N, M]
        skip = torch.where(skip, local, _NO_ID.value).sort(dim=1).values  # [N, M] ascending, padded with _NO_ID
    else:
        skip = ids64  # HAS_SQ=False: one element read, never used
    _vocab_stats_kernel[(n,)](
        logits, logits.stride(0), logits.stride(1), ids64, skip,
        out.row_max, out.sumexp, out.sumexp if out.rest_sq is None else out.rest_sq, out.gathered,
        v_local, int(vocab_start), m,
        BLOCK_V=block, BLOCK_M=min(64, triton.next_power_of_2(max(m, 1))), HAS_SQ=sq_exclude is not None,
        num_warps=8 if block >= 2048 else 4,
    )
    return out
