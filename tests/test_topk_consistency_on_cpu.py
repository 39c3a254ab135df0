"""Every response token's rollout top-K row must be its own (``dppo_verl.ops.consistency``), checked in the loss path:
codes on hand-built rows, then verl's ``ppo_loss`` (hook + loss, FSDP calling convention) on a batch whose rows were
taken from another policy version, shifted, or lost: the loss raises naming the token and its values, and
``actor/dppo/topk_valid_frac`` is 1.0 on a consistent batch."""

from __future__ import annotations

import pytest
import torch

from conftest import make_actor_config
from dppo_verl.config import DPPOPolicyLossConfig
from dppo_verl.ops.consistency import MISMATCH, MISSING, TOPK_MU_ATOL, TOPK_MU_RTOL, VALID, topk_row_status
from dppo_verl.ops.support import build_support
from topk_batch import hook_then_loss, make_topk_batch, nested

NEG = float("-inf")


def test_codes_on_hand_built_rows():
    mu2 = -2.0
    tol = TOPK_MU_ATOL + TOPK_MU_RTOL * abs(mu2)  # 2.1e-5 at mu = -2
    #            sampled, mu(a_t), top-K ids, top-K log-probs, row_valid, expected
    rows = [
        (5, -0.5, [5, 7, 9], [-0.5, -1.5, -2.5], True, VALID),  # a_t at rank 1, same value
        (7, -1.5, [5, 7, 9], [-0.5, -1.501, -2.5], True, MISMATCH),  # a_t at rank 2, 1e-3 off
        (8, -4.0, [5, 7, 9], [-0.5, -1.5, -2.5], True, VALID),  # a_t outside its top-K: nothing to compare
        (5, -0.5, [0, 0, 0], [NEG, NEG, NEG], True, MISSING),  # no candidates at all
        (5, -0.5, [0, 0, 0], [NEG, NEG, NEG], False, MISSING),  # not a response token
        (9, mu2, [9, 3, 4], [mu2 + 0.5 * tol, -3.0, -4.0], True, VALID),  # inside the tolerance
        (9, mu2, [9, 3, 4], [mu2 + 2.0 * tol, -3.0, -4.0], True, MISMATCH),  # outside it
        (9, -1.0, [9, 3, 9], [-1.0, -3.0, -7.0], True, VALID),  # a duplicate rank of a_t is ignored (invalid slot)
    ]
    sampled = torch.tensor([r[0] for r in rows])
    mu = torch.tensor([r[1] for r in rows])
    ids = torch.tensor([r[2] for r in rows], dtype=torch.int32)
    logp = torch.tensor([r[3] for r in rows])
    row_valid = torch.tensor([r[4] for r in rows])
    sup = build_support(sampled, mu, ids, logp, vocab_size=16, num_topk=3, row_valid=row_valid)
    codes = topk_row_status(sup, mu, row_valid)
    assert codes.tolist() == [r[5] for r in rows]


V, K = 3000, 8
PROMPTS, RESPS = [3, 5, 2], [4, 2, 6]


def _loss_through_verl(data, truth, mode="dppo_tv_topk"):
    """verl's ppo_loss twice, as the FSDP engine calls it: logits processor, then the loss with its model_output."""
    cfg = make_actor_config(DPPOPolicyLossConfig(loss_mode=mode, num_topk=K))
    return hook_then_loss(cfg, data, truth, [torch.ones(r) for r in RESPS])


def _replace(data, key, sample, rows):
    parts = list(data[key].unbind())
    parts[sample] = rows
    data[key] = nested(parts)


def test_consistent_batch_reports_one():
    data, truth = make_topk_batch(PROMPTS, RESPS, V, K)
    _, metrics = _loss_through_verl(data, truth)
    assert metrics["actor/dppo/topk_valid_frac"].aggregate() == 1.0


def _sampled_in_row(data, sample, t):
    """Put token t's own sampled id into its top-K row (last rank, with its rollout log-prob): a consistent row."""
    ids, logp = (data[k].unbind()[sample].clone() for k in ("rollout_topk_ids", "rollout_topk_logprobs"))
    ids[t, -1] = data["responses"].unbind()[sample][t]
    logp[t, -1] = data["rollout_log_probs"].unbind()[sample][t]
    _replace(data, "rollout_topk_ids", sample, ids)
    _replace(data, "rollout_topk_logprobs", sample, logp)


def test_rows_from_another_policy_version_are_refused():
    """Sample 2's top-K log-probs come from another policy version than its rollout_log_probs (what a resumed
    generation gives when the two are merged differently): the same ids, log-probs shifted by 0.01."""
    data, truth = make_topk_batch(PROMPTS, RESPS, V, K)
    t, rank = 1, K - 1  # response_mask 1 at token 1 of sample 2
    _sampled_in_row(data, 2, t)
    _, metrics = _loss_through_verl(data.clone(), truth)
    assert metrics["actor/dppo/topk_valid_frac"].aggregate() == 1.0  # consistent before the change
    stale = data["rollout_topk_logprobs"].unbind()[2] - 0.01
    _replace(data, "rollout_topk_logprobs", 2, stale)
    mu = float(data["rollout_log_probs"].unbind()[2][t])
    with pytest.raises(ValueError) as e:
        _loss_through_verl(data, truth)
    msg = str(e.value)
    assert f"sample 2 of this micro-batch, response token {t}" in msg
    assert "it is in its rollout top-K with a log-prob that differs from its rollout_log_probs" in msg
    assert f"rollout_log_probs {mu!r}" in msg and repr(float(stale[t, rank])) in msg
    assert "response token(s) with response_mask 1 have an invalid top-K row" in msg


def test_rows_shifted_by_one_token_are_refused():
    """A lost attempt shifts the rows of the rest of the response: row t holds token t + 1's candidates."""
    data, truth = make_topk_batch(PROMPTS, RESPS, V, K, seed=3)
    r = RESPS[2]
    ids, logp = data["rollout_topk_ids"].unbind()[2], data["rollout_topk_logprobs"].unbind()[2]
    # make token 0 a candidate of row 1 too (with row 1's value), so the shifted row 0 holds a_0 with another log-prob
    a0 = int(data["responses"].unbind()[2][0])
    ids, logp = ids.clone(), logp.clone()
    ids[1, -1], logp[1, -1] = a0, float(data["rollout_log_probs"].unbind()[2][0]) - 0.5
    shift = torch.arange(r).add(1).clamp(max=r - 1)
    _replace(data, "rollout_topk_ids", 2, ids[shift])
    _replace(data, "rollout_topk_logprobs", 2, logp[shift])
    with pytest.raises(ValueError, match=r"The first, sample 2 of this micro-batch, response token 0, token id "):
        _loss_through_verl(data, truth)


def test_missing_row_is_refused():
    data, truth = make_topk_batch(PROMPTS, RESPS, V, K)
    lost = data["rollout_topk_logprobs"].unbind()[0].clone()
    lost[1] = NEG  # token 1 of sample 0 (response_mask 1) lost its candidates
    _replace(data, "rollout_topk_logprobs", 0, lost)
    with pytest.raises(ValueError, match=r"1 response token\(s\).*sample 0 of this micro-batch, response token 1, "
                                         r".*: it has no valid rollout top-K row"):
        _loss_through_verl(data, truth)
