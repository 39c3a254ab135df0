"""The Top-K logits hook (FSDP calling convention) against the dense fp64 partition divergence."""

import pytest
import torch

from dppo_verl.handoff import take_hook_checks

from conftest import make_actor_config
from dppo_verl.config import DPPOPolicyLossConfig
from topk_batch import hook_then_loss, make_topk_batch

V, K = 3000, 8
PROMPTS, RESPS = [3, 5, 2], [4, 2, 6]
ATOL = 5e-6  # fp32 log-probs turned into probabilities and summed over <= K + 2 cells (see test_divergence)


def _ppo_loss():
    import verl.workers.utils.losses as L

    return L.ppo_loss


def _response_rows(values, data, truth):
    """Packed per-row [N] -> [B, R] at the rows that predict response tokens."""
    out = torch.zeros_like(truth["div"]["tv"])
    for b, (p, r) in enumerate(zip(PROMPTS, RESPS)):
        start = truth["offsets"][b] + p - 1
        out[b, :r] = values[start : start + r].double()
    return out


@pytest.mark.parametrize("name", ["tv", "kl"])
@pytest.mark.parametrize("nested_layout", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hook_divergence_matches_reference(name, nested_layout, dtype):
    data, truth = make_topk_batch(PROMPTS, RESPS, V, K, nested_layout=nested_layout)
    if dtype == torch.bfloat16:  # the truth must be computed from the logits the hook actually sees
        data, truth = make_topk_batch(PROMPTS, RESPS, V, K, nested_layout=nested_layout,
                                      pi_logits=truth["pi_logits"].to(dtype).double())
    cfg = make_actor_config(DPPOPolicyLossConfig(loss_mode=f"dppo_{name}_topk", num_topk=K))
    logits = truth["pi_logits"].to(dtype).unsqueeze(0)  # [1, N, V], as FSDP hands it over
    before = logits.clone()
    out = _ppo_loss()(cfg, student_logits=logits, data=data)
    assert torch.equal(logits, before)
    assert set(out) == {"dppo_divergence", "dppo_support_size", "dppo_topk_valid"}
    n = logits.shape[1]
    assert out["dppo_divergence"].shape == (1, n) and out["dppo_support_size"].shape == (1, n)
    got = _response_rows(out["dppo_divergence"][0], data, truth)
    torch.testing.assert_close(got, truth["div"][name], rtol=0, atol=ATOL)
    size = _response_rows(out["dppo_support_size"][0], data, truth)
    torch.testing.assert_close(size.float(), truth["support_size"])
    assert bool((size[truth["support_size"] > 0] > 1).all())  # Top-K, not binary
    # every response row is its token's (1), every other row (prompt, mask-0 token, padding) reads "missing" (0)
    valid = _response_rows(out["dppo_topk_valid"][0], data, truth)
    torch.testing.assert_close(valid.float(), (truth["support_size"] > 0).float(), rtol=0, atol=0)
    assert int((out["dppo_topk_valid"][0] != 0).sum()) == int((truth["support_size"] > 0).sum())


def test_hook_output_reaches_the_loss():
    """model_output carries the hook's nested per-row scalars; the wrapper hands them to the loss."""
    from verl.utils import tensordict_utils as tu

    data, truth = make_topk_batch(PROMPTS, RESPS, V, K, spread=1.5)
    cfg = make_actor_config(DPPOPolicyLossConfig(loss_mode="dppo_tv_topk", num_topk=K, delta_low=0.05, delta_high=0.05))
    loss, metrics = hook_then_loss(cfg, data, truth, [torch.randn(r) for r in RESPS])
    mask = truth["support_size"] > 0
    assert metrics["actor/dppo/divergence_mean"].aggregate() == pytest.approx(float(truth["div"]["tv"][mask].mean()), abs=ATOL)
    assert metrics["actor/dppo/divergence_max"].aggregate() == pytest.approx(float(truth["div"]["tv"][mask].max()), abs=ATOL)
    assert metrics["actor/dppo/support_size"].aggregate() == pytest.approx(float(truth["support_size"][mask].mean()))
    assert metrics["actor/dppo/topk_valid_frac"].aggregate() == 1.0
    assert 0 < metrics["actor/dppo/masked_frac"].aggregate() < 1
    assert torch.isfinite(loss)


def test_missing_topk_tensors_and_k_mismatch():
    data, truth = make_topk_batch(PROMPTS, RESPS, V, K)
    logits = truth["pi_logits"].float().unsqueeze(0)
    cfg = make_actor_config(DPPOPolicyLossConfig(loss_mode="dppo_kl_topk", num_topk=K + 1))
    with pytest.raises(ValueError, match=rf"expected \[{K + 1}\].*dppo_num_topk={K + 1}"):
        _ppo_loss()(cfg, student_logits=logits, data=data)
    del data["rollout_topk_ids"]
    cfg = make_actor_config(DPPOPolicyLossConfig(loss_mode="dppo_kl_topk", num_topk=K))
    with pytest.raises(ValueError, match=r"needs batch keys \['rollout_topk_ids'\].*never falls back"):
        _ppo_loss()(cfg, student_logits=logits, data=data)


def test_ids_out_of_range_and_nan_topk_logprobs():
    data, truth = make_topk_batch(PROMPTS, RESPS, V, K)
    logits = truth["pi_logits"].float().unsqueeze(0)
    cfg = make_actor_config(DPPOPolicyLossConfig(loss_mode="dppo_tv_topk", num_topk=K))
    bad = data["rollout_topk_ids"].values().clone()
    bad[3, 2] = V + 7
    data["rollout_topk_ids"] = torch.nested.nested_tensor_from_jagged(bad, data["rollout_topk_ids"].offsets())
    _ppo_loss()(cfg, student_logits=logits, data=data)  # queued for the loss's one read, not read here
    with pytest.raises(ValueError, match=rf"rollout_topk_ids .* outside \[0, {V}\): {V + 7}"):
        take_hook_checks().run()  # what the loss of this micro-batch does, with its metrics
    data, truth = make_topk_batch(PROMPTS, RESPS, V, K)
    bad = data["rollout_topk_logprobs"].values().clone()
    bad[0, 0] = float("nan")
    data["rollout_topk_logprobs"] = torch.nested.nested_tensor_from_jagged(bad, data["rollout_topk_logprobs"].offsets())
    _ppo_loss()(cfg, student_logits=logits, data=data)
    with pytest.raises(ValueError, match="rollout_topk_logprobs .* NaN"):
        take_hook_checks().run()


def test_a_rollout_tensor_with_other_lengths_is_named():
    """The packed keys' per-sample lengths are checked in one queued flag; the message still names the key whose
    lengths differ from the responses', with both length lists."""
    data, truth = make_topk_batch(PROMPTS, RESPS, V, K)
    logits = truth["pi_logits"].float().unsqueeze(0)
    cfg = make_actor_config(DPPOPolicyLossConfig(loss_mode="dppo_tv_topk", num_topk=K))
    vals = data["rollout_log_probs"].values()
    shifted = torch.tensor([0, RESPS[0] + 1, RESPS[0] + RESPS[1], sum(RESPS)])  # one token moved to sample 1
    data["rollout_log_probs"] = torch.nested.nested_tensor_from_jagged(vals, shifted)
    _ppo_loss()(cfg, student_logits=logits, data=data)
    with pytest.raises(ValueError, match=r"^rollout_log_probs: per-sample lengths \[5, 1, 6\] differ from the "
                                         r"responses' \[4, 2, 6\] \(first at sample 0\)"):
        take_hook_checks().run()
