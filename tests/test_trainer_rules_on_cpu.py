"""Which verl trainers DPPO runs under (``dppo_verl.launch.trainer_rules``), on verl 0.9.1's own composed configs:
the V1 trainer's modes, and the experimental entry points (before Ray and again when their trainer builds workers)."""

from __future__ import annotations

import os

import pytest

from dppo_verl.launch.rules import actor_rule_violations, check_config

TOPK = ["actor_rollout_ref.actor.policy_loss.loss_mode=dppo_tv_topk", "+actor_rollout_ref.rollout.custom.dppo_num_topk=20"]
BINARY = ["actor_rollout_ref.actor.policy_loss.loss_mode=dppo_tv_binary"]
MODE = "trainer.v1.trainer_mode"
FULLY = "verl.experimental.fully_async_policy.fully_async_main"
ONE_STEP = "verl.experimental.one_step_off_policy.main_ppo"


def _compose(*overrides, config_dir="trainer/config", name="ppo_trainer"):
    import verl
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=os.path.join(os.path.dirname(verl.__file__), config_dir), version_base=None):
        return compose(config_name=name, overrides=list(overrides))


def _experimental(entry, *overrides, monkeypatch):
    """The config the entry point composes (one_step_off's search path is relative to verl's parent directory)."""
    import verl

    monkeypatch.chdir(os.path.dirname(os.path.dirname(verl.__file__)))
    if entry == FULLY:
        return _compose(*overrides, config_dir="experimental/fully_async_policy/config", name="fully_async_ppo_trainer")
    return _compose(*overrides, config_dir="experimental/one_step_off_policy/config", name="one_step_off_ppo_trainer")


@pytest.mark.parametrize("trainer_mode", ["sync", "colocate_async"])
def test_topk_runs_under_sync_and_colocate_async(trainer_mode):
    assert actor_rule_violations(_compose(*TOPK, f"{MODE}={trainer_mode}")) == []


def test_separate_async_on_cpu_is_refused_naming_the_backend(monkeypatch):
    monkeypatch.setenv("VERL_PLATFORM", "cpu")
    (problem,) = actor_rule_violations(_compose(*TOPK, f"{MODE}=separate_async"))
    assert "trainer.v1.trainer_mode=separate_async on the CPU platform" in problem
    assert "actor_rollout_ref.rollout.checkpoint_engine.backend=nccl" in problem and "colocate_async" in problem
    assert actor_rule_violations(_compose(*BINARY, f"{MODE}=separate_async")) == []  # binary: not our rule


def test_separate_async_on_gpu_needs_a_non_naive_checkpoint_engine(monkeypatch):
    monkeypatch.delenv("VERL_PLATFORM", raising=False)
    cfg = _compose(*TOPK, f"{MODE}=separate_async", "trainer.device=cuda")
    (problem,) = actor_rule_violations(cfg)
    assert "set actor_rollout_ref.rollout.checkpoint_engine.backend=nccl" in problem
    ok = _compose(*TOPK, f"{MODE}=separate_async", "trainer.device=cuda",
                  "actor_rollout_ref.rollout.checkpoint_engine.backend=nccl")
    assert actor_rule_violations(ok) == []
    monkeypatch.setenv("VERL_PLATFORM", "cpu")  # the same config on the CPU platform
    assert "on the CPU platform" in actor_rule_violations(ok)[0]


def test_unknown_trainer_mode_and_legacy_trainer():
    (problem,) = actor_rule_violations(_compose(*TOPK, f"{MODE}=my_async"))
    assert problem.startswith("dppo_tv_topk cannot run with trainer.v1.trainer_mode=my_async")
    # the legacy trainer never reads trainer.v1.*
    assert actor_rule_violations(_compose(*TOPK, f"{MODE}=separate_async", "trainer.use_v1=False")) == []


@pytest.mark.parametrize("entry", [FULLY, ONE_STEP])
def test_experimental_entry_points_refuse_topk_and_bypass(entry, monkeypatch):
    cfg = _experimental(entry, *TOPK, monkeypatch=monkeypatch)
    problems = actor_rule_violations(cfg)
    assert len(problems) == 2, problems
    assert problems[0].startswith(f"dppo_tv_topk is not supported under {entry}")
    # both entry points' own defaults set bypass_mode=True, which would replace the DPPO loss with verl's bypass_mode
    assert "algorithm.rollout_correction.bypass_mode=True" in problems[1] and "bypass_mode=False" in problems[1]
    (binary,) = actor_rule_violations(_experimental(entry, *BINARY, monkeypatch=monkeypatch))
    assert "bypass_mode=False" in binary
    no_bypass = _experimental(entry, *BINARY, "algorithm.rollout_correction.bypass_mode=False", monkeypatch=monkeypatch)
    assert actor_rule_violations(no_bypass) == []  # binary without bypass: not refused (and not run here)
    with pytest.raises(ValueError, match="not supported under " + entry.replace(".", r"\.")):
        check_config(_experimental(entry, *TOPK, "algorithm.rollout_correction.bypass_mode=False",
                                   monkeypatch=monkeypatch))
    assert check_config(_experimental(entry, monkeypatch=monkeypatch)) is None  # not DPPO: not ours


@pytest.mark.parametrize("cls_path,entry", [
    ("verl.experimental.one_step_off_policy.ray_trainer.OneStepOffRayTrainer", ONE_STEP),
    ("verl.experimental.fully_async_policy.fully_async_trainer.FullyAsyncTrainer", FULLY),
])
def test_experimental_trainer_refuses_before_building_workers(cls_path, entry, monkeypatch):
    """The first-use twin (Ray already up: run_ppo skips the driver hook): verl's real trainer classes, refused in
    ``SeparateRayPPOTrainer._init_resource_pools`` before any resource pool exists; other losses pass through."""
    import importlib

    module, name = cls_path.rsplit(".", 1)
    cls = getattr(importlib.import_module(module), name)
    cls = getattr(getattr(cls, "__ray_metadata__", None), "modified_class", cls)  # FullyAsyncTrainer is a Ray actor
    trainer = object.__new__(cls)
    created = []
    trainer.resource_pool_manager = type("Pools", (), {"create_resource_pool": lambda self: created.append(1),
                                                       "resource_pool_dict": {}})()
    trainer.config = _experimental(entry, *TOPK, "algorithm.rollout_correction.bypass_mode=False",
                                   monkeypatch=monkeypatch)
    with pytest.raises(ValueError, match=f"dppo_tv_topk is not supported under {entry}".replace(".", r"\.")):
        trainer._init_resource_pools()
    assert created == []
    trainer.config = _experimental(entry, monkeypatch=monkeypatch)  # verl's own loss: untouched
    trainer._init_resource_pools()
    assert created == [1]
