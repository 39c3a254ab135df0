"""Top-K ``anchor=old`` through verl 0.9.1's real FSDP2 worker on CPU (issue #21): verl's own pi_old pass
(``compute_log_prob`` with ``compute_loss=False``, as the V1 trainer calls it) returns ``old_topk_logprobs``, and the
update's divergence is pi's against pi_old over the rollout's support, both against dense fp64 math from a plain HF
forward of the same weights. pi_old here is a perturbed copy of the model's own distribution (fp64), so that the
divergence the update sees is not ~0, as it would be on the first mini-batch."""

import os
import socket

import pytest
import torch

import reference as ref
from test_fsdp_engine_on_cpu import ATOL, K, REFERENCE_KEYS, _batch
from tiny_model import build_tiny_model, full_logits


def _fields(samples, keys):
    fields = {k: torch.nested.as_nested_tensor([s[k] for s in samples], layout=torch.jagged) for k in keys}
    fields["loss_mask"] = fields["response_mask"]
    return fields


def _make_worker(model_dir, n, mode, anchor):
    from fsdp_step import actor_worker

    return actor_worker([
        f"actor_rollout_ref.model.path={model_dir}", "+actor_rollout_ref.model.override_config.attn_implementation=sdpa",
        "actor_rollout_ref.actor.strategy=fsdp2", "actor_rollout_ref.ref.strategy=fsdp2",
        f"actor_rollout_ref.actor.ppo_mini_batch_size={n}", "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
        f"actor_rollout_ref.actor.policy_loss.loss_mode={mode}",
        "actor_rollout_ref.actor.policy_loss._target_=dppo_verl.config.DPPOPolicyLossConfig",
        f"+actor_rollout_ref.actor.policy_loss.num_topk={K}", f"+actor_rollout_ref.actor.policy_loss.anchor={anchor}",
        "actor_rollout_ref.actor.use_torch_compile=False", "actor_rollout_ref.actor.fsdp_config.use_torch_compile=False",
        "actor_rollout_ref.rollout.n=1", "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=2",
        "+actor_rollout_ref.actor.fsdp_config.mixed_precision={param_dtype:fp32,reduce_dtype:fp32,buffer_dtype:fp32}",
    ])


def _old_pass(worker, samples, keys):
    """verl's pi_old pass, called as the V1 trainer calls it."""
    from verl.utils import tensordict_utils as tu

    td = tu.get_tensordict(tensor_dict=_fields(samples, keys), non_tensor_dict=dict(
        calculate_entropy=True, compute_loss=False, temperature=1.0))
    out = worker.compute_log_prob(td)
    assert "log_probs" in out.keys() and not any(k.startswith("dppo_old_topk_") for k in out.keys())
    return out


def _worker(rank, port, model_dir, samples, results):
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from verl.utils import tensordict_utils as tu

    import dppo_verl.losses as losses

    n = len(samples)
    keys = [k for k in samples[0] if k not in REFERENCE_KEYS + ("old_topk_truth", "pi_old", "old_sampled", "truth_old",
                                                                "full_lp")]
    # 0. rollout-anchored modes: each token's divergence at the step's start (pi_old = these weights, so the update
    # hook's own fp64 truth), for masked_at_start_frac
    for mode, truth in (("dppo_tv_topk", "truth"), ("dppo_tv_binary", "truth_binary")):
        out = _old_pass(_make_worker(model_dir, n, mode, "rollout"), samples, keys)
        assert "old_topk_logprobs" not in out.keys()
        for b, s in enumerate(samples):
            m = s["response_mask"].bool()
            torch.testing.assert_close(out["dppo_start_divergence"][b][m].double(), s[truth][m], rtol=0, atol=ATOL)
            results.append((mode, int(m.sum())))
    # 1. Top-K anchor=old: pi_old at the rollout's top-K ids
    worker = _make_worker(model_dir, n, "dppo_tv_topk", "old")
    out = _old_pass(worker, samples, keys)
    got = out["old_topk_logprobs"]
    assert got.is_nested and not out["dppo_start_divergence"].values().any()  # pi_old is the anchor: 0 at the start
    for b, s in enumerate(samples):
        m = s["response_mask"].bool()
        torch.testing.assert_close(got[b][m].double(), s["old_topk_truth"][m], rtol=0, atol=ATOL)
        results.append(("pass", int(m.sum())))
    # 2. the update, with a pi_old that differs from pi
    seen = []
    real = losses.compute_dppo_loss

    def recording(log_prob, mu_logp, advantages, response_mask, divergence, knobs, **kw):
        seen.append((divergence.detach().clone(), mu_logp.detach().clone(), kw["anchor_logp"].clone(),
                     log_prob.detach().clone(), kw["log_excluded_mass"]))
        return real(log_prob, mu_logp, advantages, response_mask, divergence, knobs, **kw)

    losses.compute_dppo_loss = recording
    for s in samples:
        s["old_topk_logprobs"], s["old_log_probs"] = s["pi_old"], s["old_sampled"]
    fields = _fields(samples, keys + ["old_topk_logprobs"])
    fields["dppo_start_divergence"] = out["dppo_start_divergence"]
    extra = dict(calculate_entropy=False, distillation_use_topk=False, distillation_only=False, global_batch_size=n,
                 mini_batch_size=n, epochs=1, seed=42, dataloader_kwargs={"shuffle": False}, temperature=1.0)
    metrics = tu.get(worker.update_actor(tu.get_tensordict(tensor_dict=fields, non_tensor_dict=extra)), "metrics")
    assert seen, "the DPPO loss never ran"
    assert set(metrics["actor/dppo/masked_at_start_frac"]) == {0.0}, metrics  # anchor=old: none outside at the start
    for div, mu, anchor, lp, log_m in seen:
        assert log_m is not None  # the tiny model's head is padded: Eq. 11's pi / mu is over the samplable ids
        for row in range(div.shape[0]):
            s = next(s for s in samples if torch.equal(mu[row, : len(s["responses"])], s["rollout_log_probs"]))
            r, m = len(s["responses"]), s["response_mask"].bool()
            torch.testing.assert_close(div[row, :r][m].double(), s["truth_old"][m], rtol=0, atol=ATOL)
            # Eq. 11 weighs pi over the samplable ids against mu; Eq. 12's direction is pi - pi_old, one normalisation
            torch.testing.assert_close(lp[row, :r][m].double(), s["pi_logp"][m], rtol=0, atol=ATOL)
            torch.testing.assert_close((lp - anchor)[row, :r][m].double(), (s["full_lp"] - s["old_sampled"].double())[m],
                                       rtol=0, atol=ATOL)
            torch.testing.assert_close(log_m[row, :r][m].exp().double(), s["excluded_mass"][m], rtol=0, atol=ATOL)
            results.append(("update", int(m.sum())))


@pytest.mark.timeout(900)
def test_old_anchored_topk_through_verls_pi_old_pass_and_update(tmp_path):
    model_dir = str(tmp_path / "tiny")
    build_tiny_model(model_dir)
    samples = _batch(model_dir)
    g = torch.Generator().manual_seed(3)
    for s, lg in zip(samples, full_logits(model_dir, [s["input_ids"] for s in samples])):
        p, r = len(s["prompts"]), len(s["responses"])
        rows = lg[p - 1 : p - 1 + r]
        lp = ref.full_logprobs(rows)  # [r, V] fp64: the trainer's normalisation (pi against pi_old: one head)
        ids = s["rollout_topk_ids"].long()
        s["old_topk_truth"] = lp.gather(-1, ids)
        s["full_lp"] = lp.gather(-1, s["responses"][:, None])[:, 0]
        lp_old = ref.full_logprobs(rows + 0.5 * torch.randn(rows.shape, generator=g, dtype=torch.float64))
        s["pi_old"] = lp_old.gather(-1, ids).float()
        s["old_sampled"] = lp_old.gather(-1, s["responses"][:, None])[:, 0].float()
        s["truth_old"] = torch.tensor([ref.partition_tv(lp[j].exp(), lp_old[j].exp(), ids[j].tolist() + [int(s["responses"][j])])
                                       for j in range(r)], dtype=torch.float64)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    results = torch.multiprocessing.get_context("spawn").Manager().list()
    torch.multiprocessing.spawn(_worker, nprocs=1, join=True, args=(port, model_dir, samples, results))
    tokens = sum(int(s["response_mask"].sum()) for s in samples)
    assert sum(n for kind, n in results if kind == "pass") == tokens
    assert sum(n for kind, n in results if kind == "update") == tokens
    assert sum(n for kind, n in results if kind == "dppo_tv_topk") == sum(n for kind, n in results if kind == "dppo_tv_binary") == tokens
