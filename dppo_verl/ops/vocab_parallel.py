"""Exact log pi at global token ids from tensor-parallel (vocab-sharded) logits. Forward-only.

Notation: ``N`` rows (packed tokens), ``M`` ids per row (K + 1 support slots), ``V`` full vocabulary,
``V_local = V / tp``. Rank r holds the logits of global ids ``[r * V_local, (r + 1) * V_local)`` (Megatron's
``VocabUtility`` convention).

Pipeline (SPEC, "Vocab-parallel evaluation"); every all-reduce is a no-op at tp = 1 / ``tp_group=None``::

    1. read the shard once (compiled: one fused kernel; eager: row chunks; triton: one streaming kernel
       with an online max / sum-exp): per row the local log-sum-exp  l_r = log sum_j exp(x_j)              [N]
       (optionally the predictive statistic  q_r = sum_{j not in S} exp(2 (x_j - l_r))            [N])
       and the logits at the ids that fall in this shard (0 elsewhere)                         [N, M]
    2. all-reduce MAX  of l_r                          -> L                                     [N]
    3. all-reduce SUM  of [exp(l_r - L), exp(2 (l_r - L)) q_r]  -> [S1, S2]                      [N, 1 or 2]
       lse = L + log S1;  sum_{j not in S} pi_j^2 = S2 / S1^2
    4. all-reduce SUM  of the gathered logits                                                   [N, M]
       log pi(ids) = gathered - lse

Communication: 2N + N*M floats (+ N for the optional statistic, folded into step 3). The paper authors' fork
calls ``log_softmax`` on the local shard with global ids instead, which is right only at tp = 1.

Memory: the shard is never converted to fp32 as a whole (an ``N x V_local`` fp32 copy is 10 GB at
N = 16k, V = 152k). The compiled backend (default) fuses the cast into the reduction and keeps no
per-element temporary; the eager backend (reference, fallback) and the optional statistic process rows in
chunks sized from ``chunk_bytes``, so the peak extra memory is O(chunk * V_local + N * M). The opt-in triton
backend (``dppo_verl.ops.kernels``) computes everything of step 1, the optional statistic and the gather
included, in one pass with O(N * M) extra memory. The inputs are never modified.

Naive equivalent (tp = 1)::

    torch.log_softmax(logits.float(), -1).gather(-1, ids)
"""

from __future__ import annotations

import functools
import logging
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist

from .checks import DeferredChecks, check_shape

__all__ = ["BACKENDS", "DEFAULT_CHUNK_BYTES", "VocabParallelStats", "vocab_parallel_logprobs", "vocab_parallel_stats"]

# Budget for the per-chunk fp32 temporaries of the eager path (the fp32 copy of a row chunk and logsumexp's
# exp buffer). The compiled path fuses cast, max and exp-sum into one kernel and materialises none of them.
# CPU: chunks that stay in the last-level cache were fastest (8 MiB on a 32 MiB-L3 EPYC, measured with
# benchmarks/bench_vocab_parallel.py); accelerators: larger chunks amortise kernel launches.
DEFAULT_CHUNK_BYTES = {"cpu": 8 * 1024 * 1024}
_DEFAULT_CHUNK_BYTES_ACCEL = 256 * 1024 * 1024
_TEMPS_PER_ELEMENT = 3  # fp32 copy + exp buffer (+ the optional squared-probability buffer)
BACKENDS = ("auto", "compile", "eager", "triton")
logger = logging.getLogger(__name__)


def _lse_eager(x: torch.Tensor) -> torch.Tensor:
    """``[c, V_local]`` any float dtype -> ``[c]`` fp32 log-sum-exp (the slow obvious path)."""
    return torch.logsumexp(x.float(), dim=-1)


def _lse_blocked(x3: torch.Tensor) -> torch.Tensor:
    """``[c, nb, B]`` (a free view of ``[c, V_local]``) -> ``[c]`` fp32 log-sum-exp, compiled.

    Two levels (per block of B, then across the nb blocks) instead of one running sum over V_local: a single
    fp32 accumulator over ~152k terms drifts by ~1e-5, the two-level sum stays at ~1e-6. Blocks that are
    entirely -inf (masked vocabulary padding) get a 0 shift so that -inf - -inf never makes a NaN.
    """
    xf = x3.float()
    m = xf.amax(-1, keepdim=True)  # [c, nb, 1]
    m = torch.where(m == float("-inf"), 0.0, m)
    s = (xf - m).exp().sum(-1)  # [c, nb]
    mb = m[..., 0]
    big = mb.amax(-1, keepdim=True)  # [c, 1]
    return big[:, 0] + (s * (mb - big).exp()).sum(-1).log()


@functools.lru_cache(maxsize=None)
def _block_size(v: int) -> int:
    """The largest divisor of V_local <= 4096; V_local itself (one block) when that divisor is < 64 (e.g. prime)."""
    b = next(d for d in range(min(v, 4096), 0, -1) if v % d == 0)
    return b if b >= 64 else v


def _block_view(x: torch.Tensor) -> torch.Tensor:
    """``[c, V_local]`` -> ``[c, nb, B]`` without a copy (rows may be strided, columns must be unit-stride)."""
    c, v = x.shape
    if x.stride(-1) != 1:
        return x.unsqueeze(1)  # cannot view without a copy: one block
    b = _block_size(v)
    return x.as_strided((c, v // b, b), (x.stride(0), b, 1), x.storage_offset())


_compiled_lse = None
_compile_failed = False


def _call_lse(x: torch.Tensor, backend: str) -> Optional[torch.Tensor]:
    """Per-row local log-sum-exp ``[c]``. ``auto`` compiles once; when compiling fails it warns once and returns
    None (then and from then on), and the caller takes the row-chunked eager path: ``x`` may be the whole shard,
    so an eager call here would make the ``N x V_local`` fp32 temporary the module promises never to make."""
    global _compiled_lse, _compile_failed
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    if backend == "eager":
        return _lse_eager(x)
    if backend == "auto" and _compile_failed:
        return None
    if _compiled_lse is None:
        _compiled_lse = torch.compile(_lse_blocked, dynamic=True)
    try:
        return _compiled_lse(_block_view(x))
    except Exception as e:  # inductor unavailable (no compiler, unsupported device): same math, eager, chunked
        if backend == "compile":
            raise
        _compile_failed = True
        logger.warning("dppo_verl: torch.compile of the vocab-parallel logsumexp failed (%s); using the eager "
                       "row-chunked path", e)
        return None


class VocabParallelStats(NamedTuple):
    logp: torch.Tensor  # [N, M] fp32, log pi at the global ids (full-vocabulary normalisation)
    lse: torch.Tensor  # [N] fp32, full-vocabulary log-sum-exp of the logits
    rest_sq: Optional[torch.Tensor]  # [N] fp32, sum_{j not in S} pi_j^2 when requested, else None


def _group_size_rank(tp_group) -> tuple[int, int]:
    if tp_group is None:
        return 1, 0
    return dist.get_world_size(tp_group), dist.get_rank(tp_group)


def _chunk_rows(v_local: int, chunk_bytes: Optional[int], device: torch.device) -> int:
    if chunk_bytes is None:
        chunk_bytes = DEFAULT_CHUNK_BYTES.get(device.type, _DEFAULT_CHUNK_BYTES_ACCEL)
    return max(1, int(chunk_bytes) // (v_local * 4 * _TEMPS_PER_ELEMENT))


def _validate(logits: torch.Tensor, ids: torch.Tensor, vocab_size: int, checks: Optional[DeferredChecks]) -> None:
    """Host-side shape/dtype checks now; the id range is queued on ``checks`` (read with the caller's one read).
    Out-of-range ids are safe until then: sharded, they never count as in-shard, so nothing is gathered at them;
    unsharded, they are clamped into the row before the gather."""
    check_shape("logits", logits, [None, None])
    if not logits.is_floating_point():
        raise ValueError(f"logits must be floating point (bf16/fp16/fp32), got dtype {logits.dtype}")
    check_shape("ids", ids, [logits.shape[0], None])
    if ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"ids must be int32 or int64 global token ids, got dtype {ids.dtype}")
    if checks is not None and ids.numel():
        checks.add((ids < 0) | (ids >= vocab_size), lambda idx: (
            f"ids (shape {list(ids.shape)}) out of range [0, {vocab_size}): min {int(ids.min())}, max "
            f"{int(ids.max())}; first at index {idx}: {int(ids[tuple(idx)])}"))


def _local_pass(logits, local_ids, in_shard, exclude, chunk_bytes, backend):
    """Step 1 on this shard: local log-sum-exp [N] and, when ``exclude`` is given, q_r [N].

    ``exclude`` [N, M] bool marks the support slots (in this shard) left out of the squared-probability sum;
    ``in_shard`` [N, M] bool, None when unsharded (every id local).
    """
    n, v_local = logits.shape
    if backend != "eager" and exclude is None:
        # The compiled lse fuses cast, max and exp-sum: no per-element temporary, so no chunking needed.
        lse = _call_lse(logits, backend)  # [N], or None when compiling failed (auto)
        if lse is not None:
            return lse, None
        backend = "eager"  # the fallback runs in row chunks: never an N x V_local fp32 temporary
    rows = _chunk_rows(v_local, chunk_bytes, logits.device)
    lse_local = torch.empty(n, dtype=torch.float32, device=logits.device)
    rest_sq = torch.empty(n, dtype=torch.float32, device=logits.device) if exclude is not None else None
    for s in range(0, n, rows):
        lse_c = _call_lse(logits[s : s + rows], backend)  # [c]
        if lse_c is None:  # compiling failed on the first chunk: this and every later chunk eager
            backend = "eager"
            lse_c = _lse_eager(logits[s : s + rows])
        lse_local[s : s + rows] = lse_c
        if exclude is not None:
            x = logits[s : s + rows].float()  # [c, V_local] fp32: a copy for bf16/fp16, a view for fp32
            # exp(2 (x - l_r)) <= 1: never exp(x)^2, which overflows fp32. Support ids are zeroed by scatter,
            # so duplicates cannot be subtracted twice (no sum_all - sum_S cancellation either).
            # A shard whose row is all -inf (masked vocabulary padding) has l_r = -inf; shift by 0 there so that
            # -inf - -inf never makes a NaN (q_r = 0, and its weight exp(2 (l_r - L)) is 0 in the combine anyway).
            shift = torch.where(lse_c == float("-inf"), 0.0, lse_c)
            sq = torch.exp(2.0 * (x - shift.unsqueeze(-1)))  # [c, V_local]
            drop = exclude[s : s + rows]  # [c, M]
            if in_shard is not None:
                drop = drop & in_shard[s : s + rows]
            # zero the support columns by a multiplicative scatter (x 0 at dropped slots, x 1 elsewhere): a boolean
            # index would read the device to size its result
            sq.scatter_reduce_(1, local_ids[s : s + rows], (~drop).to(sq.dtype), reduce="prod")
            rest_sq[s : s + rows] = sq.sum(-1)
    return lse_local, rest_sq


def _triton_local_pass(logits, ids, vocab_start, exclude):
    """Step 1 by the fused Triton kernel: (local lse [N], q_r [N] or None, gathered logits [N, M]).

    The kernel returns the shard's max m and sum-exp s; l_r = m + log s and q_r = q_m / s^2 put them in the
    form the combine below expects (q_r relative to l_r, q_m relative to m; s >= 1, so no overflow).
    """
    from .kernels import load_vocab_stats_triton  # imports triton only when this backend is asked for

    st = load_vocab_stats_triton().triton_vocab_stats(logits, ids, vocab_start=vocab_start, sq_exclude=exclude)
    lse_r = st.row_max + torch.log(st.sumexp)  # [N]; -inf for an all -inf (padding) shard
    q_r = None if st.rest_sq is None else torch.where(st.sumexp > 0, st.rest_sq / st.sumexp.square(), 0.0)
    return lse_r, q_r, st.gathered


@torch.no_grad()
def vocab_parallel_stats(
    logits: torch.Tensor,
    ids: torch.Tensor,
    *,
    tp_group=None,
    sq_exclude: Optional[torch.Tensor] = None,
    chunk_bytes: Optional[int] = None,
    backend: str = "auto",
    checks: Optional[DeferredChecks] = None,
    ids_checked: bool = False,
) -> VocabParallelStats:
    """log pi at ``ids``, the full-vocabulary logsumexp and (optionally) the predictive statistic.

    Args:
        logits: ``[N, V_local]`` bf16/fp16/fp32, this rank's vocabulary shard. Read-only.
        ids: ``[N, M]`` int32/int64 *global* ids in ``[0, V_local * tp)``.
        tp_group: the tensor-parallel process group; None or a size-1 group computes locally.
        sq_exclude: ``[N, M]`` bool; when given, also return ``sum_{j not in S} pi_j^2`` with
            ``S = {ids[n, m] : sq_exclude[n, m]}`` (one extra float per row in the second all-reduce).
        chunk_bytes: budget for the per-chunk fp32 temporaries (eager path and the optional statistic);
            None picks a per-device default (``DEFAULT_CHUNK_BYTES``).
        backend: ``compile`` (torch.compile'd fused cast + logsumexp: one read, no temporaries), ``eager``
            (row chunks, the reference path), ``auto`` (compile; eager with a warning if compiling fails),
            ``triton`` (opt-in fused kernel, ``dppo_verl.ops.kernels``: needs triton and a GPU, or CPU
            tensors under ``TRITON_INTERPRET=1``; ignores ``chunk_bytes``).
        checks: where to queue the data checks (ids in range, finite log-sum-exp) so that the caller reads them
            with its own flags in one device read; None reads them here (one read) and raises.
        ids_checked: the caller has already queued the range check of ``ids`` (e.g. the Top-K hook's support from
            :func:`dppo_verl.ops.support.build_support`): not queued twice. Out-of-range ids stay harmless either way.

    Returns:
        :class:`VocabParallelStats` (fp32). Not differentiable: the divergence only drives a mask.
    """
    tp, rank = _group_size_rank(tp_group)
    n, v_local = logits.shape if logits.dim() == 2 else (None, None)
    own = checks is None
    checks = DeferredChecks() if own else checks
    _validate(logits, ids, (v_local or 0) * tp, None if ids_checked else checks)
    if sq_exclude is not None:
        check_shape("sq_exclude", sq_exclude, list(ids.shape))
    ids = ids.long()
    lo = rank * v_local
    if backend == "triton":
        lse_r, q_r, gathered = _triton_local_pass(logits, ids, lo, sq_exclude)
    elif tp == 1:
        # unsharded: every id is local. Out-of-range ones (queued above, raised at the caller's read) are clamped so
        # that the gather stays safe until then; 5 small ops fewer per call than the sharded masking.
        local_ids = ids.clamp(0, v_local - 1)  # [N, M]
        lse_r, q_r = _local_pass(logits, local_ids, None, sq_exclude, chunk_bytes, backend)
        gathered = logits.gather(1, local_ids).float()  # [N, M]
    else:
        in_shard = (ids >= lo) & (ids < lo + v_local)  # [N, M]
        local_ids = torch.where(in_shard, ids - lo, 0)  # [N, M]
        lse_r, q_r = _local_pass(logits, local_ids, in_shard, sq_exclude, chunk_bytes, backend)
        gathered = torch.where(in_shard, logits.gather(1, local_ids).float(), 0.0)  # [N, M]

    if tp > 1:
        lse_max = lse_r.clone()
        dist.all_reduce(lse_max, op=dist.ReduceOp.MAX, group=tp_group)  # step 2
        scale = torch.exp(lse_r - lse_max)  # [N], <= 1
        cols = [scale] if q_r is None else [scale, scale * scale * q_r]
        sums = torch.stack(cols, dim=-1)  # [N, 1 or 2]
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=tp_group)  # step 3
        lse = lse_max + torch.log(sums[:, 0])
        rest_sq = None if q_r is None else sums[:, 1] / sums[:, 0].square()
        dist.all_reduce(gathered, op=dist.ReduceOp.SUM, group=tp_group)  # step 4
    else:
        lse, rest_sq = lse_r, q_r

    # Checked on the [N] result, not by another pass over the logits.
    def describe(idx: list[int]) -> str:
        bad = ~torch.isfinite(lse)
        return (f"logits (shape {list(logits.shape)}) give a non-finite log-sum-exp at {int(bad.sum())} rows "
                f"(first: row {idx[0]}, value {float(lse[idx[0]])}): the logits contain NaN or inf")

    checks.add(~torch.isfinite(lse), describe)
    if own:
        checks.run()
    return VocabParallelStats(gathered - lse.unsqueeze(-1), lse, rest_sq)


def vocab_parallel_logprobs(
    logits: torch.Tensor,
    ids: torch.Tensor,
    *,
    tp_group=None,
    chunk_bytes: Optional[int] = None,
    backend: str = "auto",
    checks: Optional[DeferredChecks] = None,
) -> torch.Tensor:
    """``[N, M]`` fp32 log-softmax over the full vocabulary evaluated at global ``ids``. Forward-only.

    See :func:`vocab_parallel_stats` for arguments; use it when the logsumexp is needed too.
    """
    return vocab_parallel_stats(logits, ids, tp_group=tp_group, chunk_bytes=chunk_bytes, backend=backend,
                                checks=checks).logp
