"""GPU check of backend="triton" (compiled Triton kernel) against the dense fp64 reference, at V = 151936.

Runs only where CUDA and triton are available (never in CI: there the kernel runs through Triton's interpreter,
tests/test_triton_kernel_on_cpu.py). Speed lives in benchmarks/bench_vocab_parallel.py --device cuda.
"""

import pytest
import torch

import reference as ref
from dppo_verl.ops.vocab_parallel import vocab_parallel_logprobs, vocab_parallel_stats

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="needs a CUDA GPU (CPU coverage: test_triton_kernel_on_cpu.py)"),
]
V = 151936  # Qwen3
EPS32 = torch.finfo(torch.float32).eps


def _case(n, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, V, generator=g) * 4).to(dtype)
    logits[0, 17] = 40.0  # a peaked row
    ids = torch.randint(0, V, (n, 21), generator=g)
    ids[:, 1] = ids[:, 2]  # duplicates
    ids[:, 3] = logits.float().argmax(-1)
    return logits, ids


def _tol(logits):
    return 1e-5 + EPS32 * torch.logsumexp(logits.double(), -1, keepdim=True).abs()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_triton_matches_fp64_reference(dtype):
    pytest.importorskip("triton")
    logits, ids = _case(512, dtype)
    exclude = torch.rand(ids.shape, generator=torch.Generator().manual_seed(1)) < 0.7
    exclude[0] = True
    st = vocab_parallel_stats(logits.cuda(), ids.cuda(), sq_exclude=exclude.cuda(), backend="triton")
    err = (st.logp.cpu().double() - ref.logprobs_at(logits, ids)).abs()
    assert bool((err <= _tol(logits)).all()), f"max err {err.max():.3e}"
    p = ref.full_logprobs(logits).exp()
    keep = torch.ones_like(p, dtype=torch.bool)
    for n in range(p.shape[0]):
        keep[n, ids[n][exclude[n]]] = False
    torch.testing.assert_close(st.rest_sq.cpu().double(), (p.square() * keep).sum(-1), rtol=1e-4, atol=0)
    # and the compiled torch path on the same GPU agrees
    other = vocab_parallel_logprobs(logits.cuda(), ids.cuda(), backend="compile")
    torch.testing.assert_close(st.logp, other, rtol=0, atol=2e-5)


def test_triton_shard_offsets_and_strides():
    """The kernel on a column slice of a wider tensor (row stride 2 V_local) at a non-zero vocab_start."""
    pytest.importorskip("triton")
    from dppo_verl.ops.kernels import load_vocab_stats_triton

    k = load_vocab_stats_triton()
    logits, ids = _case(256, torch.bfloat16, seed=3)
    v_local = V // 2
    shard = logits.cuda()[:, v_local:]  # rank 1 of tp = 2, not contiguous
    st = k.triton_vocab_stats(shard, ids.cuda(), vocab_start=v_local)
    xd = logits[:, v_local:].double()
    m = xd.amax(-1)
    assert torch.equal(st.row_max.cpu().double(), m)
    torch.testing.assert_close(st.sumexp.cpu().double(), (xd - m[:, None]).exp().sum(-1), rtol=2e-6, atol=0)
    local = ids - v_local
    inside = (local >= 0) & (local < v_local)
    want = torch.where(inside, xd.gather(1, local.clamp(0, v_local - 1)), 0.0)
    assert torch.equal(st.gathered.cpu().double(), want)


def test_triton_rows_beyond_int32_offsets():
    """N * V_local > 2^31 elements: the row offset must be computed in int64 (last rows checked)."""
    pytest.importorskip("triton")
    n = 2**31 // V + 64  # 14198 rows, 4.3 GB in bf16
    if torch.cuda.get_device_properties(0).total_memory < 3 * n * V * 2:
        pytest.skip("not enough GPU memory")
    logits = torch.empty(n, V, dtype=torch.bfloat16, device="cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    for s in range(0, n, 1024):
        logits[s : s + 1024] = (torch.randn(min(1024, n - s), V, device="cuda", generator=g) * 4).bfloat16()
    ids = torch.randint(0, V, (n, 21), device="cuda")
    got = vocab_parallel_logprobs(logits, ids, backend="triton")
    tail = slice(n - 64, n)
    want = ref.logprobs_at(logits[tail].cpu(), ids[tail].cpu())
    err = (got[tail].cpu().double() - want).abs()
    assert bool((err <= _tol(logits[tail].cpu())).all()), f"max err {err.max():.3e}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_logprob_forward_backward_matches_fp64(dtype):
    """Issue #10 stage 2 compiled: log pi(label) and its gradient vs fp64 autograd. On a GPU the bf16 store rounds
    to nearest (fptrunc), so half the CPU interpreter's bound (which truncates) applies: 2^-8 |ref|."""
    pytest.importorskip("triton")
    from dppo_verl.ops.fused_logprob import fused_logprobs

    logits, ids = _case(256, dtype)
    labels = ids[:, 3]
    g = torch.randn(256, generator=torch.Generator().manual_seed(2))
    x = logits.cuda().requires_grad_(True)
    out = fused_logprobs(x, labels.cuda(), ids.cuda())
    (out.label_logp * g.cuda()).sum().backward()
    xd = logits.double().requires_grad_(True)
    y = ref.logprobs_at(xd, labels[:, None])[:, 0]
    (y * g.double()).sum().backward()
    assert bool(((out.label_logp.cpu().double() - y.detach()).abs() <= _tol(logits)[:, 0]).all())
    tol = g.double().abs()[:, None] * 2e-6 + (2.0**-8 * xd.grad.abs() if dtype == torch.bfloat16 else 0)
    err = (x.grad.cpu().double() - xd.grad).abs()
    assert bool((err <= tol).all()), f"grad max err {err.max():.3e}"
