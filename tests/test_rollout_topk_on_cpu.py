"""Engine output -> [T, K] / [B, T, K] top-K tensors, with vLLM's own Logprob class."""

import math

import numpy as np
import pytest
import torch

from dppo_verl.integrations.rollout.topk_arrays import pad_topk_batch, requested_topk
from dppo_verl.integrations.rollout.vllm_server import topk_arrays_from_vllm


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

    from dppo_verl.integrations.rollout.topk_arrays import align_to_response

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
    multi = AgentLoopOutput(prompt_ids=[1, 2], response_ids=[5, 6], response_mask=[1, 1], num_turns=4,
                            response_logprobs=[-0.5] * 2, metrics=AgentLoopMetrics(),
                            extra_fields={"rollout_topk_ids": ids, "rollout_topk_logprobs": lps})
    with pytest.raises(ValueError, match=r"multi-turn trajectory \(num_turns=4\).*binary mode"):
        multi.as_dict()  # the tool agent's trajectory: refused by name, not by a row count deep in the actor


def _internal_output(prompt_len, response_mask, k, seed):
    """verl's padded per-sample output as the legacy trainer's ``_postprocess`` receives it (``[1, P]``/``[1, T]``)."""
    from verl.experimental.agent_loop.agent_loop import AgentLoopMetrics, _InternalAgentLoopOutput

    t = len(response_mask)
    mask = torch.tensor([response_mask])
    g = int(mask.sum())
    ids = (np.arange(g * k, dtype=np.int32).reshape(g, k) + 100 * seed)
    lps = -np.arange(g * k, dtype=np.float32).reshape(g, k) / 10 - seed
    return _InternalAgentLoopOutput(
        prompt_ids=torch.ones(1, prompt_len, dtype=torch.long), response_ids=torch.full((1, t), 7),
        input_ids=torch.ones(1, prompt_len + t, dtype=torch.long), position_ids=torch.arange(prompt_len + t)[None],
        response_mask=mask, attention_mask=torch.cat([torch.ones(1, prompt_len), mask], 1).long(),
        response_logprobs=torch.zeros(1, t), metrics=AgentLoopMetrics(), num_turns=2,
        extra_fields={"rollout_topk_ids": ids, "rollout_topk_logprobs": lps},
    ), ids, lps


def test_legacy_trainer_batch_carries_padded_topk():
    """``trainer.use_v1=false``: verl's real ``AgentLoopWorker._postprocess`` (wrapped) -> ``[B, T, K]`` in the batch."""
    import dppo_verl.plugin  # noqa: F401
    from verl.experimental.agent_loop.agent_loop import AgentLoopWorker

    k = 3
    worker = object.__new__(AgentLoopWorker)
    worker.reward_loop_worker_handles = None
    masks = ([1, 1, 0, 1, 0, 0], [1, 1, 1, 1, 1, 1])  # sample 0: a mask-0 token inside, right padding after
    samples = [_internal_output(4, m, k, s) for s, m in enumerate(masks)]
    out = AgentLoopWorker._postprocess(worker, [s[0] for s in samples])
    ids, lps = out.batch["rollout_topk_ids"], out.batch["rollout_topk_logprobs"]
    assert ids.shape == (2, 6, k) and ids.dtype == torch.int32 and lps.dtype == torch.float32
    np.testing.assert_array_equal(ids[0, [0, 1, 3]].numpy(), samples[0][1])
    np.testing.assert_array_equal(lps[1].numpy(), samples[1][2])
    assert ids[0, [2, 4, 5]].eq(0).all() and torch.isinf(lps[0, [2, 4, 5]]).all()
    assert "rollout_topk_ids" not in out.non_tensor_batch  # not left behind as an object column
    mixed = [_internal_output(4, masks[1], k, s)[0] for s in (3, 4)]  # fresh: _postprocess pops the arrays
    mixed[1].extra_fields.clear()
    with pytest.raises(ValueError, match=r"rollout top-K missing for samples \[1\]"):
        AgentLoopWorker._postprocess(worker, mixed)


def test_v1_synthetic_padding_sample_gets_a_one_token_topk():
    import dppo_verl.plugin  # noqa: F401
    from verl.trainer.ppo import padding_utils

    k = 4
    source = {"prompts": torch.ones(3, dtype=torch.long), "responses": torch.ones(5, dtype=torch.long),
              "input_ids": torch.ones(8, dtype=torch.long), "attention_mask": torch.ones(8, dtype=torch.long),
              "position_ids": torch.arange(8), "response_mask": torch.ones(5, dtype=torch.long),
              "rollout_log_probs": torch.zeros(5), "rollout_topk_ids": torch.ones(5, k, dtype=torch.int32),
              "rollout_topk_logprobs": torch.zeros(5, k)}
    sample, tag = padding_utils.construct_minimal_padding_template(source, {}, eos_token_id=2)
    r = sample["responses"].shape[0]
    assert sample["rollout_log_probs"].shape == (r,)  # verl's own shrink, which ours must follow
    assert sample["rollout_topk_ids"].shape == (r, k) and sample["rollout_topk_ids"].eq(0).all()
    assert sample["rollout_topk_logprobs"].dtype == torch.float32 and torch.isinf(sample["rollout_topk_logprobs"]).all()
