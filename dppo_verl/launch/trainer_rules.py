"""Which verl trainers a DPPO mode runs under: the V1 trainer's modes and verl's experimental entry points.

V1 trainer (``trainer.use_v1=True``, ``trainer.v1.trainer_mode``), Top-K modes:

- ``sync`` and ``colocate_async``: supported. ``colocate_async`` talks to the rollout servers through
  ``FullyAsyncLLMServerClient``, whose resume loop (a request aborted for a weight update is re-submitted) keeps
  every attempt's top-K rows through :mod:`dppo_verl.integrations.rollout.async_client`; the rest of the path
  (agent loop, replay buffer, TransferQueue, actor hook) is the synchronous trainer's. Run end to end on CPU.
- ``separate_async``: the same client class (``trainer_separate_async.py`` ``get_llm_client``), agent loop and actor
  hook, so the same data path; but verl needs a non-``naive`` checkpoint engine to move weights to its standalone
  rollout pool (nccl / nixl / mooncake: CUDA or RDMA) and a second resource pool. Accepted on a GPU platform with
  such a backend; refused on the CPU platform, where no such backend runs (never run here: no GPU).

Experimental entry points (their own ``main``; both call verl's ``run_ppo``, so the driver hook runs these rules
before Ray, and :mod:`dppo_verl.integrations.driver.experimental_trainers` runs them again before the trainer builds
its workers):

- ``verl.experimental.fully_async_policy.fully_async_main`` and ``verl.experimental.one_step_off_policy.main_ppo``
  run their own trainers (``FullyAsyncTrainer``, ``OneStepOffRayTrainer``, on verl's ``SeparateRayPPOTrainer``)
  with a standalone rollout pool and an NCCL-class weight transfer: Top-K modes are refused there (not run, not
  tested: neither can run on this CPU). Every DPPO mode is refused with ``algorithm.rollout_correction.bypass_mode
  =True`` there (one_step_off's default), because ``SeparateRayPPOTrainer`` then calls verl's
  ``apply_bypass_mode``, which rewrites ``policy_loss.loss_mode`` to ``bypass_mode``: the DPPO loss would silently
  not run.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Optional

from ..contract import CPU_PLATFORM, ENV_PLATFORM, LOSS_MODE, ROLLOUT

__all__ = ["TOPK_TRAINER_MODES", "EXPERIMENTAL_ENTRY_POINTS", "experimental_entry_point", "trainer_rule_violations"]

TRAINER_MODE = "trainer.v1.trainer_mode"
TOPK_TRAINER_MODES = ("sync", "colocate_async", "separate_async")
CHECKPOINT_BACKEND = f"{ROLLOUT}.checkpoint_engine.backend"
BYPASS = "algorithm.rollout_correction.bypass_mode"
# entry point module -> the trainer class it runs
EXPERIMENTAL_ENTRY_POINTS = {
    "verl.experimental.fully_async_policy.fully_async_main": "FullyAsyncTrainer",
    "verl.experimental.one_step_off_policy.main_ppo": "OneStepOffRayTrainer",
}


def _select(config, key, default=None):
    from .rules import select

    return select(config, key, default)


def _main_module() -> Optional[str]:
    """The module ``python -m`` ran (or the script's path), to tell verl's entry points apart."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name:
        return spec.name
    path = getattr(main, "__file__", None) or ""
    for module in EXPERIMENTAL_ENTRY_POINTS:
        if path.replace(os.sep, ".").endswith(module + ".py"):
            return module
    return None


def experimental_entry_point(config: Any) -> Optional[str]:
    """The experimental entry point this run was started with, or None (``main_ppo`` and the V1 trainer).

    Told by the running ``__main__`` and, failing that, by the config those entry points compose: both add a
    top-level ``rollout`` section (resource isolation), and fully_async adds ``async_training``."""
    main = _main_module()
    if main in EXPERIMENTAL_ENTRY_POINTS:
        return main
    fully, one_step = EXPERIMENTAL_ENTRY_POINTS
    if _select(config, "async_training") is not None:
        return fully
    if _select(config, "rollout.nnodes") is not None:
        return one_step
    return None


def _cpu_platform(config) -> bool:
    return (os.environ.get(ENV_PLATFORM, "").strip().lower() == CPU_PLATFORM
            or str(_select(config, "trainer.device", "")).lower() == "cpu")


def _v1_mode_violations(config, mode: str) -> list[str]:
    if _select(config, "trainer.use_v1", True) is False:
        return []  # the legacy trainer ignores trainer.v1.*
    tm = _select(config, TRAINER_MODE) or "sync"
    if tm not in TOPK_TRAINER_MODES:
        return [f"{mode} cannot run with {TRAINER_MODE}={tm}: Top-K runs under {TOPK_TRAINER_MODES}"]
    if tm != "separate_async":
        return []
    if _cpu_platform(config):
        return [f"{mode} cannot run with {TRAINER_MODE}=separate_async on the CPU platform: verl moves the weights "
                f"to its standalone rollout pool through a non-naive checkpoint engine ({CHECKPOINT_BACKEND}=nccl / "
                f"nixl / mooncake, CUDA or RDMA), which does not run on a CPU; use {TRAINER_MODE}=colocate_async"]
    backend = _select(config, CHECKPOINT_BACKEND, "naive")
    if backend == "naive":
        return [f"{mode}: {TRAINER_MODE}=separate_async needs a weight transfer to its standalone rollout pool: set "
                f"{CHECKPOINT_BACKEND}=nccl (or nixl / mooncake); 'naive' works only for colocated rollouts"]
    return []


def _entry_point_violations(config, mode: str, is_topk: bool, entry: str) -> list[str]:
    trainer = EXPERIMENTAL_ENTRY_POINTS.get(entry, "trainer")
    problems = []
    if is_topk:
        problems.append(
            f"{mode} is not supported under {entry} (its own {trainer} on verl's SeparateRayPPOTrainer, a standalone "
            "rollout pool and an NCCL-class weight transfer): its Top-K data path has never run (not on this CPU "
            f"either). Use {TRAINER_MODE}=colocate_async (or separate_async on GPUs) with verl.trainer.main_ppo, "
            "or a binary mode (dppo_tv_binary)")
    if _select(config, BYPASS):
        problems.append(
            f"{mode} under {entry}: {BYPASS}=True makes {trainer} call verl's apply_bypass_mode, which rewrites "
            f"{LOSS_MODE} to 'bypass_mode' and the DPPO loss would silently not run: set {BYPASS}=False")
    return problems


def trainer_rule_violations(config: Any, mode: str, is_topk: bool, entry: Optional[str] = None) -> list[str]:
    """Every trainer rule ``config`` breaks for DPPO ``mode``; ``entry`` overrides the detected entry point."""
    entry = entry or experimental_entry_point(config)
    if entry is not None:
        return _entry_point_violations(config, mode, is_topk, entry)
    return _v1_mode_violations(config, mode) if is_topk else []
