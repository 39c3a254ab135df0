"""Megatron logits path on CPU: megatron-core parallel_state on gloo, a real vocab-parallel output layer
(ColumnParallelLinear), THD/BSHD layouts with TP and CP, our hook called the way verl's Megatron engine calls it
(``student_logits=[b, s/cp, V/tp], data=batch, data_format=...``), checked row by row against the dense fp64
reference of the unsharded model.

Which packed row each logits row holds comes from ``reference.megatron_rows`` (the layout rules written out
independently), never from verl's layout helpers, which the hook itself uses: a hook that laid rows out differently
from the engine would fail here. BSHD includes ``forced_max_seqlen`` (verl pads every micro-batch to the mini-batch
maximum by default). verl's real Megatron engine runs the BSHD path end to end in test_megatron_engine_on_cpu.py.
"""

import pytest
import torch
import torch.distributed as dist

from dist_utils import run_distributed

V, K, H = 1024, 6, 32  # V divisible by tp
PROMPTS, RESPS = [3, 5, 2, 4], [4, 2, 6, 3]
ATOL = 2e-5  # fp32 matmul logits (~1e-6 relative) + fp32 log-probs, summed over <= K + 2 cells


def _worker(rank, world, tp, cp, data_format, name, direction="sampled", forced=None):
    from megatron.core import parallel_state as mpu
    from megatron.core.model_parallel_config import ModelParallelConfig
    from megatron.core.tensor_parallel import ColumnParallelLinear

    import verl.workers.utils.losses as L
    from conftest import make_actor_config
    from dppo_verl.config import DPPOPolicyLossConfig
    from topk_batch import make_topk_batch

    mpu.initialize_model_parallel(tensor_model_parallel_size=tp, context_parallel_size=cp)
    try:
        torch.manual_seed(123)  # same init everywhere: megatron's CPU init draws the full weight, then slices
        cfg_mp = ModelParallelConfig(tensor_model_parallel_size=tp, use_cpu_initialization=True, params_dtype=torch.float32)
        head = ColumnParallelLinear(H, V, config=cfg_mp, init_method=torch.nn.init.normal_, bias=False,
                                    gather_output=False, skip_bias_add=True)
        shards = [torch.empty_like(head.weight) for _ in range(tp)]
        dist.all_gather(shards, head.weight.detach().contiguous(), group=mpu.get_tensor_model_parallel_group())
        w_full = torch.cat(shards, 0).double()  # [V, H]
        n = sum(p + r for p, r in zip(PROMPTS, RESPS))
        hidden = torch.randn(n, H, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 0.3
        data, truth = make_topk_batch(PROMPTS, RESPS, V, K, pi_logits=hidden @ w_full.T)

        # The engine's layout of the packed rows, from the layout rules alone (1-based global row, 0 = padding).
        import reference as ref
        from verl.utils import tensordict_utils as tu

        seq_lens = [p + r for p, r in zip(PROMPTS, RESPS)]
        global_row = ref.megatron_rows(seq_lens, tp=tp, cp=cp, cp_rank=mpu.get_context_parallel_rank(),
                                       data_format=data_format, forced_max_seqlen=forced)
        h_local = torch.cat([torch.zeros(1, H, dtype=torch.float64), hidden])[global_row].float()  # [b, s_local, H]
        if forced is not None:
            tu.assign_non_tensor(data, forced_max_seqlen=forced)  # what verl's engine attaches to each micro-batch
        with torch.no_grad():
            logits = head(h_local.transpose(0, 1).contiguous())[0].transpose(0, 1)  # [b, s_local, V/tp]
        assert logits.shape[-1] == V // tp
        cfg = make_actor_config(DPPOPolicyLossConfig(loss_mode=f"dppo_{name}_topk", num_topk=K, direction=direction))
        out = L.ppo_loss(cfg, student_logits=logits, data=data, data_format=data_format)
        div = out["dppo_divergence"]
        assert div.shape == logits.shape[:2], (div.shape, logits.shape)

        # expected per local row: the reference divergence of the global row it holds (0 off-response)
        expect = torch.zeros(n + 1, dtype=torch.float64)
        size = torch.zeros(n + 1)
        rate = torch.zeros(n + 1, dtype=torch.float64)
        for b, (p, r) in enumerate(zip(PROMPTS, RESPS)):
            rows = torch.arange(r) + truth["offsets"][b] + p - 1
            expect[rows + 1] = truth["div"][name][b, :r]
            size[rows + 1] = truth["support_size"][b, :r]
            rate[rows + 1] = truth["ddot"][name][b, :r]
        if direction == "predictive":  # the extra vocab-parallel statistic (sum_{j not in S} pi_j^2) under TP/CP
            torch.testing.assert_close(out["dppo_ddot"].double(), rate[global_row], rtol=0, atol=ATOL)
        else:
            assert "dppo_ddot" not in out
        torch.testing.assert_close(div.double(), expect[global_row], rtol=0, atol=ATOL)
        torch.testing.assert_close(out["dppo_support_size"], size[global_row])
        assert int((size[global_row] > 1).sum()) > 0  # this rank really holds response rows
    finally:
        mpu.destroy_model_parallel()


@pytest.mark.parametrize(
    "world,tp,cp,data_format,name,direction,forced",
    [(2, 2, 1, "thd", "tv", "sampled", None), (2, 1, 2, "thd", "kl", "sampled", None),
     (2, 2, 1, "bshd", "kl", "predictive", None), (2, 2, 1, "bshd", "tv", "sampled", 13),
     (2, 1, 2, "bshd", "tv", "sampled", 11), (4, 2, 2, "thd", "tv", "predictive", None)],
)
def test_megatron_hook_layouts(world, tp, cp, data_format, name, direction, forced):
    """``forced``: verl's ``forced_max_seqlen`` (the mini-batch's longest sequence, longer than this micro-batch's)."""
    run_distributed(_worker, world, tp, cp, data_format, name, direction, forced)
