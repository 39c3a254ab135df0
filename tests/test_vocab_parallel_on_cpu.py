"""vocab_parallel_logprobs: gloo tp = 1, 2, 4 against the dense fp64 reference and megatron-core."""

import functools

import pytest
import torch
import torch.distributed as dist

import reference as ref
from dist_utils import run_distributed
from dppo_verl.ops.vocab_parallel import vocab_parallel_logprobs, vocab_parallel_stats

V = 151936  # Qwen3 vocabulary, divisible by 1, 2, 4
N = 24
EPS32 = torch.finfo(torch.float32).eps


@functools.lru_cache(maxsize=None)
def _case(dtype, tp):
    """Same full-vocab logits on every rank (seeded) and ids that stress the sharding."""
    g = torch.Generator().manual_seed(1234)
    logits = (torch.randn(N, V, generator=g) * 4.0).to(dtype)
    logits[0, 17] = 40.0  # a peaked row: lse dominated by one logit
    v_local = V // tp
    k = 6
    ids = torch.randint(0, V, (N, k), generator=g)
    bounds = torch.tensor([0, V - 1] + [r * v_local + d for r in range(1, tp) for d in (-1, 0)])
    ids[: len(bounds), 0] = bounds[: min(len(bounds), N)]  # shard boundaries
    ids[:, 1] = ids[:, 2]  # duplicated id in every row
    ids[:, 3] = logits.float().argmax(-1)  # the top token
    sampled = torch.randint(0, V, (N, 1), generator=g)
    return logits, torch.cat([ids, sampled], dim=1)  # sampled id appended: M = 7


@functools.lru_cache(maxsize=None)
def _reference(dtype, tp):
    logits, ids = _case(dtype, tp)
    return ref.logprobs_at(logits, ids)


def _tolerance(logits):
    lse = torch.logsumexp(logits.double(), -1, keepdim=True).abs()
    return 1e-5 + EPS32 * lse  # SPEC: fp32 log-softmax at V ~ 152k is a few 1e-6 off fp64


def _check_against_reference(rank, tp, group, dtype, chunk_bytes, backend):
    logits, ids = _case(dtype, tp)
    v_local = V // tp
    shard = logits[:, rank * v_local : (rank + 1) * v_local].clone()
    before = shard.clone()
    got = vocab_parallel_logprobs(shard, ids.int(), tp_group=group, chunk_bytes=chunk_bytes, backend=backend)
    assert torch.equal(shard, before), "the input shard was modified"
    want = _reference(dtype, tp)  # fp64 of the (possibly bf16) logits
    assert got.dtype == torch.float32 and got.shape == (N, ids.shape[1])
    err = (got.double() - want).abs()
    assert bool((err <= _tolerance(logits)).all()), f"max err {err.max():.3e} ({dtype}, tp={tp}, {backend})"


def _check_rest_sq(rank, tp, group):
    logits, ids = _case(torch.float32, tp)
    v_local = V // tp
    exclude = torch.rand(N, ids.shape[1], generator=torch.Generator().manual_seed(7)) < 0.7  # same on every rank
    exclude[0, :] = True  # includes the peaked id of row 0 -> the rest is tiny, cancellation would show
    st = vocab_parallel_stats(logits[:, rank * v_local : (rank + 1) * v_local], ids, tp_group=group,
                              sq_exclude=exclude, chunk_bytes=1 << 20)
    p = ref.full_logprobs(logits).exp()
    keep = torch.ones(N, V, dtype=torch.bool)
    for n in range(N):
        keep[n, ids[n][exclude[n]]] = False
    want = (p.square() * keep).sum(-1)
    torch.testing.assert_close(st.rest_sq.double(), want, rtol=1e-4, atol=1e-12)
    lse = torch.logsumexp(logits.double(), -1)
    assert bool(((st.lse.double() - lse).abs() <= 1e-5 + EPS32 * lse.abs()).all())


def _check_megatron_peer(rank, tp):
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    try:
        group = parallel_state.get_tensor_model_parallel_group()
        logits, ids = _case(torch.float32, tp)
        v_local = V // tp
        shard = logits[:, rank * v_local : (rank + 1) * v_local]
        target = ids[:, -1]
        # megatron wants [s, b, V/tp]; it may work in place, so hand it a copy
        ce = vocab_parallel_cross_entropy(shard.clone()[:, None, :], target[:, None])[:, 0]
        ours = vocab_parallel_logprobs(shard, target[:, None], tp_group=group)[:, 0]
        torch.testing.assert_close(ours, -ce, rtol=0, atol=2e-5)
    finally:
        parallel_state.destroy_model_parallel()


def _check_collectives(rank, tp, group):
    """Exactly three all-reduces on the passed group, 2N + N*M floats (3N with the optional statistic)."""
    logits, ids = _case(torch.float32, tp)
    v_local = V // tp
    shard = logits[:, rank * v_local : (rank + 1) * v_local]
    calls = []
    real = dist.all_reduce

    def counting(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
        calls.append((group, tensor.numel(), op))
        return real(tensor, op=op, group=group, async_op=async_op)

    dist.all_reduce = counting
    try:
        vocab_parallel_logprobs(shard, ids, tp_group=group)
        m = ids.shape[1]
        assert [c[0] for c in calls] == [group] * 3, calls
        assert sum(c[1] for c in calls) == 2 * N + N * m
        assert [c[2] for c in calls] == [dist.ReduceOp.MAX, dist.ReduceOp.SUM, dist.ReduceOp.SUM]
        calls.clear()
        vocab_parallel_stats(shard, ids, tp_group=group, sq_exclude=torch.ones_like(ids, dtype=torch.bool))
        assert len(calls) == 3 and sum(c[1] for c in calls) == 3 * N + N * m
    finally:
        dist.all_reduce = real


def _worker(rank, tp):
    group = dist.new_group(list(range(tp)))
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        _check_against_reference(rank, tp, group, dtype, chunk_bytes=4 << 20, backend="eager")  # several chunks
        _check_against_reference(rank, tp, group, dtype, chunk_bytes=4 << 20, backend="compile")
    _check_against_reference(rank, tp, group, torch.float32, chunk_bytes=1, backend="eager")  # one row per chunk
    _check_rest_sq(rank, tp, group)
    if tp > 1:
        _check_collectives(rank, tp, group)
    _check_megatron_peer(rank, tp)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_vocab_parallel_gloo(tp):
    run_distributed(_worker, tp)


def test_tp_none_is_local_and_matches_reference():
    logits, ids = _case(torch.bfloat16, 1)
    got = vocab_parallel_logprobs(logits, ids, tp_group=None)
    err = (got.double() - ref.logprobs_at(logits, ids)).abs()
    assert bool((err <= _tolerance(logits)).all())


def test_bad_inputs():
    logits = torch.randn(4, 100)
    ids = torch.randint(0, 100, (4, 3))
    with pytest.raises(ValueError, match=r"ids \(shape \[4, 3\]\) out of range \[0, 100\)"):
        vocab_parallel_logprobs(logits, torch.where(ids == ids[0, 0], 100, ids).index_fill(1, torch.tensor([0]), 100))
    with pytest.raises(ValueError, match="out of range"):
        vocab_parallel_logprobs(logits, ids - 200)
    with pytest.raises(ValueError, match="ids must be int32 or int64"):
        vocab_parallel_logprobs(logits, ids.float())
    with pytest.raises(ValueError, match=r"ids has shape \[5, 3\], expected \[4, \*\]"):
        vocab_parallel_logprobs(logits, torch.randint(0, 100, (5, 3)))
    with pytest.raises(ValueError, match=r"logits has shape \[4, 100, 1\]"):
        vocab_parallel_logprobs(logits[..., None], ids)
    bad = logits.clone()
    bad[2, 7] = float("nan")
    with pytest.raises(ValueError, match="non-finite log-sum-exp at 1 rows.*row 2"):
        vocab_parallel_logprobs(bad, ids)
    bad[2, 7] = float("inf")
    with pytest.raises(ValueError, match="NaN or inf"):
        vocab_parallel_logprobs(bad, ids)


def test_ids_checked_skips_only_the_range_flag():
    """``ids_checked``: the caller queued the ids' range check (the Top-K hook, through build_support); the op does
    not queue it again, still checks its log-sum-exp, and an out-of-range id never faults the gather."""
    from dppo_verl.ops.checks import DeferredChecks

    logits, ids = _case(torch.float32, 1)
    checks = DeferredChecks()
    got = vocab_parallel_stats(logits, ids, checks=checks, ids_checked=True).logp
    assert len(checks) == 1  # the finite log-sum-exp check only
    checks.run()
    err = (got.double() - ref.logprobs_at(logits, ids)).abs()
    assert bool((err <= _tolerance(logits)).all())
    bad = ids.clone()
    bad[0, 0] = logits.shape[1] + 5
    vocab_parallel_stats(logits, bad, checks=DeferredChecks(), ids_checked=True)  # no IndexError
    with pytest.raises(ValueError, match="out of range"):
        vocab_parallel_stats(logits, bad)


def test_no_grad_and_forward_only():
    logits = torch.randn(3, 50, requires_grad=True)
    out = vocab_parallel_logprobs(logits, torch.zeros(3, 1, dtype=torch.long))
    assert not out.requires_grad


@pytest.mark.parametrize("backend", ["eager", "compile"])
def test_masked_vocab_padding_and_strided_shards(backend):
    """-inf logits (padded vocabulary) in whole blocks, and a shard that is a strided column slice."""
    full = torch.randn(5, 2 * 8192) * 3
    full[:, 8192 - 4096 :] = float("-inf")  # the tail of the first half is masked padding
    ids = torch.randint(0, 4096, (5, 4))
    shard = full[:, :8192]  # not contiguous: row stride 16384
    got = vocab_parallel_logprobs(shard, ids, backend=backend)
    want = ref.logprobs_at(shard.contiguous(), ids)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5)
    got = vocab_parallel_logprobs(full[:, ::2], ids, backend=backend)  # column stride 2
    torch.testing.assert_close(got.double(), ref.logprobs_at(full[:, ::2].contiguous(), ids), rtol=0, atol=1e-5)


def test_compile_failure_falls_back_to_row_chunks(monkeypatch, caplog):
    """When torch.compile fails (backend auto), the eager fallback runs in row chunks of at most ``chunk_bytes``:
    never one ``[N, V_local]`` fp32 temporary (issue #18 item 3), and still the exact log-softmax."""
    import dppo_verl.ops.vocab_parallel as vp

    def broken(_x):
        raise RuntimeError("inductor unavailable (simulated)")

    n, v, m = 64, 1000, 5
    chunk_bytes = 8 * v * 4 * vp._TEMPS_PER_ELEMENT  # 8 rows per chunk
    seen_rows = []
    real_eager = vp._lse_eager

    def spying(x):
        seen_rows.append(x.shape[0])
        return real_eager(x)

    monkeypatch.setattr(vp, "_compiled_lse", broken)
    monkeypatch.setattr(vp, "_compile_failed", False)
    monkeypatch.setattr(vp, "_lse_eager", spying)
    logits = torch.randn(n, v) * 3
    ids = torch.randint(0, v, (n, m))
    with caplog.at_level("WARNING"):
        got = vocab_parallel_logprobs(logits, ids, chunk_bytes=chunk_bytes, backend="auto")
    assert "row-chunked" in caplog.text
    assert vp._compile_failed
    assert seen_rows and max(seen_rows) == 8 and sum(seen_rows) == n, seen_rows
    torch.testing.assert_close(got.double(), ref.logprobs_at(logits.double(), ids), rtol=0, atol=2e-6)
    seen_rows.clear()  # later calls go straight to the chunks, without trying to compile again
    vocab_parallel_logprobs(logits, ids, chunk_bytes=chunk_bytes, backend="auto")
    assert max(seen_rows) == 8 and sum(seen_rows) == n
    with pytest.raises(RuntimeError, match="simulated"):  # backend=compile never falls back
        vocab_parallel_logprobs(logits, ids, chunk_bytes=chunk_bytes, backend="compile")
