"""verl 0.9.1's real Megatron engine on CPU ranks (gloo), through ``ActorRolloutRefWorker`` (not stubs).

The engine runs with dppo_verl's CPU Megatron support (``VERL_PLATFORM=cpu``, tests/conftest.py) and the config of
``cpu_megatron_overrides``, in fp32 (a test-only way past verl's bf16/fp16 check) so that it can be compared with a
plain HF fp32 forward of the same weights:

- TP = 1 and TP = 2: ``compute_log_prob`` equals HF's log-probs; one ``vanilla`` update gives the same grad norm at
  TP = 1 and TP = 2; at TP = 2 the weight export (``get_per_tensor_param``, what weight sync sends to vLLM) is the
  HF checkpoint, bit for bit;
- TP = 2: ``dppo_tv_topk`` and ``dppo_kl_topk`` (``direction=predictive``) ``update_actor`` under verl's defaults
  (BSHD, micro-batches padded to the mini-batch maximum): two micro-batches of different longest sequence, and every
  response token's divergence (and predictive rate) equals the fp64 reference from the HF model's full logits.
"""

from __future__ import annotations

import os

import pytest
import torch

import reference as ref
from megatron_engine import batch, build_worker, infer_flags, spawn, train_flags
from tiny_model import build_tiny_model, full_logits

K = 20
# (prompt, response) lengths: micro-batch 1 = samples 0, 1 (longest 14), micro-batch 2 = samples 2, 3 (longest 9)
LENGTHS = [(4, 6), (5, 9), (3, 4), (6, 3)]
LP_ATOL = 5e-6  # engine fp32 (megatron-core local layers) vs HF fp32 log-probs: measured 4.9e-7 (TP 1), 3.8e-7 (TP 2)
DIV_ATOL = 1e-5  # fp32 log-probs over K + 2 cells: measured 1.1e-7 (TV), 8.9e-7 (KL), 1.4e-7 (predictive rate)


def _samples(model_dir):
    """The rollout samples from the tokenizer's ids only (like verl's vLLM server): the tiny model's 512-row head has
    more, so the references normalise pi over those ids too (issue #17), except ``ref_lp``: verl's own full-head
    log-probs (``compute_log_prob``)."""
    from transformers import AutoTokenizer

    n_tok = len(AutoTokenizer.from_pretrained(model_dir))
    g = torch.Generator().manual_seed(0)
    samples = []
    for p, r in LENGTHS:
        prompt, resp = torch.randint(3, n_tok, (p,), generator=g), torch.randint(3, n_tok, (r,), generator=g)
        mask = torch.ones(r, dtype=torch.long)
        mask[1] = 0  # a tool-output token inside the response: no divergence there
        samples.append(dict(prompts=prompt, responses=resp, input_ids=torch.cat([prompt, resp]),
                            position_ids=torch.arange(p + r), response_mask=mask))
    for i, (s, lg) in enumerate(zip(samples, full_logits(model_dir, [s["input_ids"] for s in samples]))):
        p, r = len(s["prompts"]), len(s["responses"])
        rows = lg[p - 1: p - 1 + r]  # fp64 logits of the rows that predict the response tokens
        z_mu = rows + 0.7 * torch.randn(rows.shape, generator=g, dtype=torch.float64)
        z_mu[torch.arange(r)[::2], s["responses"][::2]] += 8.0  # every other sampled token inside the top-K
        allowed = ref.allowed_mask(rows.shape[-1], n_tok)
        assert n_tok < rows.shape[-1], "the tiny model should have a padded head"
        lq = ref.masked_logprobs(z_mu, allowed)
        top_lq, top_ids = lq.topk(K, -1)
        full = ref.full_logprobs(rows)
        pi = ref.masked_logprobs(rows, allowed)
        s.update(rollout_topk_ids=top_ids.int(), rollout_topk_logprobs=top_lq.float(),
                 rollout_log_probs=lq.gather(-1, s["responses"][:, None])[:, 0].float(),
                 old_log_probs=full.gather(-1, s["responses"][:, None])[:, 0].float(),  # ratio 1: PPO's clip inactive
                 advantages=torch.full((r,), 1.0 if i % 2 else -0.5))
        support = [top_ids[j].tolist() + [int(s["responses"][j])] for j in range(r)]
        s["ref_lp"] = full.gather(-1, s["responses"][:, None])[:, 0]
        s["ref_old_topk"] = full.gather(-1, top_ids.long())  # pi_old = this model, full head (Top-K anchor=old)
        s["ref_lp_sampled_ids"] = pi.gather(-1, s["responses"][:, None])[:, 0]
        s["ref_excluded_mass"] = ref.excluded_mass(rows, allowed)
        s["ref_binary_tv"] = (pi.gather(-1, s["responses"][:, None])[:, 0].exp() - lq.gather(-1, s["responses"][:, None])[:, 0].exp()).abs()
        s["ref_tv"] = torch.tensor([ref.partition_tv(pi[j].exp(), lq[j].exp(), support[j]) for j in range(r)], dtype=torch.float64)
        s["ref_kl"] = torch.tensor([ref.partition_kl(pi[j].exp(), lq[j].exp(), support[j]) for j in range(r)], dtype=torch.float64)
        # the predictive rate of KL_topk (d/de D(z + e (e_a - pi)) at e = 0), by fp64 autograd over the full vocabulary
        z_a = rows.masked_fill(~allowed, float("-inf"))  # softmax(z_a) = pi over the samplable ids
        s["ref_ddot"] = torch.tensor([_ddot(z_a[j], lq[j], support[j], int(s["responses"][j])) for j in range(r)], dtype=torch.float64)
    return samples


def _ddot(z, lq_row, support, k):
    distinct = list(dict.fromkeys(support))  # reference.partition_divergence wants distinct ids, then the rest cell
    mu_s = lq_row.exp()[distinct]
    mu_cells = torch.cat([mu_s, (1 - mu_s.sum()).clamp_min(0).reshape(1)])
    return ref.predictive_ddot_autograd("kl", z, mu_cells, distinct, k)


def _record_losses():
    """Every DPPO micro-batch's per-token divergence (and predictive rate), as the loss receives them."""
    import dppo_verl.losses as losses

    seen, real = [], losses.compute_dppo_loss

    def recording(log_prob, mu_logp, advantages, response_mask, divergence, knobs, **kw):
        seen.append(dict(div=divergence.detach().clone(), mu=mu_logp.detach().clone(), mask=response_mask.clone(),
                         push=None if kw.get("push") is None else kw["push"].detach().clone(),
                         lp=log_prob.detach().clone(), log_m=kw["log_excluded_mass"].clone()))
        return real(log_prob, mu_logp, advantages, response_mask, divergence, knobs, **kw)

    losses.compute_dppo_loss = recording
    return seen


def _worker(rank, world, model_dir, samples, out_dir):
    from safetensors.torch import load_file
    from sync_counter import SyncCounter
    from verl.utils import tensordict_utils as tu

    tp, n, res = world, len(samples), {}
    w = build_worker(model_dir, tp=tp, loss_mode="vanilla", n=n)
    engine = w.actor.engine
    if tp == 2:  # weight export: what update_weights sends to vLLM
        hf = load_file(os.path.join(model_dir, "model.safetensors"))
        exported = dict(engine.get_per_tensor_param()[0])
        res["export_names"] = sorted(exported) == sorted(hf)
        res["export_equal"] = all(torch.equal(exported[k].cpu(), hf[k]) for k in hf if k in exported)
    out = w.compute_log_prob(batch(samples, **infer_flags(n)))
    if out is not None:
        lp = tu.get(out, "log_probs")
        res["lp_err"] = max(float((lp[i][len(s["prompts"]) - 1: len(s["input_ids"]) - 1].double() - s["ref_lp"]).abs().max())
                            for i, s in enumerate(samples))
    out = w.update_actor(batch(samples, **train_flags(n)))
    if out is not None and "grad_norm" in tu.get(out, "metrics"):  # reported by the output ranks
        res["grad_norm"] = tu.get(out, "metrics")["grad_norm"][0]
    if tp == 2:
        seen = _record_losses()
        for mode, extra in (("dppo_tv_topk", []), ("dppo_kl_topk", ["+actor_rollout_ref.actor.policy_loss.direction=predictive"]),
                            ("dppo_tv_binary", [])):
            seen.clear()
            wk = build_worker(model_dir, tp=tp, loss_mode=mode, n=n,
                              extra=[f"+actor_rollout_ref.actor.policy_loss.num_topk={K}", *extra])
            with SyncCounter() as syncs:  # dppo_verl's device reads in the update (issue #18: <= 1 per micro-batch)
                out = wk.update_actor(batch(samples, **train_flags(n)))
            res[mode] = dict(seen=list(seen), metrics=None if out is None else tu.get(out, "metrics"),
                             syncs=dict(syncs.where))
        # issue #21: the pi_old pass of Top-K anchor=old evaluates pi_old at the rollout's top-K ids (vocab-parallel)
        wk = build_worker(model_dir, tp=tp, loss_mode="dppo_tv_topk", n=n,
                          extra=[f"+actor_rollout_ref.actor.policy_loss.num_topk={K}",
                                 "+actor_rollout_ref.actor.policy_loss.anchor=old"])
        out = wk.compute_log_prob(batch(samples, **infer_flags(n)))
        if out is not None:
            res["old_topk"] = [t.clone() for t in out["old_topk_logprobs"].unbind()]
        for mode in ("dppo_tv_topk", "dppo_tv_binary"):  # rollout anchor: each token's divergence at the step's start
            wk = build_worker(model_dir, tp=tp, loss_mode=mode, n=n, extra=[f"+actor_rollout_ref.actor.policy_loss.num_topk={K}"])
            out = wk.compute_log_prob(batch(samples, **infer_flags(n)))
            if out is not None:
                res[f"start_{mode}"] = [t.clone() for t in out["dppo_start_divergence"].unbind()]
    torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def model_and_samples(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("mcore") / "model")
    build_tiny_model(path)
    return path, _samples(path)


def _run(model_and_samples, tmp_path, tp):
    model_dir, samples = model_and_samples
    spawn(_worker, tp, model_dir, samples, str(tmp_path))
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(tp)]


@pytest.fixture(scope="module")
def tp1(model_and_samples, tmp_path_factory):
    return _run(model_and_samples, tmp_path_factory.mktemp("tp1"), 1)


@pytest.fixture(scope="module")
def tp2(model_and_samples, tmp_path_factory):
    return _run(model_and_samples, tmp_path_factory.mktemp("tp2"), 2)


@pytest.mark.timeout(900)
def test_logprobs_and_grad_norm_match_hf_and_across_tp(tp1, tp2):
    (r1,), (a, b) = tp1, tp2
    for r in (r1, a):
        assert r["lp_err"] < LP_ATOL, r["lp_err"]
    assert r1["grad_norm"] > 0
    reported = [r["grad_norm"] for r in (a, b) if "grad_norm" in r]
    assert reported, "no TP rank reported the grad norm"
    for g in reported:  # the full-model grad norm (TP shards all-reduced)
        assert abs(g - r1["grad_norm"]) <= 1e-5 * r1["grad_norm"], (g, r1["grad_norm"])


@pytest.mark.timeout(900)
def test_weight_export_is_the_checkpoint(tp2):
    for r in tp2:
        assert r["export_names"] and r["export_equal"]


@pytest.mark.timeout(900)
@pytest.mark.parametrize("mode,key", [("dppo_tv_topk", "ref_tv"), ("dppo_kl_topk", "ref_kl"),
                                      ("dppo_tv_binary", "ref_binary_tv")])
def test_topk_divergence_per_token_through_the_engine(tp2, model_and_samples, mode, key):
    _, samples = model_and_samples
    for res in tp2:
        seen = res[mode]["seen"]
        assert len(seen) == 2, f"{len(seen)} micro-batches: the padded-layout path needs two of different lengths"
        widths = {int(m["mask"].shape[1]) for m in seen}
        checked = 0
        for m in seen:
            for row in range(m["div"].shape[0]):  # identify the sample by its rollout log-probs
                s = next(s for s in samples if torch.equal(m["mu"][row, : len(s["responses"])], s["rollout_log_probs"]))
                r, keep = len(s["responses"]), s["response_mask"].bool()
                torch.testing.assert_close(m["div"][row, :r][keep].double(), s[key][keep], rtol=0, atol=DIV_ATOL)
                # pi over the ids the rollout samples from, and the trainer's mass on the others (issue #17)
                torch.testing.assert_close(m["lp"][row, :r][keep].double(), s["ref_lp_sampled_ids"][keep], rtol=0,
                                           atol=LP_ATOL)
                torch.testing.assert_close(m["log_m"][row, :r][keep].exp().double(), s["ref_excluded_mass"][keep],
                                           rtol=0, atol=LP_ATOL)
                assert not mode.endswith("_topk") or bool((m["div"][row, :r][~keep] == 0).all())
                if mode == "dppo_kl_topk":  # direction=predictive: the rate reached the loss too
                    torch.testing.assert_close(m["push"][row, :r][keep].double(), s["ref_ddot"][keep], rtol=0,
                                               atol=DIV_ATOL)
                checked += int(keep.sum())
        assert checked == sum(int(s["response_mask"].sum()) for s in samples), checked
        assert len(widths) >= 1
        # issue #18: at most one host sync per micro-batch in our code, hook and loss together
        assert sum(res[mode]["syncs"].values()) <= len(seen), res[mode]["syncs"]
        metrics = res[mode]["metrics"]
        if metrics is not None:
            assert min(metrics["actor/dppo/support_size"]) > (1 if mode.endswith("_topk") else 0), metrics
            assert min(metrics["actor/dppo/excluded_mass_mean"]) > 1e-3, metrics


@pytest.mark.timeout(900)
def test_old_topk_pass_through_the_engine_at_tp2(tp2, model_and_samples):
    """verl's pi_old pass (``compute_log_prob``, ``compute_loss=False``) of a Top-K ``anchor=old`` mode at TP = 2 returns
    ``old_topk_logprobs`` ``[B, R, K]``: log pi_old at the rollout's top-K ids, the fp64 full-head log-softmax."""
    _, samples = model_and_samples
    reported = [r["old_topk"] for r in tp2 if "old_topk" in r]
    assert reported, "no TP rank returned old_topk_logprobs"
    for old_topk in reported:
        for got, s in zip(old_topk, samples):
            m = s["response_mask"].bool()
            assert got.shape == s["ref_old_topk"].shape
            torch.testing.assert_close(got[m].double(), s["ref_old_topk"][m], rtol=0, atol=LP_ATOL)


@pytest.mark.timeout(900)
@pytest.mark.parametrize("mode,key", [("dppo_tv_topk", "ref_tv"), ("dppo_tv_binary", "ref_binary_tv")])
def test_start_divergence_from_the_pi_old_pass_at_tp2(tp2, model_and_samples, mode, key):
    """A rollout-anchored mode's pi_old pass returns each token's divergence at the step's start (pi_old = these
    weights): the fp64 reference over the samplable ids, for masked_at_start_frac (issue #21)."""
    _, samples = model_and_samples
    reported = [r[f"start_{mode}"] for r in tp2 if f"start_{mode}" in r]
    assert reported, "no TP rank returned dppo_start_divergence"
    for start in reported:
        for got, s in zip(start, samples):
            m = s["response_mask"].bool()
            torch.testing.assert_close(got[m].double(), s[key][m], rtol=0, atol=DIV_ATOL)
