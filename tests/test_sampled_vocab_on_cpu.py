"""One normalisation for mu and pi (issue #17 item 1): ``dppo_verl.ops.sampled_vocab`` at tp = 1, 2, 4 (gloo) against
the dense fp64 masked softmax of ``tests/reference.py``, and the Top-K hook with a padded head."""

import functools

import pytest
import torch

import reference as ref
from dist_utils import run_distributed
from dppo_verl.ops.sampled_vocab import (
    SampledIds, excluded_stats, log_excluded_mass, log_kept_mass, renormalize_support,
)
from dppo_verl.ops.vocab_parallel import vocab_parallel_stats

V, N, M = 320, 12, 5  # the demo's padded head: 261 tokenizer ids in 320 rows
CASES = {
    "padded": SampledIds(limit=261),
    "padded+banned": SampledIds(limit=261, banned=(3, 130, 250, 300)),  # 300 >= limit: already excluded
    "boundary": SampledIds(limit=240, banned=(0,)),  # the tail starts exactly at shard 3's first id (tp = 4)
    "everything": SampledIds(),
}
# fp32 log-sum-exps of |z| <~ 15 over <= 320 terms: a few ulp (~2e-6) is the expected error of log m; log(1 - m)
# amplifies it by m / (1 - m) (module docstring), so the support tolerance is TOL / (1 - m). 2e-5 fails any real
# mistake (the bias being fixed is ~0.2).
TOL = 2e-5


@functools.lru_cache(maxsize=None)
def _case(seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(N, V, generator=g) * 3.0
    logits[1, 300] = 12.0  # most of a row's mass (m ~ 0.85) on one padding id (an untrained or drifted head)
    labels = torch.randint(0, 240, (N,), generator=g)
    ids = torch.randint(0, 240, (N, M), generator=g)
    ids[:, 0] = labels
    return logits, labels, ids


def _reference(ids_spec: SampledIds):
    logits, labels, ids = _case()
    allowed = ref.allowed_mask(V, V if ids_spec.limit is None else ids_spec.limit, ids_spec.banned)
    masked = ref.masked_logprobs(logits, allowed)  # [N, V] fp64
    m = ref.excluded_mass(logits, allowed)  # [N]
    q = masked.exp().clone()
    for r in range(N):
        q[r, ids[r].unique()] = 0.0
    return masked.gather(-1, ids), m, (q * q).sum(-1)


def _check(rank, tp, group, name):
    logits, labels, ids = _case()
    spec = CASES[name]
    v_local = V // tp
    shard = logits[:, rank * v_local : (rank + 1) * v_local].clone()
    st = vocab_parallel_stats(shard, ids, tp_group=group, sq_exclude=torch.ones_like(ids, dtype=torch.bool),
                              backend="eager")  # tested elsewhere; no compile per spawned rank
    ex = excluded_stats(shard, labels, spec, tp_group=group, squares=True)
    log_m = log_excluded_mass(ex.log_ratio, st.logp[:, 0])  # label = ids[:, 0]
    want_logp, want_m, want_sq = _reference(spec)
    assert torch.allclose(log_m.exp().double(), want_m, rtol=0, atol=TOL), (name, tp)
    logp, rest_sq = renormalize_support(st.logp, ex.lse - st.lse, st.rest_sq, ex.lse_sq - 2.0 * st.lse)
    err = (logp.double() - want_logp).abs() * (1.0 - want_m).unsqueeze(-1)
    assert err.max() <= TOL, (name, tp, err.max())
    rel = ((rest_sq.double() - want_sq).abs() / want_sq * (1.0 - want_m) ** 2).max()
    assert rel <= 1e-5, (name, tp, rel)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_excluded_mass_and_renormalized_support_match_fp64(tp):
    if tp == 1:
        _check_on_rank(0, 1)
    else:
        run_distributed(_check_on_rank, tp)


def _check_on_rank(rank, world_size):
    import torch.distributed as dist

    for name in CASES:
        _check(rank, world_size, None if world_size == 1 else dist.group.WORLD, name)


def test_the_bias_it_removes_is_the_padded_heads():
    """Without the correction the trainer's log pi is off by log(1 - m): at a uniform-ish untrained head over 320
    rows with 261 samplable ids that is ln(261/320) = -0.204 nats (the gap seen in the Megatron CPU probe)."""
    logits = torch.zeros(4, V)
    st = vocab_parallel_stats(logits, torch.zeros(4, 1, dtype=torch.long), backend="eager")
    ex = excluded_stats(logits, torch.zeros(4, dtype=torch.long), SampledIds(limit=261))
    log_keep = log_kept_mass(log_excluded_mass(ex.log_ratio, st.logp[:, 0]))
    assert torch.allclose(log_keep, torch.full((4,), torch.tensor(261 / 320).log().item()), atol=1e-6)


def test_all_mass_on_excluded_ids_is_not_finite():
    """m = 1 (every samplable logit -inf): log(1 - m) is -inf, which the loss refuses (tests/test_losses...)."""
    assert log_kept_mass(torch.tensor([0.0])).isinf().all()
    assert SampledIds(limit=261, banned=(3, 300)).excluded_count(320) == 60
    assert SampledIds().is_everything(320) and SampledIds(limit=400).is_everything(320)
