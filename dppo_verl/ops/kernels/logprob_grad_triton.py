"""Fused Triton kernel for the backward of log pi(a_t) on a logits shard: one read, one write, no temporaries.

Forward (``dppo_verl.ops.fused_logprob``): ``y_n = x[n, a_n] - lse_n`` with the *global* (all ranks)
log-sum-exp ``lse_n``. Its gradient w.r.t. this rank's shard, for an upstream gradient ``g_n``::

    d y_n / d x[n, j] = [j == a_n - vocab_start] - exp(x[n, j] - lse_n)          (softmax - onehot, negated)
    grad[n, j]        = g_n * ([j == a_n - vocab_start] - exp(x[n, j] - lse_n))       [N, V_local], logits' dtype

Under tensor parallelism no all-reduce is needed: ``lse_n`` is already global and ``g_n`` is the same on every
rank (the loss downstream is replicated across the TP group), exactly as in Megatron's
``_VocabParallelCrossEntropy.backward``. A label held by another rank gives only the ``-softmax`` part.

Grid ``(N, cdiv(V_local, BLOCK_V))``: every program owns one block of one row, so there is no reduction and
no ordering; fp32 inside, one rounding to the output dtype at the store. Naive equivalent (tp = 1)::

    p = torch.softmax(x.float(), -1); grad = g[:, None] * (one_hot(a, V) - p)

Runs where :mod:`.vocab_stats_triton` runs (CUDA/XPU compiled, CPU only under ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..checks import check_shape
from .vocab_stats_triton import _check_device

__all__ = ["default_grad_block_v", "triton_logprob_grad"]


@triton.jit
def _logprob_grad_kernel(
    x_ptr, stride_xn, stride_xv,  # [N, V_local] logits shard (read), any strides
    lse_ptr, g_ptr, label_ptr,  # [N] fp32 global lse, [N] fp32 upstream gradient, [N] int64 local label or -1
    out_ptr, stride_on,  # [N, V_local] gradient (written, unit column stride), the logits' dtype
    V_local,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride overflows int32 once N * V_local > 2^31
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    ok = cols < V_local
    lse = tl.load(lse_ptr + row)
    g = tl.load(g_ptr + row)
    label = tl.load(label_ptr + row)  # -1 when this row's label lives in another rank's shard
    x = tl.load(x_ptr + row * stride_xn + cols * stride_xv, mask=ok, other=float("-inf")).to(tl.float32)
    p = tl.exp(x - lse)  # <= 1 (lse is over the full vocabulary); exactly 0 for -inf padding
    onehot = tl.where(cols == label, 1.0, 0.0)
    tl.store(out_ptr + row * stride_on + cols, (g * (onehot - p)).to(out_ptr.dtype.element_ty), mask=ok)


def default_grad_block_v(v_local: int) -> int:
    """Columns per program: up to 1024 (the next power of two for narrower shards). Not tuned on a GPU yet."""
    return min(1024, triton.next_power_of_2(max(int(v_local), 16)))


@torch.no_grad()
def triton_logprob_grad(
    logits: torch.Tensor,
    local_label: torch.Tensor,
    lse: torch.Tensor,
    grad_out: torch.Tensor,
    *,
    block_v: Optional[int] = None,
) -> torch.Tensor:
    """``grad[n, j] = g_n * ([j == local_label_n] - exp(x[n, j] - lse_n))`` as a new contiguous tensor.

    Args:
        logits: ``[N, V_local]`` bf16/fp16/fp32 shard (any strides). Read-only.
        local_label: ``[N]`` int label column in this shard, ``-1`` (or any value outside ``[0, V_local)``)
            when the label is in another shard.
        lse: ``[N]`` fp32 full-vocabulary log-sum-exp (after the all-reduces).
        grad_out: ``[N]`` the upstream gradient of ``log pi(a_n)``.
        block_v: columns per program (power of two); None = :func:`default_grad_block_v`.

    Returns:
        ``[N, V_local]`` in the logits' dtype (contiguous).
    """
    check_shape("logits", logits, [None, None])
    n, v_local = logits.shape
    for name, t in (("local_label", local_label), ("lse", lse), ("grad_out", grad_out)):
        check_shape(name, t, [n])
        if t.device != logits.device:
            raise ValueError(f"{name} is on {t.device} but logits on {logits.device}")
    _check_device(logits, local_label)  # devices Triton cannot run on; CPU only under the interpreter
    block = default_grad_block_v(v_local) if block_v is None else int(block_v)
    if block < 1 or block & (block - 1):
        raise ValueError(f"block_v must be a power of two, got {block}")
    out = torch.empty((n, v_local), dtype=logits.dtype, device=logits.device)
    if n == 0 or v_local == 0:
        return out
    _logprob_grad_kernel[(n, triton.cdiv(v_local, block))](
        logits, logits.stride(0), logits.stride(1),
        lse.float().contiguous(), grad_out.float().contiguous(), local_label.to(torch.int64).contiguous(),
        out, out.stride(0), v_local,
        BLOCK_V=block, num_warps=4,
    )
    return out
