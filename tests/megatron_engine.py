"""verl 0.9.1's real Megatron engine (``ActorRolloutRefWorker``, strategy megatron, vanilla mbridge) on CPU ranks.

Shared by tests/test_megatron_engine_on_cpu.py: builds the worker from verl's own Hydra config with the CPU lines of
``dppo_verl.integrations.platform.cpu_megatron.cpu_megatron_overrides``, and the V1 trainer's batch layout (jagged).
The plugin is loaded by verl's entry point; conftest asks for the CPU platform (``VERL_PLATFORM=cpu``).
"""

from __future__ import annotations

import os
import socket

import torch
import torch.multiprocessing as mp

A = "actor_rollout_ref.actor"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(fn, world: int, *args) -> None:
    """``fn(rank, world, *args)`` on ``world`` fresh processes; verl's worker initialises the gloo group itself."""
    mp.spawn(_entry, args=(world, free_port(), fn, args), nprocs=world, join=True)


def _entry(rank, world, port, fn, args):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    fn(rank, world, *args)


def allow_fp32_for_tests() -> None:
    """verl's ``McoreEngineConfig`` accepts only bf16/fp16; the exact comparisons with an fp32 HF forward need fp32.
    Tests only: the check runs on a bf16 stand-in, then the requested dtype is put back."""
    from verl.workers.config.engine import McoreEngineConfig

    orig = McoreEngineConfig.__post_init__
    if getattr(orig, "fp32_for_tests", False):
        return

    def __post_init__(self):
        dtype = self.dtype
        object.__setattr__(self, "dtype", "bfloat16")
        orig(self)
        object.__setattr__(self, "dtype", dtype)

    __post_init__.fp32_for_tests = True
    McoreEngineConfig.__post_init__ = __post_init__


def build_worker(model_dir: str, *, tp: int, loss_mode: str, n: int, micro: int = 2, dtype: str = "float32",
                 extra=()):
    """An initialised actor worker. ``n`` samples per mini-batch, ``micro`` per micro-batch."""
    import verl
    from hydra import compose, initialize_config_dir
    from verl.workers.engine_workers import ActorRolloutRefWorker

    from dppo_verl.integrations.platform.cpu_megatron import cpu_megatron_overrides

    if dtype == "float32":
        allow_fp32_for_tests()
    overrides = [
        f"actor_rollout_ref.model.path={model_dir}", f"{A}.megatron.tensor_model_parallel_size={tp}",
        f"{A}.megatron.dtype={dtype}", f"{A}.ppo_mini_batch_size={n}", f"{A}.ppo_micro_batch_size_per_gpu={micro}",
        f"{A}.policy_loss.loss_mode={loss_mode}", "actor_rollout_ref.rollout.n=1",
        f"actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu={micro}", f"{A}.optim.lr=1e-3",
        f"{A}.optim.total_training_steps=10",
        *cpu_megatron_overrides(A), *extra,
    ]
    if loss_mode.startswith(("dppo_", "cppo_", "drpo_")) and loss_mode.count("_") == 2:
        overrides.append(f"{A}.policy_loss._target_=dppo_verl.config.DPPOPolicyLossConfig")
    with initialize_config_dir(config_dir=os.path.join(os.path.dirname(verl.__file__), "trainer", "config"),
                               version_base=None):
        cfg = compose(config_name="ppo_megatron_trainer", overrides=overrides)
    worker = ActorRolloutRefWorker(config=cfg.actor_rollout_ref, role="actor")
    worker.init_model()
    return worker


def batch(samples: list[dict], **non_tensor):
    """The V1 trainer's layout: every per-sample field jagged ``[B, j, ...]``, plus the non-tensor flags."""
    from verl.utils import tensordict_utils as tu

    keys = [k for k in samples[0] if not k.startswith("ref_")]
    fields = {k: torch.nested.as_nested_tensor([s[k] for s in samples], layout=torch.jagged) for k in keys}
    fields["loss_mask"] = fields["response_mask"]
    return tu.get_tensordict(tensor_dict=fields, non_tensor_dict=non_tensor)


def train_flags(n: int) -> dict:
    return dict(calculate_entropy=False, distillation_use_topk=False, distillation_only=False, global_batch_size=n,
                mini_batch_size=n, epochs=1, seed=42, dataloader_kwargs={"shuffle": False}, temperature=1.0)


def infer_flags(n: int, micro: int = 2) -> dict:
    return dict(calculate_entropy=False, temperature=1.0, micro_batch_size_per_gpu=micro, max_token_len_per_gpu=4096,
                use_dynamic_bsz=False, global_batch_size=n, compute_loss=False)
