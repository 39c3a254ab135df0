"""``policy_loss.fused_logprobs`` through verl's own engine code (issue #10 stage 2).

verl 0.9.1's ``FSDPEngineWithLMHead.prepare_model_outputs`` (packed rows, tp = 1) and
``MegatronEngineWithLMHead._lm_head_logits_processor`` (gloo tp = 2, THD and BSHD) run on ``object.__new__``
stubs (the technique of verl's own test_distillation_topk_symmetry_on_cpu.py), with our real plugin installed and
the Top-K processor called by the engine as in training. With the option on, ``log_probs``, their gradient (w.r.t.
the LM-head weight and the hidden states feeding the logits) and every ``dppo_*`` output must equal the option-off
run, and verl's own sampled-token pass (``logprobs_from_logits_v2`` / megatron-core's
``vocab_parallel_cross_entropy``) must not run at all. The Triton kernels run through the interpreter
(TRITON_INTERPRET=1 set before anything imports triton), so :func:`engine_checks` runs in the spawned gloo workers
of test_fused_logprob_on_cpu.py (one ~25 s import of verl + megatron-core per process serves both files).
In this process: the hand-off's refusals (other logits, an in-place write in between, no engine call) and the
config / launch-time rules.
"""

import functools
import logging
import os
import sys
import types

import pytest
import torch

V, K, H = 1000, 6, 16  # tp = 2: V_local = 500, not a power of two
PROMPTS, RESPS = [3, 5, 2, 4], [4, 2, 6, 3]


def _batch():
    from topk_batch import make_topk_batch

    n = sum(p + r for p, r in zip(PROMPTS, RESPS))
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(n, H, generator=g) * 0.5
    weight = torch.randn(V, H, generator=g)
    pi = (hidden.double() @ weight.double().T)  # the trainer's logits, for the rollout's top-K around them
    data, truth = make_topk_batch(PROMPTS, RESPS, V, K, pi_logits=pi, seed=1)
    return data, truth, hidden, weight


def _config(fused, direction="sampled"):
    from conftest import make_actor_config
    from dppo_verl.config import DPPOPolicyLossConfig

    pl = DPPOPolicyLossConfig(loss_mode="dppo_kl_topk", num_topk=K, direction=direction, fused_logprobs=fused)
    return make_actor_config(pl)


def _counting(module, name, calls):
    real = getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(name)
        return real(*args, **kwargs)

    setattr(module, name, counted)
    return real


def _fsdp_run(fused):
    """One micro-batch through FSDPEngineWithLMHead.prepare_model_outputs (rmpad, SP = 1), then backward."""
    import verl.utils.torch_functional as vf
    import verl.workers.utils.losses as L
    from verl.utils import tensordict_utils as tu
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

    data, truth, hidden, weight = _batch()
    engine = object.__new__(FSDPEngineWithLMHead)
    engine.use_ulysses_sp = False
    tu.assign_non_tensor(data, use_remove_padding=True, distillation_use_topk=True, distillation_only=False,
                         calculate_entropy=False)
    w = weight.clone().requires_grad_(True)
    h = hidden.clone().requires_grad_(True)
    ids = data["input_ids"].values()
    output_args = dict(input_ids_rmpad_rolled=torch.roll(ids, shifts=-1, dims=0), temperature_rmpad=torch.ones(len(ids)),
                       pad_size=0, temperature_is_one=True)
    calls = []
    real = _counting(vf, "logprobs_from_logits_v2", calls)
    try:
        out = engine.prepare_model_outputs(output=types.SimpleNamespace(logits=(h @ w.T)[None]), output_args=output_args,
                                           micro_batch=data, logits_processor_func=functools.partial(L.ppo_loss, config=_config(fused)))
    finally:
        vf.logprobs_from_logits_v2 = real
    lp = out["log_probs"].values()
    scale = torch.randn(lp.shape, generator=torch.Generator().manual_seed(4))
    (lp * scale).sum().backward()
    return dict(log_probs=lp.detach(), divergence=out["dppo_divergence"].values(), w_grad=w.grad, h_grad=h.grad), calls


def _megatron_run(rank, tp, fused, data_format, direction):
    """One call of MegatronEngineWithLMHead._lm_head_logits_processor on this rank's vocabulary shard, then backward."""
    import megatron.core.tensor_parallel as mtp
    import verl.workers.utils.losses as L
    from verl.models.mcore.util import preprocess_bshd_engine, preprocess_thd_engine
    from verl.workers.engine.megatron.transformer_impl import MegatronEngineWithLMHead

    data, truth, hidden, weight = _batch()
    prep = preprocess_thd_engine if data_format == "thd" else preprocess_bshd_engine
    offsets = torch.tensor(truth["offsets"])
    h = prep(torch.nested.nested_tensor_from_jagged(hidden, offsets), pre_process=True)[0].requires_grad_(True)
    label = prep(data["input_ids"], pre_process=True, need_roll=True)[0]  # [b, s_local], as the engine builds it
    v_local = V // tp
    w = weight[rank * v_local : (rank + 1) * v_local].clone().requires_grad_(True)  # a column-parallel head shard
    logits = h @ w.T  # [b, s_local, V/tp], contiguous as megatron-core's GPTModel returns it
    calls = []
    real = _counting(mtp, "vocab_parallel_cross_entropy", calls)
    try:
        ret = object.__new__(MegatronEngineWithLMHead)._lm_head_logits_processor(
            logits, label, torch.ones(label.shape), calculate_sum_pi_squared=False, calculate_entropy=False,
            distillation_use_topk=True, distillation_only=False, batch=data, data_format=data_format,
            logits_processor_func=functools.partial(L.ppo_loss, config=_config(fused, direction)))
    finally:
        mtp.vocab_parallel_cross_entropy = real
    scale = torch.randn(ret["log_probs"].shape, generator=torch.Generator().manual_seed(4))
    (ret["log_probs"] * scale).sum().backward()
    out = {k: v.detach() for k, v in ret.items()}
    return dict(out, w_grad=w.grad, h_grad=h.grad), calls


def _compare(off, on, what):
    assert off.keys() == on.keys(), (what, off.keys(), on.keys())
    for key in off:  # fp32 everywhere: the two paths differ by fp32 log-softmax rounding only
        torch.testing.assert_close(on[key], off[key], rtol=1e-5, atol=2e-6, msg=lambda m: f"{what} {key}: {m}")


def engine_checks(rank, world, results):
    """Spawned gloo rank (TRITON_INTERPRET=1 already set, the real plugin imported): run by
    test_fused_logprob_on_cpu.py's workers, which share one import of verl + megatron-core per process."""
    from megatron.core import parallel_state as mpu

    from dppo_verl.integrations import APPLIED
    from dppo_verl.integrations.actor.fused_logprob import STATS

    import verl.workers.engine.fsdp.transformer_impl  # noqa: F401  (the patches apply when the engines are imported)
    import verl.workers.engine.megatron.transformer_impl  # noqa: F401

    assert all(APPLIED[f"actor.{p}.{e}"].ok for e in ("fsdp", "megatron") for p in ("engine_context", "fused_logprob"))
    assert world == 2
    if rank == 0:
        off, verl_calls = _fsdp_run(False)
        assert verl_calls == ["logprobs_from_logits_v2"], verl_calls
        on, verl_calls = _fsdp_run(True)
        assert verl_calls == [], f"verl's log-prob pass read the logits again: {verl_calls}"
        _compare(off, on, "fsdp")
        results["fsdp"] = STATS["handed_off"]
    mpu.initialize_model_parallel(tensor_model_parallel_size=2)
    try:
        for data_format, direction in (("thd", "predictive"), ("bshd", "sampled")):
            off, verl_calls = _megatron_run(rank, 2, False, data_format, direction)
            assert verl_calls == ["vocab_parallel_cross_entropy"], verl_calls
            on, verl_calls = _megatron_run(rank, 2, True, data_format, direction)
            assert verl_calls == [], f"verl's log-prob pass read the logits again: {verl_calls}"
            _compare(off, on, f"megatron {data_format}")
            assert ("dppo_ddot" in on) == (direction == "predictive")
            results[f"megatron {data_format} rank{rank}"] = STATS["handed_off"]
    finally:
        mpu.destroy_model_parallel()
    assert STATS["unused"] == 0, STATS


ENGINE_RESULTS = {"fsdp": 1, "megatron thd rank0": 2, "megatron bshd rank0": 3, "megatron thd rank1": 1,
                  "megatron bshd rank1": 2}  # hand-offs counted per process after each option-on run


# ---- in this process: no Triton kernel runs -------------------------------------------------------------------------


def _handoff():
    import dppo_verl.plugin  # noqa: F401
    from dppo_verl.integrations.actor import fused_logprob as fl

    return fl


def _engine_call(labels):
    """One engine call's context, as the engine wrappers open it (dppo_verl.integrations.actor.engine_context)."""
    from dppo_verl.integrations.actor import engine_context

    return engine_context._engine_call(engine_context.EngineCall(labels=labels))


def test_handoff_only_for_the_same_logits_and_labels(caplog):
    fl = _handoff()
    calls = []
    verl_fn = fl._wrap_logprob_fn(lambda logits, labels, **kw: calls.append(1) or torch.zeros(labels.shape))
    logits, labels = torch.randn(5, 30), torch.randint(0, 30, (5,))
    mine = torch.full((5,), -1.0)
    with _engine_call(labels):
        with pytest.raises(ValueError, match=r"log pi\(a_t\) \[1, 5\] is not shaped like verl's labels \[5\]"):
            fl.offer(logits[None], labels, mine[None])
        fl.offer(logits[None], fl.current_labels(logits[None]), mine)  # FSDP: the processor sees [1, N, V]
        got = verl_fn(logits, labels)  # ... the log-prob pass [N, V]: the same rows, so ours is taken
        assert got.data_ptr() == mine.data_ptr() and calls == []
    cases = {
        "other logits": lambda: (logits.clone(), labels),
        "other labels": lambda: (logits, labels.clone()),
        "in-place write": lambda: (logits.mul_(1.0), labels),
        "transposed rows": lambda: (logits.T.contiguous().T, labels),
    }
    for what, make in cases.items():
        before = fl.STATS["unused"]
        with caplog.at_level(logging.WARNING, logger=fl.__name__), _engine_call(labels):
            fl.offer(logits, labels, mine)
            got = verl_fn(*make())
        assert got.data_ptr() != mine.data_ptr() and calls, what
        assert fl.STATS["unused"] == before + 1 and "did not take it" in caplog.text, what
        calls.clear()
    verl_fn(logits, labels)
    assert calls  # no engine call in progress: verl's own pass


def test_processor_refuses_without_engine_labels_or_gpu():
    fl = _handoff()
    with pytest.raises(RuntimeError, match="fused_logprobs=True: no verl engine call exposes the labels"):
        fl.current_labels(torch.randn(1, 4, 30))
    with _engine_call(torch.zeros(5, dtype=torch.long)):
        with pytest.raises(ValueError, match=r"labels \[5\] do not match the logits rows \[1, 4\]"):
            fl.current_labels(torch.randn(1, 4, 30))
    with pytest.raises(ValueError, match="fused_logprobs=True needs logits whose rows flatten"):
        fl.flat_rows(torch.randn(3, 4, 30).transpose(0, 1))
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0") and _has_triton():  # triton compiles here: CPU refused
        with pytest.raises(ValueError, match="policy_loss.fused_logprobs=True runs Triton kernels.*set fused_logprobs=False"):
            fl.require_triton(torch.randn(2, 30))


def _has_triton():
    import importlib.util

    return importlib.util.find_spec("triton") is not None


def test_missing_triton_names_the_key(monkeypatch):
    fl = _handoff()
    monkeypatch.setitem(sys.modules, "triton", None)
    with pytest.raises(ValueError, match="policy_loss.fused_logprobs=True needs the `triton` package"):
        fl.require_triton(torch.randn(2, 30))


def test_config_and_launch_rules():
    from dppo_verl.config import DPPOPolicyLossConfig
    from dppo_verl.launch.rules import actor_rule_violations

    with pytest.raises(ValueError, match="fused_logprobs=True needs a Top-K mode, got dppo_tv_binary"):
        DPPOPolicyLossConfig(loss_mode="dppo_tv_binary", fused_logprobs=True)
    with pytest.raises(ValueError, match="fused_logprobs must be true or false"):
        DPPOPolicyLossConfig(loss_mode="dppo_tv_topk", fused_logprobs="yes")
    assert DPPOPolicyLossConfig(loss_mode="dppo_tv_topk").fused_logprobs is False  # off by default
    cfg = {"actor_rollout_ref": {"actor": {"policy_loss": {"loss_mode": "dppo_tv_topk", "fused_logprobs": True}},
                                 "model": {"use_fused_kernels": True}}}
    problems = actor_rule_violations(cfg)
    assert any("policy_loss.fused_logprobs=True reads the logits" in p and "use_fused_kernels" in p for p in problems)
    import importlib.util

    real = importlib.util.find_spec
    try:
        importlib.util.find_spec = lambda name, *a: None if name == "triton" else real(name, *a)
        problems = actor_rule_violations(cfg)
    finally:
        importlib.util.find_spec = real
    assert any("fused_logprobs=True needs the `triton` package" in p for p in problems), problems
