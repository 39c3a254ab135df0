"""Engine output -> [T, K] / [B, T, K] top-K tensors, with vLLM's own Logprob class."""

import math

import numpy as np
import pytest
import torch

from dppo_verl.integrations.rollout_topk import pad_topk_batch, requested_topk, topk_arrays_from_vllm


def _vllm_step(logits, k, sampled):
    """What vLLM puts in CompletionOutput.logprobs for one token: top-k by rank, plus the sampled one if outside."""
    from vllm.logprobs import Logprob

    lp = torch.log_softmax(torch.tensor(logits, dtype=torch.float64), -1)
    order = torch.argsort(lp, descending=True).tolist()
    out = {t: Logprob(logprob=float(lp[t]), rank=r + 1) for r, t in enumerate(order[:k])}
    if sampled not in out:
        out[sampled] = Logprob(logprob=float(lp[sampled]), rank=order.index(sampled) + 1)
    return out, lp, order


def test_ranks_untouched_and_sampled_not_written():
    g = torch.Generator().manual_seed(0)
    k, steps, truth = 4, [], []
    for sampled_rank in (0, 2, 9):  # sampled token: rank 1, inside, outside the top-K
        logits = torch.randn(50, generator=g).tolist()
        order = torch.argsort(torch.tensor(logits), descending=True).tolist()
        step, lp, order = _vllm_step(logits, k, order[sampled_rank])
        steps.append(step)
        truth.append((order[:k], lp[order[:k]]))
    ids, lps = topk_arrays_from_vllm(steps, k)
    assert ids.dtype == np.int32 and lps.dtype == np.float32 and ids.shape == (3, k)
    for i, (want_ids, want_lp) in enumerate(truth):
        assert ids[i].tolist() == want_ids  # ranks 1..K in order, the 10th-ranked sampled token is not there
        np.testing.assert_allclose(lps[i], want_lp.numpy(), rtol=0, atol=1e-6)


def test_missing_ranks_are_padded_and_errors():
    from vllm.logprobs import Logprob

    ids, lps = topk_arrays_from_vllm([{7: Logprob(-0.1, 1)}], 3)
    assert ids.tolist() == [[7, 0, 0]] and lps[0, 0] == np.float32(-0.1) and math.isinf(lps[0, 1])
    with pytest.raises(ValueError, match="no logprobs for generated token 0.*logprobs=3"):
        topk_arrays_from_vllm([None], 3)
    with pytest.raises(ValueError, match="no rank"):
        topk_arrays_from_vllm([{1: Logprob(-0.1, None)}], 3)


def test_pad_batch_and_requested_k():
    a = (np.arange(6, dtype=np.int32).reshape(3, 2), np.full((3, 2), -1.0, np.float32))
    b = (np.arange(2, dtype=np.int32).reshape(1, 2), np.full((1, 2), -2.0, np.float32))
    ids, lps = pad_topk_batch([a, b], 4)
    assert ids.shape == (2, 4, 2) and ids.dtype == torch.int32 and lps.dtype == torch.float32
    assert ids[0, :3].flatten().tolist() == list(range(6)) and bool(torch.isinf(lps[1, 1:]).all())
    assert requested_topk({"custom": {"dppo_num_topk": 20}}) == 20 and requested_topk({"custom": None}) is None
    with pytest.raises(ValueError, match="dppo_num_topk must be a positive integer"):
        requested_topk({"custom": {"dppo_num_topk": 0}})


def test_agent_loop_output_carries_topk_into_the_v1_batch():
    """verl's real AgentLoopOutput.as_dict (wrapped) and its batching helper give [B, R, K] next to rollout_log_probs."""
    from verl.experimental.agent_loop.agent_loop import AgentLoopMetrics, AgentLoopOutput
    from verl.utils.tensordict_utils import list_of_dict_to_tensordict

    from dppo_verl.integrations.rollout_topk import align_to_response

    k = 3
    outs = []
    for r, mask in ((4, [1, 1, 0, 1]), (2, [1, 1])):  # sample 0: a mask-0 token inserted by the agent loop
        g = sum(mask)
        ids = np.arange(g * k, dtype=np.int32).reshape(g, k) + 10
        lps = -np.arange(g * k, dtype=np.float32).reshape(g, k) / 10
        outs.append(AgentLoopOutput(prompt_ids=[1, 2], response_ids=list(range(5, 5 + r)), response_mask=mask,
                                    response_logprobs=[-0.5] * r, metrics=AgentLoopMetrics(),
                                    extra_fields={"rollout_topk_ids": ids, "rollout_topk_logprobs": lps}))
    dicts = [o.as_dict() for o in outs]
    d0 = dicts[0]
    assert d0["rollout_topk_ids"].dtype == torch.int32 and d0["rollout_topk_logprobs"].dtype == torch.float32
    assert d0["rollout_topk_ids"].shape == (4, k) and d0["rollout_topk_ids"][3].tolist() == [16, 17, 18]
    assert d0["rollout_topk_ids"][2].tolist() == [0, 0, 0] and bool(torch.isinf(d0["rollout_topk_logprobs"][2]).all())
    assert "rollout_topk_ids" not in d0["extra_fields"]
    td = list_of_dict_to_tensordict(dicts)
    assert td["rollout_topk_ids"].is_nested and td["rollout_topk_ids"].offsets().diff().tolist() == [4, 2]
    assert td["rollout_log_probs"].offsets().diff().tolist() == [4, 2]
    with pytest.raises(ValueError, match="top-K has 1 rows but the response has 2 generated tokens"):
        align_to_response(np.zeros((1, k), np.int32), np.zeros((1, k), np.float32), [1, 1])
