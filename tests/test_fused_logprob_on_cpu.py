"""dppo_verl.ops.fused_logprob (issue #10 stage 2) through Triton's CPU interpreter, gloo tp = 1, 2.

log pi(a_t) and its gradient w.r.t. the logits shard, against dense fp64 autograd of log_softmax + gather
(tests/reference.py) and against verl's own paths: FSDP ``logprobs_from_logits`` at tp = 1 and Megatron
``vocab_parallel_log_probs_from_logits`` (megatron-core's ``vocab_parallel_cross_entropy``) at tp = 2.
Interpreter rules as in test_triton_kernel_on_cpu.py: TRITON_INTERPRET=1 must be set before triton is imported,
so everything interpreted runs in spawned gloo workers; one spawn of two ranks covers tp = 1 (a size-1 group per
rank, rank 0 the op, rank 1 the backward kernel's edge cases), tp = 2, and then the engine checks of
test_fused_logprob_engine_on_cpu.py (verl's FSDP / Megatron code with policy_loss.fused_logprobs on vs off),
which share the workers' one import of verl + megatron-core.

Tolerances (per element; ``g`` the upstream gradient, ``lse`` the row's log-sum-exp):
- forward: ``1e-5 + eps32 |lse|``, the SPEC's bound for fp32 log-softmax (as stage 1);
- gradient, fp32 logits: the kernel rounds ``p = exp(x - lse)`` with an fp32 ``lse`` off by ~eps32 |lse|
  (plus the exp's own ulp), so ``|err| <= |g| (p (4 eps32 (1 + |lse|)) + eps32)``; we allow ``|g| * 2e-6``
  flat, a few times the largest such term at these magnitudes (measured: ~2e-7);
- gradient, bf16 logits: one final narrowing to bf16 on top of the fp32 error: ``2^-7 |ref| + |g| * 2e-6``, one
  bf16 ulp (relative). Compiled Triton narrows with fptrunc (round to nearest even, <= 2^-8 |ref|), but triton
  3.9.0's interpreter truncates fp32 -> bf16 (``cast_impl`` passes no rounding mode; measured 0.74% relative),
  so the CPU bound is the full ulp. The fp64 reference is computed from the same bf16 values.
"""

import os
import sys

import pytest
import torch
import torch.distributed as dist

import reference as ref
from dist_utils import run_distributed

V = 10006  # tp = 2: V_local = 5003, not a multiple of the 1024-wide backward block nor of the 4096 forward block
N = 10
EPS32 = torch.finfo(torch.float32).eps
BF16_ULP = 2.0**-7  # one bf16 ulp, relative (see the module docstring)


def _case(dtype):
    g = torch.Generator().manual_seed(77)
    logits = (torch.randn(N, V, generator=g) * 4.0).to(dtype)
    logits[0, 17] = 40.0  # a peaked row: pi(17) ~ 1, gradient ~ g (1 - pi) at the label
    logits[1, V - 3] = 40.0  # ... peak on the last shard, in its tail block
    labels = torch.randint(0, V, (N,), generator=g)
    labels[:4] = torch.tensor([17, V - 3, V // 2 - 1, V // 2])  # the peak; the tp = 2 boundary from both sides
    support = torch.randint(0, V, (N, 5), generator=g)
    support[:, 0] = labels  # the sampled token is in the support, as in the hook
    grad_out = torch.randn(N, generator=g)
    grad_out[5] = 0.0  # e.g. a prompt row: its gradient must be exactly 0
    return logits, labels, support, grad_out


def _fp64_reference(logits, labels, support, grad_out):
    """(log pi(labels) [N], log pi(support) [N, M], d(sum g * log pi(labels)) / d logits [N, V]), all fp64."""
    x = logits.double().requires_grad_(True)
    y = ref.logprobs_at(x, labels[:, None])[:, 0]
    (y * grad_out.double()).sum().backward()
    return y.detach(), ref.logprobs_at(logits, support), x.grad


def _grad_tol(dtype, want, grad_out):
    tol = grad_out.double().abs()[:, None] * 2e-6
    return tol + BF16_ULP * want.abs() if dtype == torch.bfloat16 else tol


def _check_op(rank, tp, group, dtype, backward="triton"):
    from dppo_verl.ops.fused_logprob import fused_logprobs

    logits, labels, support, grad_out = _case(dtype)
    v_local = V // tp
    cols = slice(rank * v_local, (rank + 1) * v_local)
    shard = logits[:, cols].clone().requires_grad_(True)
    before = shard.detach().clone()
    out = fused_logprobs(shard, labels, support, tp_group=group, backward=backward)
    (out.label_logp * grad_out).sum().backward()
    assert torch.equal(shard.detach(), before), "the logits were modified"
    y, sup, grad = _fp64_reference(logits, labels, support, grad_out)
    lse = torch.logsumexp(logits.double(), -1)
    tol = 1e-5 + EPS32 * lse.abs()
    assert out.label_logp.dtype == torch.float32 and out.label_logp.requires_grad
    assert not out.support_logp.requires_grad and out.rest_sq is None
    err = (out.label_logp.double() - y).abs()
    assert bool((err <= tol).all()), f"label logp err {err.max():.3e} ({dtype}, tp={tp})"
    assert bool(((out.support_logp.double() - sup).abs() <= tol[:, None]).all()), f"support ({dtype}, tp={tp})"
    want = grad[:, cols]
    assert shard.grad.dtype == dtype and shard.grad.shape == shard.shape
    gerr = (shard.grad.double() - want).abs()
    assert bool((gerr <= _grad_tol(dtype, want, grad_out)).all()), f"grad err {gerr.max():.3e} ({dtype}, tp={tp})"
    assert bool((shard.grad[5] == 0).all()), "a row with zero upstream gradient must get exactly 0"
    return float(err.max()), float(gerr.max())


def _check_verl_fsdp(dtype):
    """verl's FSDP sampled-token pass (tp = 1), forward and gradient, vs ours on the same logits."""
    from verl.utils.torch_functional import logprobs_from_logits

    from dppo_verl.ops.fused_logprob import fused_logprobs

    logits, labels, support, grad_out = _case(dtype)
    a = logits.clone().requires_grad_(True)
    b = logits.clone().requires_grad_(True)
    ours = fused_logprobs(a, labels, support).label_logp
    theirs = logprobs_from_logits(b, labels)
    (ours * grad_out).sum().backward()
    (theirs.float() * grad_out).sum().backward()
    lse = torch.logsumexp(logits.double(), -1)
    if dtype == torch.float32:  # both fp32 all the way: equal up to fp32 log-softmax rounding
        torch.testing.assert_close(ours, theirs, rtol=0, atol=float((1e-5 + EPS32 * lse.abs()).max()))
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=2e-6)
    else:  # verl's bf16 path rounds log-softmax and its gradient to bf16: two bf16 roundings apart at most
        torch.testing.assert_close(ours, theirs.float(), rtol=2 * BF16_ULP, atol=1e-5)
        torch.testing.assert_close(a.grad.float(), b.grad.float(), rtol=2 * BF16_ULP, atol=2e-6 + 2 * BF16_ULP * 0.1)


def _check_verl_megatron(rank, tp):
    """verl's Megatron pass (-vocab_parallel_cross_entropy) at tp = 2, forward and gradient, vs ours."""
    from megatron.core import parallel_state as mpu
    from verl.utils.megatron.tensor_parallel import vocab_parallel_log_probs_from_logits

    from dppo_verl.ops.fused_logprob import fused_logprobs

    mpu.initialize_model_parallel(tensor_model_parallel_size=tp)
    try:
        logits, labels, support, grad_out = _case(torch.float32)
        v_local = V // tp
        shard = logits[:, rank * v_local : (rank + 1) * v_local].contiguous()
        a = shard.clone().requires_grad_(True)
        b = shard.clone().requires_grad_(True)
        ours = fused_logprobs(a, labels, support, tp_group=mpu.get_tensor_model_parallel_group()).label_logp
        theirs = vocab_parallel_log_probs_from_logits(b.clone()[None], labels[None])[0]  # [1, N, V/tp] as THD
        (ours * grad_out).sum().backward()
        (theirs * grad_out).sum().backward()
        lse = torch.logsumexp(logits.double(), -1)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=float((1e-5 + EPS32 * lse.abs()).max()))
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=2e-6)
    finally:
        mpu.destroy_model_parallel()


def _check_grad_kernel_edges(dtype):
    """The backward kernel alone: blocks of 64 over a 300-wide shard at offset 1000 (several blocks and a tail),
    column-strided logits, -inf padding, labels outside the shard, against the torch twin and fp64."""
    from dppo_verl.ops.fused_logprob import logprob_grad_torch
    from dppo_verl.ops.kernels import load_logprob_grad_triton

    k = load_logprob_grad_triton()
    g = torch.Generator().manual_seed(9)
    x = (torch.randn(6, 600, generator=g) * 3).to(dtype)
    x[1, 256:] = float("-inf")  # padding columns: gradient exactly 0 there
    for shard in (x[:, :300], x[:, ::2]):
        lse = torch.logsumexp(shard.double(), -1) + torch.rand(6, generator=g, dtype=torch.float64)  # other ranks' mass
        label = torch.tensor([0, 63, 64, 299, -1, 5000 - 1000])  # block edges, the tail, outside (both sides)
        local = torch.where((label >= 0) & (label < 300), label, -1)
        gr = torch.randn(6, generator=g)
        got = k.triton_logprob_grad(shard, local, lse.float(), gr, block_v=64)
        twin = logprob_grad_torch(shard, local, lse.float(), gr, chunk_bytes=4 * 300 * 2 * 4)  # 4-row chunks
        p = torch.exp(shard.double() - lse[:, None])
        want = -gr.double()[:, None] * p
        inside = local >= 0
        want[inside.nonzero()[:, 0], local[inside]] += gr.double()[inside]
        tol = _grad_tol(dtype, want, gr)
        assert got.dtype == dtype and got.is_contiguous()
        assert bool(((got.double() - want).abs() <= tol).all()), (dtype, (got.double() - want).abs().max())
        assert bool(((twin.double() - want).abs() <= tol).all()), (dtype, (twin.double() - want).abs().max())
        assert bool((got[shard == float("-inf")] == 0).all())


def _check_rest_sq(group):
    """With sq_exclude the same pass also gives sum_{j not in S} pi_j^2, equal to the stage-1 op's."""
    from dppo_verl.ops.fused_logprob import fused_logprobs
    from dppo_verl.ops.vocab_parallel import vocab_parallel_stats

    logits, labels, support, _ = _case(torch.float32)
    exclude = torch.ones_like(support, dtype=torch.bool)
    exclude[:, 2] = False
    out = fused_logprobs(logits, labels, support, tp_group=group, sq_exclude=exclude)
    st = vocab_parallel_stats(logits, support, tp_group=group, sq_exclude=exclude, backend="triton")
    torch.testing.assert_close(out.rest_sq, st.rest_sq, rtol=1e-6, atol=0)
    torch.testing.assert_close(out.support_logp, st.logp, rtol=0, atol=0)


def _worker(rank, world, results):
    os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton in this fresh process
    import dppo_verl.plugin  # noqa: F401  (the real plugin, for the engine checks; it imports verl, which imports triton)
    from dppo_verl.ops.kernels import load_vocab_stats_triton
    from test_fused_logprob_engine_on_cpu import engine_checks

    assert load_vocab_stats_triton().INTERPRETED, "triton was imported before TRITON_INTERPRET=1 was set"
    solo = [dist.new_group([r]) for r in range(world)][rank]
    pair = dist.new_group(list(range(world)))
    if rank == 0:  # tp = 1
        for dtype in (torch.float32, torch.bfloat16):
            results[f"tp1 {dtype}"] = _check_op(0, 1, solo, dtype)
            _check_verl_fsdp(dtype)
        results["tp1 torch backward"] = _check_op(0, 1, None, torch.float32, backward="torch")
    else:
        for dtype in (torch.float32, torch.bfloat16):
            _check_grad_kernel_edges(dtype)
        _check_rest_sq(solo)
    for dtype in (torch.float32, torch.bfloat16):  # tp = 2: labels in the other shard on every rank
        results[f"tp2 rank{rank} {dtype}"] = _check_op(rank, 2, pair, dtype)
    _check_rest_sq(pair)
    _check_verl_megatron(rank, 2)
    engine_checks(rank, world, results)  # tests/test_fused_logprob_engine_on_cpu.py, sharing these imports


def test_fused_logprob_and_engines_interpreter_gloo_tp1_tp2():
    from test_fused_logprob_engine_on_cpu import ENGINE_RESULTS

    results = dict(_spawn_results())
    engine = {k: results.pop(k) for k in ENGINE_RESULTS}
    assert engine == ENGINE_RESULTS, engine
    assert len(results) == 7, results
    print({k: f"logp {v[0]:.1e} grad {v[1]:.1e}" for k, v in sorted(results.items())})


def _spawn_results():
    results = torch.multiprocessing.get_context("spawn").Manager().dict()
    run_distributed(_worker, 2, results)
    return results


def test_argument_errors():
    from dppo_verl.ops.fused_logprob import fused_logprobs

    x = torch.randn(3, 40)
    with pytest.raises(ValueError, match="labels"):
        fused_logprobs(x, torch.zeros(4, dtype=torch.long), torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="labels must be int32 or int64"):
        fused_logprobs(x, torch.zeros(3), torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="backward must be one of"):
        fused_logprobs(x, torch.zeros(3, dtype=torch.long), torch.zeros(3, 2, dtype=torch.long), backward="cuda")


def test_missing_triton_is_a_clear_error(monkeypatch):
    from dppo_verl.ops.fused_logprob import fused_logprobs

    monkeypatch.setitem(sys.modules, "triton", None)
    with pytest.raises(ImportError, match="needs the `triton` package"):
        fused_logprobs(torch.randn(2, 50), torch.zeros(2, dtype=torch.long), torch.zeros(2, 1, dtype=torch.long))


@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION is unset")
@pytest.mark.parametrize("dtype, unit_stride", [("bf16", True), ("fp32", False)])
def test_grad_kernel_compiles_for_sm90(dtype, unit_stride, monkeypatch, tmp_path):
    """Ahead-of-time compile of the backward kernel for an H100 (no GPU needed), as for the stage-1 kernel:
    catches what the interpreter accepts but the compiler would not (e.g. the fp32 -> bf16 store)."""
    from triton_aot import compile_sm90

    from dppo_verl.ops.kernels import load_logprob_grad_triton

    sig = dict(x_ptr=f"*{dtype}", stride_xn="i64", stride_xv="constexpr" if unit_stride else "i64", lse_ptr="*fp32",
               g_ptr="*fp32", label_ptr="*i64", out_ptr=f"*{dtype}", stride_on="i64", V_local="i32", BLOCK_V="constexpr")
    consts = dict(BLOCK_V=1024, **({"stride_xv": 1} if unit_stride else {}))
    compiled = compile_sm90(load_logprob_grad_triton()._logprob_grad_kernel, sig, consts, 4, monkeypatch, tmp_path)
    assert "st.global" in compiled.asm["ptx"]
