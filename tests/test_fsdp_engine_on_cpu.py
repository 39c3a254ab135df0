"""A real verl 0.9.1 FSDP2 ``train_batch`` in a Top-K mode on CPU (gloo), through verl's own worker.

verl's ``ActorRolloutRefWorker`` is built from verl's Hydra config; the batch has the V1 trainer's layout plus
synthetic rollout top-K tensors. The divergence that reaches the loss must equal the dense fp64 partition TV
computed from the model's full logits (a plain HF forward of the same weights), token by token.

The tiny model's head has more rows (512) than its tokenizer has ids: the rollout, like verl's vLLM server, samples
from the tokenizer's ids only, so the reference pi is the fp64 softmax over those ids (issue #17: one normalisation
for mu and pi), and the log pi and the mass on the other rows that reach the loss are checked too.

Ulysses SP = 2: verl only patches flash-attention for Ulysses, and CPU runs sdpa, so attention would not see
the other rank's half of the sequence; the SP case therefore uses an attention-free model (0 decoder layers),
whose logits are per-token, to check the whole SP path (slice, hook, all-gather, unpad) against the reference.
"""

import functools
import os
import socket

import pytest
import torch

import reference as ref
from tiny_model import build_tiny_model, full_logits

K = 20
ATOL = 2e-5  # engine (FSDP2, packed sdpa) vs plain HF fp32 forward: logits agree to ~1e-6


def _batch(model_dir, n=4, seed=0):
    from transformers import AutoTokenizer

    g = torch.Generator().manual_seed(seed)
    n_tok = len(AutoTokenizer.from_pretrained(model_dir))
    samples = []
    for _ in range(n):
        p, r = int(torch.randint(3, 9, (1,), generator=g)), int(torch.randint(3, 11, (1,), generator=g))
        prompt, resp = torch.randint(3, n_tok, (p,), generator=g), torch.randint(3, n_tok, (r,), generator=g)
        mask = torch.ones(r, dtype=torch.long)
        mask[1] = 0  # e.g. a tool-output token inside the response
        samples.append(dict(prompts=prompt, responses=resp, input_ids=torch.cat([prompt, resp]),
                            position_ids=torch.arange(p + r), response_mask=mask))
    logits = full_logits(model_dir, [s["input_ids"] for s in samples])
    for s, lg in zip(samples, logits):
        p, r = len(s["prompts"]), len(s["responses"])
        rows = lg[p - 1 : p - 1 + r]  # rows that predict the response tokens
        allowed = ref.allowed_mask(rows.shape[-1], n_tok)  # what the rollout samples from
        assert n_tok < rows.shape[-1], "the tiny model should have a padded head"
        z_mu = rows + 0.7 * torch.randn(rows.shape, generator=g, dtype=torch.float64)
        z_mu[torch.arange(r)[::2], s["responses"][::2]] += 8.0  # every other sampled token inside the top-K
        lq = ref.masked_logprobs(z_mu, allowed)
        top_lq, top_ids = lq.topk(K, -1)
        s.update(rollout_topk_ids=top_ids.int(), rollout_topk_logprobs=top_lq.float(),
                 rollout_log_probs=lq.gather(-1, s["responses"][:, None])[:, 0].float(),
                 old_log_probs=torch.zeros(r), advantages=torch.randn(r, generator=g).expand(r).clone())
        pi = ref.masked_logprobs(rows, allowed)  # [r, V] fp64, pi over the samplable ids
        s["truth"] = torch.tensor([ref.partition_tv(pi[j].exp(), lq[j].exp(),
                                                    top_ids[j].tolist() + [int(s["responses"][j])]) for j in range(r)],
                                  dtype=torch.float64)
        s["truth_binary"] = torch.tensor([ref.partition_tv(pi[j].exp(), lq[j].exp(), [int(s["responses"][j])])
                                          for j in range(r)], dtype=torch.float64)
        s["pi_logp"] = pi.gather(-1, s["responses"][:, None])[:, 0]
        s["excluded_mass"] = ref.excluded_mass(rows, allowed)
    return samples


REFERENCE_KEYS = ("truth", "truth_binary", "pi_logp", "excluded_mass")


def _worker(rank, world, port, model_dir, samples, sp, rmpad, results, dyn=False, mode="dppo_tv_topk"):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import verl
    from hydra import compose, initialize_config_dir
    from verl.utils import tensordict_utils as tu
    from verl.workers.engine_workers import ActorRolloutRefWorker

    import dppo_verl.losses as losses

    n = len(samples)
    overrides = [
        f"actor_rollout_ref.model.path={model_dir}", f"actor_rollout_ref.model.use_remove_padding={rmpad}",
        "+actor_rollout_ref.model.override_config.attn_implementation=sdpa",
        "actor_rollout_ref.actor.strategy=fsdp2", "actor_rollout_ref.ref.strategy=fsdp2",
        f"actor_rollout_ref.actor.ppo_mini_batch_size={n}", "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
        f"actor_rollout_ref.actor.ulysses_sequence_parallel_size={sp}",
        f"actor_rollout_ref.actor.policy_loss.loss_mode={mode}",
        "actor_rollout_ref.actor.policy_loss._target_=dppo_verl.config.DPPOPolicyLossConfig",
        f"+actor_rollout_ref.actor.policy_loss.num_topk={K}",
        "actor_rollout_ref.actor.use_torch_compile=False", "actor_rollout_ref.actor.fsdp_config.use_torch_compile=False",
        "actor_rollout_ref.rollout.n=1", "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=2",
        "+actor_rollout_ref.actor.fsdp_config.mixed_precision={param_dtype:fp32,reduce_dtype:fp32,buffer_dtype:fp32}",
    ]
    if dyn:  # verl regroups samples into token-budgeted micro-batches: the top-K must follow its sample
        overrides += ["actor_rollout_ref.actor.use_dynamic_bsz=True", "actor_rollout_ref.actor.ppo_max_token_len_per_gpu=24"]
    if sp > 1:  # the attention-free model has no decoder layer class to wrap: wrap by size instead
        overrides.append("actor_rollout_ref.actor.fsdp_config.wrap_policy.min_num_params=1")
    conf_dir = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
    with initialize_config_dir(config_dir=conf_dir, version_base=None):
        cfg = compose(config_name="ppo_trainer", overrides=overrides)
    worker = ActorRolloutRefWorker(config=cfg.actor_rollout_ref, role="actor")
    worker.init_model()
    engine = worker.actor.engine
    dp_rank, dp_size = engine.get_data_parallel_rank(), engine.get_data_parallel_size()
    local = samples[dp_rank * (n // dp_size) : (dp_rank + 1) * (n // dp_size)]

    seen = []
    real = losses.compute_dppo_loss

    def recording(log_prob, mu_logp, advantages, response_mask, divergence, knobs, **kw):
        size = kw["support_size"]
        seen.append((divergence.detach().clone(), mu_logp.detach().clone(), response_mask.clone(),
                     torch.ones_like(mu_logp) if size is None else size.clone(), log_prob.detach().clone(),
                     kw["log_excluded_mass"].clone()))
        return real(log_prob, mu_logp, advantages, response_mask, divergence, knobs, **kw)

    losses.compute_dppo_loss = recording
    keys = [k for k in local[0] if k not in REFERENCE_KEYS]
    fields = {k: torch.nested.as_nested_tensor([s[k] for s in local], layout=torch.jagged) for k in keys}
    fields["loss_mask"] = fields["response_mask"]
    extra = dict(calculate_entropy=False, distillation_use_topk=False, distillation_only=False, global_batch_size=n,
                 mini_batch_size=n, epochs=1, seed=42, dataloader_kwargs={"shuffle": False}, temperature=1.0)
    from sync_counter import SyncCounter

    with SyncCounter() as syncs:  # dppo_verl's device reads during the whole update (hook + loss, every micro-batch)
        out = worker.update_actor(tu.get_tensordict(tensor_dict=fields, non_tensor_dict=extra))
    assert seen, "the DPPO loss never ran"
    # issue #18: at most one host sync per micro-batch in our code (the loss's one read of checks and metrics)
    assert syncs.total <= len(seen), (len(seen), dict(syncs.where))
    assert not dyn or len(seen) > 1, f"{len(seen)} micro-batch: the token budget should have split the batch"
    topk = mode.endswith("_topk")
    for div, mu, mask, size, logp, log_m in seen:  # identify each row's sample by its rollout log-probs
        for row in range(div.shape[0]):
            s = next(s for s in local if torch.equal(mu[row, : len(s["responses"])], s["rollout_log_probs"]))
            r = len(s["responses"])
            m = s["response_mask"].bool()
            torch.testing.assert_close(div[row, :r][m].double(), s["truth" if topk else "truth_binary"][m], rtol=0,
                                       atol=ATOL)
            torch.testing.assert_close(logp[row, :r][m].double(), s["pi_logp"][m], rtol=0, atol=ATOL)
            torch.testing.assert_close(log_m[row, :r][m].exp().double(), s["excluded_mass"][m], rtol=0, atol=ATOL)
            assert bool((size[row, :r][m] > (1 if topk else 0)).all())
            assert not topk or bool((div[row, :r][~m] == 0).all())  # the hook zeroes rows outside the mask
            results.append(r)
    if out is not None:
        metrics = tu.get(out, "metrics")
        sizes = metrics["actor/dppo/support_size"]
        assert min(sizes if isinstance(sizes, list) else [sizes]) > (1 if topk else 0), metrics  # the Top-K path ran
        excluded = metrics["actor/dppo/excluded_mass_mean"]
        assert min(excluded if isinstance(excluded, list) else [excluded]) > 1e-3, metrics  # measured, not 0


def _run(world, model_dir, samples, sp=1, rmpad=True, dyn=False, mode="dppo_tv_topk"):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = torch.multiprocessing.get_context("spawn")
    results = ctx.Manager().list()
    torch.multiprocessing.spawn(_worker, nprocs=world, join=True, args=(world, port, model_dir, samples, sp, rmpad, results, dyn, mode))
    assert sum(results) == sum(len(s["responses"]) for s in samples) * sp  # every response row was checked


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tiny_qwen2"))
    build_tiny_model(path)
    return path, _batch(path)


@pytest.fixture(scope="module")
def attention_free(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tiny_qwen2_0layers"))
    build_tiny_model(path, layers=0)
    return path, _batch(path)


@pytest.mark.timeout(900)
@pytest.mark.parametrize("world,rmpad", [(1, True), (1, False), (2, True)])
def test_train_batch_topk(tiny, world, rmpad):
    _run(world, *tiny, rmpad=rmpad)


@pytest.mark.timeout(900)
def test_train_batch_binary_padded_head(tiny):
    """A binary mode reads the logits only for the mass on the never-sampled head rows (the logits hook, issue #17)."""
    _run(1, *tiny, mode="dppo_tv_binary")


@pytest.mark.timeout(900)
def test_train_batch_topk_dynamic_bsz(tiny):
    _run(1, *tiny, dyn=True)


@pytest.mark.timeout(900)
def test_train_batch_topk_ulysses_sp2(attention_free):
    _run(2, *attention_free, sp=2)
