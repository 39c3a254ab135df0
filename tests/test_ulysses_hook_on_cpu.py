"""FSDP + Ulysses SP = 2 on gloo: the hook sees this rank's slice of the packed rows, as verl's engine hands
it over (``ulysses_pad_and_slice_inputs`` on the packed sequence), and must align the rollout tensors with it."""

import torch
import torch.distributed as dist

from dist_utils import run_distributed

V, K = 2048, 5
PROMPTS, RESPS = [3, 5, 2], [4, 2, 7]  # 23 packed rows: odd, so the engine pads one row for sp = 2
ATOL = 5e-6


def _worker(rank, world):
    import verl.utils.ulysses as U
    import verl.workers.utils.losses as L
    from conftest import make_actor_config
    from dppo_verl.config import DPPOPolicyLossConfig
    from topk_batch import make_topk_batch

    U.set_ulysses_sequence_parallel_group(dist.group.WORLD)
    data, truth = make_topk_batch(PROMPTS, RESPS, V, K, seed=3)
    n = truth["pi_logits"].shape[0]
    # what the engine does to the packed input ids, applied to the logits rows and to a row index
    rows_local, _, pad = U.ulysses_pad_and_slice_inputs(torch.arange(1, n + 1)[None], sp_size=world)
    assert pad == 1
    logits_full = torch.cat([truth["pi_logits"].float(), torch.zeros(pad, V)])  # padded row: zeros
    logits = logits_full[rows_local[0] - 1 + (rows_local[0] == 0).long() * (n + 1)][None]  # [1, (n + pad)/sp, V]
    cfg = make_actor_config(DPPOPolicyLossConfig(loss_mode="dppo_tv_topk", num_topk=K))
    out = L.ppo_loss(cfg, student_logits=logits, data=data)
    expect = torch.zeros(n + 1, dtype=torch.float64)
    for b, (p, r) in enumerate(zip(PROMPTS, RESPS)):
        expect[torch.arange(r) + truth["offsets"][b] + p] = truth["div"]["tv"][b, :r]
    assert out["dppo_divergence"].shape == (1, (n + pad) // world)
    torch.testing.assert_close(out["dppo_divergence"][0].double(), expect[rows_local[0]], rtol=0, atol=ATOL)
    assert float(out["dppo_support_size"].max()) > 1


def test_ulysses_sp2_alignment():
    run_distributed(_worker, 2)
