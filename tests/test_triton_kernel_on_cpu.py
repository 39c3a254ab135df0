"""backend="triton" of vocab_parallel_stats through Triton's CPU interpreter, gloo tp = 1, 2, vs dense fp64.

Triton picks compile-or-interpret when a jit function is defined (its own library's included), from
``TRITON_INTERPRET`` at that moment: the flag must be set before triton is imported. So every interpreted call
runs in spawned gloo workers that set the flag first; this pytest process never sets it. One spawn of two ranks
covers both tp sizes, the cores sharing the work: tp = 1 on a size-1 gloo group per rank (rank 0 the op, rank 1
the kernel's edge cases), then tp = 2 on the pair. In this process: the error paths, and an ahead-of-time
compile of the real kernel for sm_90 (no GPU needed), which catches what the interpreter would let through.
Interpreter dtypes (triton 3.9.0): fp32, fp16 and bf16 all run and are checked here.
"""

import functools
import importlib.util
import os
import sys
import types
import warnings

import pytest
import torch
import torch.distributed as dist

import reference as ref
from dist_utils import run_distributed

V = 10006  # tp = 2: V_local = 5003, neither a multiple of the default 4096-wide block nor a power of two
N = 12
EPS32 = torch.finfo(torch.float32).eps
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@functools.lru_cache(maxsize=None)
def _case(dtype):
    """Full-vocab logits (same on every rank, seeded), ids across shards, and the rest_sq exclusion flags."""
    g = torch.Generator().manual_seed(1234)
    logits = (torch.randn(N, V, generator=g) * 4.0).to(dtype)
    # Peaked rows: pi_max = 1 - 8e-11, rest_sq ~ 1e-21; fp32 sum_all - sum_S would return exactly 0 here.
    logits[0, 17] = 40.0
    logits[1, V - 3] = 40.0  # ... with the peak on the last rank, in the tail block
    ids = torch.randint(0, V, (N, 6), generator=g)
    ids[:4, 0] = torch.tensor([0, V - 1, V // 2 - 1, V // 2])  # the tp = 2 shard boundaries
    ids[:, 1] = ids[:, 2]  # a duplicated id in every row
    ids[:, 3] = logits.float().argmax(-1)  # the top token (the peak in rows 0, 1)
    ids = torch.cat([ids, torch.randint(0, V, (N, 1), generator=g)], 1)  # a "sampled" id: M = 7
    exclude = torch.rand(N, 7, generator=g) < 0.7
    exclude[:2] = True  # peaked rows: the peak and the duplicates are all excluded
    return logits, ids, exclude


def _rest_sq_reference(logits, ids, exclude):
    """fp64 sum_{j not in S} pi_j^2 over the full vocabulary, S a set (duplicates once)."""
    p = ref.full_logprobs(logits).exp()
    keep = torch.ones_like(p, dtype=torch.bool)
    for n in range(logits.shape[0]):
        keep[n, ids[n][exclude[n]]] = False
    return (p.square() * keep).sum(-1)


def _check_op(rank, tp, group, dtype):
    """vocab_parallel_stats(backend="triton") on this rank's shard vs the dense fp64 reference."""
    from dppo_verl.ops.vocab_parallel import vocab_parallel_logprobs, vocab_parallel_stats

    logits, ids, exclude = _case(dtype)
    v_local = V // tp
    shard = logits[:, rank * v_local : (rank + 1) * v_local].clone()
    before = shard.clone()
    st = vocab_parallel_stats(shard, ids.int(), tp_group=group, sq_exclude=exclude, backend="triton")
    assert torch.equal(shard, before), "the input shard was modified"
    lse = torch.logsumexp(logits.double(), -1)
    tol = 1e-5 + EPS32 * lse.abs()  # SPEC: fp32 log-softmax at this V is a few 1e-6 off fp64
    assert st.logp.dtype == torch.float32 and st.logp.shape == (N, 7)
    err = (st.logp.double() - ref.logprobs_at(logits, ids)).abs()
    assert bool((err <= tol[:, None]).all()), f"logp max err {err.max():.3e} ({dtype}, tp={tp})"
    assert bool(((st.lse.double() - lse).abs() <= tol).all()), f"lse ({dtype}, tp={tp})"
    torch.testing.assert_close(st.rest_sq.double(), _rest_sq_reference(logits, ids, exclude), rtol=1e-4, atol=0)
    plain = vocab_parallel_logprobs(shard, ids, tp_group=group, backend="triton")  # no statistic: HAS_SQ off
    torch.testing.assert_close(plain, st.logp, rtol=0, atol=0)


def _check_kernel_edges(dtype):
    """The kernel alone, blocks of 64 over a 300-wide shard at offset 1000: several blocks and a tail, a max that
    keeps rising along the row (rescaling), -inf padding in whole blocks, ids outside the shard, M > BLOCK_M."""
    from dppo_verl.ops.kernels import load_vocab_stats_triton

    k = load_vocab_stats_triton()
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(6, 600, generator=g) * 3 + torch.linspace(-12.0, 12.0, 600)).to(dtype)
    x[1, :256] = float("-inf")  # a row whose first blocks are all -inf (the shift guard)
    x[2, 130:260] = float("-inf")  # -inf in the middle, across block edges
    x[3, 598] = 60.0  # peaked, in the tail block of the strided shard below
    x[4, [63, 64, 126, 128]] = 20.0  # heavy support ids on both sides of a block edge (local 63 | 64)
    for shard in (x[:, :300], x[:, ::2]):  # row-strided; column stride 2
        ids = torch.randint(900, 1400, (6, 12), generator=g)  # about 60% in [1000, 1300)
        ids[:, :6] = torch.tensor([1299, 1299, 999, 1300, 1063, 1064])  # duplicate, outside ids, a block edge
        exclude = torch.rand(6, 12, generator=g) < 0.5
        exclude[:, :6] = True  # outside ids must not exclude anything (1300 would hit the masked tail)
        st = k.triton_vocab_stats(shard, ids, vocab_start=1000, sq_exclude=exclude, block_v=64)
        xd = shard.double()
        m = xd.amax(-1)
        assert torch.equal(st.row_max.double(), m), (dtype, st.row_max, m)
        sumexp = (xd - m[:, None]).exp().sum(-1)
        torch.testing.assert_close(st.sumexp.double(), sumexp, rtol=2e-6, atol=0)
        local = ids - 1000
        inside = (local >= 0) & (local < 300)
        want = torch.where(inside, xd.gather(1, local.clamp(0, 299)), 0.0)
        assert torch.equal(st.gathered.double(), want), "gathered logits must be the stored values, exactly"
        keep = torch.ones_like(xd, dtype=torch.bool)
        for n in range(6):
            keep[n, local[n][exclude[n] & inside[n]]] = False
        q = ((2 * (xd - m[:, None])).exp() * keep).sum(-1)
        torch.testing.assert_close(st.rest_sq.double(), q, rtol=1e-5, atol=0)
    shard = x[:, ::2]
    ids = torch.randint(900, 1400, (6, 70), generator=g)  # M = 70: the gather runs in two 64-slot chunks
    st = k.triton_vocab_stats(shard, ids, vocab_start=1000, block_v=256)
    local = ids - 1000
    want = torch.where((local >= 0) & (local < 300), shard.double().gather(1, local.clamp(0, 299)), 0.0)
    assert st.rest_sq is None and torch.equal(st.gathered.double(), want)
    none = torch.zeros(6, 0, dtype=torch.long)  # M = 0: nothing gathered, nothing excluded
    st = k.triton_vocab_stats(shard, none, vocab_start=1000, sq_exclude=none.bool(), block_v=256)
    m = shard.double().amax(-1)
    want = (2 * (shard.double() - m[:, None])).exp().sum(-1)
    torch.testing.assert_close(st.rest_sq.double(), want, rtol=1e-5, atol=0)


def _check_bad_logits(group):
    from dppo_verl.ops.vocab_parallel import vocab_parallel_logprobs

    warnings.filterwarnings("ignore", "invalid value", RuntimeWarning)  # numpy's inf - inf in the interpreter
    bad = torch.randn(3, 200)
    bad[1, 150] = float("nan")
    with pytest.raises(ValueError, match="non-finite log-sum-exp at 1 rows.*row 1"):
        vocab_parallel_logprobs(bad, torch.zeros(3, 2, dtype=torch.long), tp_group=group, backend="triton")
    bad[1, 150] = float("inf")
    with pytest.raises(ValueError, match="NaN or inf"):
        vocab_parallel_logprobs(bad, torch.zeros(3, 2, dtype=torch.long), tp_group=group, backend="triton")


def _check_collectives(rank, tp, group):
    """The triton backend keeps the torch combine: three all-reduces, 2N + N*M floats (+ N with rest_sq)."""
    from dppo_verl.ops.vocab_parallel import vocab_parallel_stats

    logits, ids, exclude = _case(torch.float32)
    shard = logits[:, rank * (V // tp) : (rank + 1) * (V // tp)]
    calls, real = [], dist.all_reduce

    def counting(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
        calls.append((group, tensor.numel(), op))
        return real(tensor, op=op, group=group, async_op=async_op)

    dist.all_reduce = counting
    try:
        vocab_parallel_stats(shard, ids, tp_group=group, backend="triton")
        max_, sum_ = dist.ReduceOp.MAX, dist.ReduceOp.SUM
        assert calls == [(group, N, max_), (group, N, sum_), (group, N * 7, sum_)], calls
        calls.clear()
        vocab_parallel_stats(shard, ids, tp_group=group, sq_exclude=exclude, backend="triton")
        assert [c[1] for c in calls] == [N, 2 * N, N * 7]
    finally:
        dist.all_reduce = real


def _check_device_errors():
    """Devices Triton has no backend for are refused up front, as are mixed devices."""
    from dppo_verl.ops.kernels import load_vocab_stats_triton

    k = load_vocab_stats_triton()
    meta = torch.empty(2, 50, device="meta")
    with pytest.raises(RuntimeError, match="does not support meta tensors"):
        k.triton_vocab_stats(meta, torch.zeros(2, 1, dtype=torch.long, device="meta"), vocab_start=0)
    with pytest.raises(ValueError, match="ids are on cpu but logits on meta"):
        k.triton_vocab_stats(meta, torch.zeros(2, 1, dtype=torch.long), vocab_start=0)


def _pure_torch_ops_only():
    """Let ``dppo_verl.ops`` import without ``dppo_verl/__init__.py``, whose plugin install imports verl
    (~9 s of CPU per process, most of this test's time on two cores); the ops themselves are pure torch.
    Spawned workers only: the pytest process keeps the real package."""
    if "dppo_verl" not in sys.modules:
        pkg = types.ModuleType("dppo_verl")
        pkg.__path__ = list(importlib.util.find_spec("dppo_verl").submodule_search_locations)
        sys.modules["dppo_verl"] = pkg


def _worker(rank, world):
    os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton in this fresh process
    _pure_torch_ops_only()
    from dppo_verl.ops.kernels import load_vocab_stats_triton

    assert load_vocab_stats_triton().INTERPRETED, "triton was imported before TRITON_INTERPRET=1 was set"
    solo = [dist.new_group([r]) for r in range(world)][rank]  # every rank creates every group
    pair = dist.new_group(list(range(world)))
    for dtype in DTYPES:  # tp = 1 on a real (size-1) gloo group; the two ranks share the work
        if rank == 0:
            _check_op(0, 1, solo, dtype)
        else:
            _check_kernel_edges(dtype)
    if rank == 0:
        from dppo_verl.ops.vocab_parallel import vocab_parallel_logprobs

        logits, ids, _ = _case(torch.bfloat16)
        got = vocab_parallel_logprobs(logits, ids, tp_group=None, backend="triton")  # tp_group=None: local
        torch.testing.assert_close(got, vocab_parallel_logprobs(logits, ids, tp_group=solo, backend="triton"))
    else:
        _check_device_errors()
    _check_bad_logits(solo)
    for dtype in DTYPES:  # tp = 2
        _check_op(rank, 2, pair, dtype)
    _check_collectives(rank, 2, pair)


def test_triton_interpreter_gloo_tp1_tp2():
    run_distributed(_worker, 2)


def test_cpu_without_interpreter_is_a_clear_error():
    """In this (pytest) process triton, if imported at all, compiles: CPU logits must be refused by name."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("this pytest process runs with TRITON_INTERPRET set")
    pytest.importorskip("triton")
    from dppo_verl.ops.vocab_parallel import vocab_parallel_logprobs

    with pytest.raises(RuntimeError, match="got CPU logits.*TRITON_INTERPRET=1.*backend='auto'"):
        vocab_parallel_logprobs(torch.randn(2, 50), torch.zeros(2, 1, dtype=torch.long), backend="triton")


def test_missing_triton_is_a_clear_error(monkeypatch):
    from dppo_verl.ops.vocab_parallel import vocab_parallel_logprobs

    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` raises ImportError
    with pytest.raises(ImportError, match="backend='triton' needs the `triton` package"):
        vocab_parallel_logprobs(torch.randn(2, 50), torch.zeros(2, 1, dtype=torch.long), backend="triton")


@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION is unset")
@pytest.mark.parametrize("dtype, has_sq, unit_stride",
                         [("*bf16", True, True), ("*fp16", True, False), ("*fp32", False, True)])
def test_kernel_compiles_for_sm90(dtype, has_sq, unit_stride, monkeypatch, tmp_path):
    """The interpreter runs plain Python: this compiles the real kernel (Triton frontend, LLVM, ptxas) for an
    H100 without a GPU, so what the interpreter accepts but the compiler would not is caught here too."""
    from triton_aot import compile_sm90

    from dppo_verl.ops.kernels import load_vocab_stats_triton

    sig = dict(x_ptr=dtype, stride_xn="i64", stride_xv="constexpr" if unit_stride else "i64", ids_ptr="*i64",
               skip_ptr="*i64", max_ptr="*fp32", sumexp_ptr="*fp32", sq_ptr="*fp32", gathered_ptr="*fp32",
               V_local="i32", vocab_start="i32", M="i32", BLOCK_V="constexpr", BLOCK_M="constexpr", HAS_SQ="constexpr")
    consts = dict(BLOCK_V=4096, BLOCK_M=32, HAS_SQ=has_sq, **({"stride_xv": 1} if unit_stride else {}))
    compiled = compile_sm90(load_vocab_stats_triton()._vocab_stats_kernel, sig, consts, 8, monkeypatch, tmp_path)
    assert "ld.global" in compiled.asm["ptx"]
