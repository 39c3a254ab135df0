"""Top-K ``anchor=old`` (issue #21): verl's pi_old pass evaluates pi_old at the rollout's top-K ids, and the update's
Top-K divergence is then pi's against pi_old over the same support. Both against dense fp64 math
(``reference.full_logprobs`` / ``reference.PARTITION``), FSDP calling convention ``[1, N, V]``."""

import pytest
import torch

import reference as ref
from conftest import make_actor_config
from dppo_verl.config import DPPOPolicyLossConfig
from dppo_verl.knobs import resolve_knobs
from topk_batch import make_topk_batch, nested

V, K = 3000, 8
PROMPTS, RESPS = [3, 5, 2], [4, 2, 6]
ATOL = 5e-6  # fp32 log-probs turned into probabilities and summed over <= K + 2 cells (as test_topk_hook)


def _old_pass(data, truth, old_logits, mode):
    """The pi_old pass's hook on pi_old's logits, then the worker's regrouping into ``old_topk_logprobs``."""
    from tensordict import TensorDict

    from dppo_verl.integrations.actor.old_pass import _add_fields
    from dppo_verl.integrations.actor.topk_hook import old_topk_outputs
    from dppo_verl.knobs import parse_loss_mode

    knobs = resolve_knobs(mode, DPPOPolicyLossConfig(loss_mode=mode, num_topk=K, anchor="old"))
    out = old_topk_outputs(old_logits.float().unsqueeze(0), data, knobs)
    assert sorted(out) == sorted(f"dppo_old_topk_{k}" for k in range(K))
    seqs = [p + r for p, r in zip(PROMPTS, RESPS)]
    # the engine returns each output nested over the full sequences, like log_probs
    as_engine = {key: nested(list(v[0].split(seqs))) for key, v in out.items()}
    td = TensorDict(as_engine, batch_size=[len(seqs)])
    _add_fields(td, data, parse_loss_mode(mode), knobs)
    assert sorted(td.keys()) == ["dppo_start_divergence", "old_topk_logprobs"]  # the K ranks regrouped into one
    assert not td["dppo_start_divergence"].values().any()  # anchor=old: nothing is outside at the step's start
    return td["old_topk_logprobs"]  # nested [B, R_b, K]


@pytest.mark.parametrize("name", ["tv", "kl"])
def test_old_topk_pass_and_old_anchored_divergence(name):
    import verl.workers.utils.losses as L

    mode = f"dppo_{name}_topk"
    data, truth = make_topk_batch(PROMPTS, RESPS, V, K)
    g = torch.Generator().manual_seed(7)
    old_logits = truth["pi_logits"] + 0.3 * torch.randn(truth["pi_logits"].shape, generator=g, dtype=torch.float64)
    old_topk = _old_pass(data, truth, old_logits, mode)
    lp_old = ref.full_logprobs(old_logits)  # [N, V] fp64
    lp_pi = ref.full_logprobs(truth["pi_logits"])
    old_at_sampled = []
    for b, (p, r) in enumerate(zip(PROMPTS, RESPS)):
        rows = torch.arange(truth["offsets"][b] + p - 1, truth["offsets"][b] + p - 1 + r)
        ids = data["rollout_topk_ids"][b].long()
        want = lp_old[rows].gather(-1, ids)  # [r, K]
        got = old_topk[b]
        assert got.shape == (r, K) and got.dtype == torch.float32
        keep = data["response_mask"][b].bool()
        torch.testing.assert_close(got[keep].double(), want[keep], rtol=0, atol=1e-5)  # fp32 log-probs ~ |log p| 1e-7
        old_at_sampled.append(lp_old[rows].gather(-1, data["responses"][b][:, None])[:, 0].float())
    data["old_topk_logprobs"] = old_topk
    data["old_log_probs"] = nested(old_at_sampled)
    cfg = make_actor_config(DPPOPolicyLossConfig(loss_mode=mode, num_topk=K, anchor="old"))
    out = L.ppo_loss(cfg, student_logits=truth["pi_logits"].float().unsqueeze(0), data=data)
    div = out["dppo_divergence"][0]
    checked = 0
    for b, (p, r) in enumerate(zip(PROMPTS, RESPS)):
        start = truth["offsets"][b] + p - 1
        for j in range(r):
            if not data["response_mask"][b][j]:
                continue
            row = start + j
            support = data["rollout_topk_ids"][b][j].long().tolist() + [int(data["responses"][b][j])]
            want = ref.PARTITION[name](lp_pi[row].exp(), lp_old[row].exp(), support)  # pi against pi_old
            assert abs(float(div[row]) - float(want)) <= ATOL, (b, j, float(div[row]), float(want))
            # and not against mu: the rollout anchor's value differs here
            assert abs(float(want) - float(truth["div"][name][b, j])) > 10 * ATOL
            checked += 1
    assert checked == sum(RESPS) - sum(1 for r in RESPS if r > 2)


def test_old_anchor_without_the_old_pass_names_the_key():
    import verl.workers.utils.losses as L

    data, truth = make_topk_batch(PROMPTS, RESPS, V, K)
    cfg = make_actor_config(DPPOPolicyLossConfig(loss_mode="dppo_tv_topk", num_topk=K, anchor="old"))
    with pytest.raises(ValueError, match="old_topk_logprobs.*bypass_mode=False"):
        L.ppo_loss(cfg, student_logits=truth["pi_logits"].float().unsqueeze(0), data=data)


def test_old_anchored_topk_weighs_against_mu_binary_against_pi_old():
    """Eq. 11's weight: Top-K anchor=old keeps min(pi/mu, C) (decoupled); binary anchor=old is verl's own dppo_tv."""
    from dppo_verl.knobs import weighs_against_mu

    for mode, want in (("dppo_tv_topk", True), ("dppo_tv_binary", False)):
        knobs = resolve_knobs(mode, DPPOPolicyLossConfig(loss_mode=mode, anchor="old"))
        assert weighs_against_mu(knobs) is want
        knobs = resolve_knobs(mode, DPPOPolicyLossConfig(loss_mode=mode))
        assert weighs_against_mu(knobs)
