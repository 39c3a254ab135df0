"""The ppo_loss wrapper: verl's real ppo_loss, fed a verl-shaped micro-batch, hands mu to the DPPO loss."""

import math

import pytest
import torch
from tensordict import TensorDict

from conftest import make_actor_config
from dppo_verl.config import DPPOPolicyLossConfig

B, P, R = 2, 3, 4
RESP_LENS = [4, 2]


def _micro_batch(with_rollout=True):
    from verl.utils import tensordict_utils as tu

    attn = torch.ones(B, P + R, dtype=torch.long)
    attn[1, P + RESP_LENS[1] :] = 0
    resp_mask = attn[:, P:].clone()
    td = {
        "prompts": torch.randint(0, 50, (B, P)),
        "responses": torch.randint(0, 50, (B, R)),
        "attention_mask": attn,
        "response_mask": resp_mask,
        "old_log_probs": torch.full((B, R), -2.0),
        "advantages": torch.tensor([[1.0] * R, [-1.0] * R]),
    }
    if with_rollout:
        td["rollout_log_probs"] = torch.tensor([[-1.0, -1.5, -0.2, -3.0], [-0.5, -2.5, 0.0, 0.0]])
    data = TensorDict(td, batch_size=[B])
    tu.assign_non_tensor(data, dp_size=1, batch_num_tokens=int(resp_mask.sum()), global_batch_size=B)
    return data


def _model_output():
    # packed (no padding) log-probs: row t of a sequence predicts token t + 1
    n = sum(P + r for r in RESP_LENS)
    lp = -torch.rand(n) * 2
    return {"log_probs": lp.clone().requires_grad_(True)}


def test_wrapper_hands_rollout_logprobs_and_keeps_max_metrics():
    import verl.workers.utils.losses as L
    from verl.utils.metric import AggregationType
    from verl.workers.utils.padding import no_padding_2_padding

    assert hasattr(L.ppo_loss, "dppo_wrapped"), "import dppo_verl must wrap verl's ppo_loss"
    cfg = make_actor_config(DPPOPolicyLossConfig(loss_mode="dppo_tv_binary", delta_low=0.05, delta_high=0.05))
    data, out = _micro_batch(), _model_output()
    loss, metrics = L.ppo_loss(cfg, out, data)
    # independent recomputation on the padded layout, anchor = rollout_log_probs (not old_log_probs)
    lp = no_padding_2_padding(out["log_probs"], data).detach()
    mu = data["rollout_log_probs"]
    mask = data["response_mask"].bool()
    adv = data["advantages"]
    total = 0.0
    for b in range(B):
        for t in range(R):
            if not mask[b, t]:
                continue
            p, q, a = math.exp(lp[b, t]), math.exp(mu[b, t]), float(adv[b, t])
            d = abs(p - q)
            keep = not ((a > 0 and p > q and d > 0.05) or (a < 0 and p < q and d > 0.05))
            total += -a * min(p / q, 20.0) * keep * float(lp[b, t])
    assert loss.item() == pytest.approx(total / int(mask.sum()), rel=1e-5)
    assert metrics["actor/dppo/divergence_max"].aggregation == AggregationType.MAX
    assert metrics["actor/dppo/ratio_max"].aggregation == AggregationType.MAX
    assert metrics["actor/dppo/masked_frac"].aggregation == AggregationType.MEAN


def test_wrapper_without_rollout_logprobs_raises():
    import verl.workers.utils.losses as L

    cfg = make_actor_config(DPPOPolicyLossConfig(loss_mode="dppo_kl_binary"))
    with pytest.raises(ValueError, match="rollout_log_probs"):
        L.ppo_loss(cfg, _model_output(), _micro_batch(with_rollout=False))


def test_other_modes_are_untouched():
    import verl.workers.utils.losses as L
    from verl.workers.config import PolicyLossConfig

    cfg = make_actor_config(PolicyLossConfig(loss_mode="vanilla"))
    data, out = _micro_batch(), _model_output()
    loss, _ = L.ppo_loss(cfg, out, data)
    loss2, _ = L.ppo_loss.dppo_wrapped(cfg, out, data)
    assert loss.item() == loss2.item()


def test_apply_is_idempotent():
    import verl.workers.utils.losses as L

    from dppo_verl.integrations import APPLIED
    from dppo_verl.integrations.actor.loss_wrapper import apply_ppo_loss_wrapper

    before = L.ppo_loss
    apply_ppo_loss_wrapper()
    apply_ppo_loss_wrapper()
    assert L.ppo_loss is before and APPLIED["actor.ppo_loss"].ok


def test_hook_checks_wait_for_the_loss_and_are_never_dropped():
    """The hook's queued checks are read by the next loss; when no loss takes them (forward-only calls), they are read
    on the spot after _MAX_PENDING calls, never dropped."""
    import torch

    from dppo_verl import handoff
    from dppo_verl.ops.checks import DeferredChecks

    def one(bad: bool) -> DeferredChecks:
        c = DeferredChecks()
        c.add(torch.tensor([False, bad]), lambda idx: f"bad at {idx}")
        return c

    handoff.defer_hook_checks(one(False))
    handoff.defer_hook_checks(one(True))
    taken = handoff.take_hook_checks()
    assert len(taken) == 2 and handoff.take_hook_checks() is None
    with pytest.raises(ValueError, match=r"bad at \[1\]"):
        taken.read(torch.tensor([0.5]))
    handoff.defer_hook_checks(one(True))
    with pytest.raises(ValueError, match=r"bad at \[1\]"):
        for _ in range(handoff._MAX_PENDING):
            handoff.defer_hook_checks(one(False))
    assert handoff.take_hook_checks() is None


def _nested_micro_batch(p_lens, r_lens, max_response_len, seed=0):
    from verl.utils import tensordict_utils as tu

    g = torch.Generator().manual_seed(seed)
    nest = lambda xs: torch.nested.as_nested_tensor(xs, layout=torch.jagged)  # noqa: E731
    td = TensorDict({"prompts": nest([torch.randint(0, 50, (p,), generator=g) for p in p_lens]),
                     "responses": nest([torch.randint(0, 50, (r,), generator=g) for r in r_lens]),
                     "rollout_log_probs": nest([-torch.rand(r, generator=g) for r in r_lens])},
                    batch_size=[len(p_lens)])
    if max_response_len is not None:
        tu.assign_non_tensor(td, max_response_len=max_response_len)
    return td


@pytest.mark.parametrize("max_response_len", [None, 9])
def test_one_scatter_padding_equals_verls_no_padding_2_padding(max_response_len):
    """The hand-off pads every model output (and rollout_log_probs) with one shared index; verl's own per-sample
    ``no_padding_2_padding`` is the reference, value for value, dtype kept (one int64 output beside fp32 ones)."""
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.padding import no_padding_2_padding

    from dppo_verl.integrations.actor.layout import jagged_parts, pad_model_outputs, response_padding
    from dppo_verl.integrations.actor.loss_wrapper import _padded_field

    p_lens, r_lens = [3, 1, 5], [4, 7, 1]
    data = _nested_micro_batch(p_lens, r_lens, max_response_len)
    seqs = [p + r for p, r in zip(p_lens, r_lens)]
    g = torch.Generator().manual_seed(1)
    nest = lambda xs: torch.nested.as_nested_tensor(xs, layout=torch.jagged)  # noqa: E731
    outputs = {"a": nest([torch.randn(s, generator=g) for s in seqs]),
               "b": nest([torch.randn(s, generator=g) for s in seqs]),
               "c": nest([torch.randint(-5, 5, (s,), generator=g) for s in seqs])}
    pad = response_padding(data)
    got = pad_model_outputs(pad, outputs)
    for key, x in outputs.items():
        want = no_padding_2_padding(x, data)
        assert got[key].dtype == want.dtype and torch.equal(got[key], want), key
        values, offsets = jagged_parts(x)  # the fast field read agrees with the public calls
        assert torch.equal(values, x.values()) and torch.equal(offsets, x.offsets())
    # a response-only field, padded to the same [B, T]: the rollout log-probs at their response positions
    lp = _padded_field(data, "rollout_log_probs", pad=pad)
    width = max_response_len or max(r_lens)
    assert list(lp.shape) == [len(r_lens), width]
    for b, r in enumerate(r_lens):
        assert torch.equal(lp[b, :r], data["rollout_log_probs"][b]) and not lp[b, r:].any()
    assert tu.get_non_tensor_data(data=data, key="max_response_len", default=-1) in (-1, 9)
    # the unpadded form (verl's pi_old pass) shares the rows but has no padded layout to scatter into
    rows_only = response_padding(data, padded=False)
    assert torch.equal(rows_only.full_rows, pad.full_rows) and rows_only.dst is None
    with pytest.raises(ValueError, match=r"padded=False"):
        pad_model_outputs(rows_only, outputs)
