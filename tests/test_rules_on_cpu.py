"""Unsupported combinations fail with the config key to change; binary modes run with everything."""

import os

import pytest

from dppo_verl.integrations.rules import actor_rule_violations, check_actor_config


def _compose(*overrides):
    """verl 0.9.1's own Hydra config, composed the way main_ppo does."""
    import verl
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    conf_dir = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
    with initialize_config_dir(config_dir=conf_dir, version_base=None):
        return compose(config_name="ppo_trainer", overrides=list(overrides))


TOPK = "actor_rollout_ref.actor.policy_loss.loss_mode=dppo_tv_topk"
BINARY = "actor_rollout_ref.actor.policy_loss.loss_mode=dppo_kl_binary"


def test_default_config_passes():
    check_actor_config(_compose(TOPK))
    check_actor_config(_compose(BINARY))
    check_actor_config(_compose())  # vanilla: not ours, nothing to check


@pytest.mark.parametrize(
    "override,key",
    [
        ("actor_rollout_ref.model.use_fused_kernels=True", "actor_rollout_ref.model.use_fused_kernels"),
        ("actor_rollout_ref.actor.fsdp_config.pad_to_length=True", "actor_rollout_ref.actor.fsdp_config.pad_to_length"),
        ("distillation.enabled=True", "distillation.enabled"),
        ("actor_rollout_ref.rollout.disaggregation.enabled=True", "actor_rollout_ref.rollout.disaggregation.enabled"),
        ("actor_rollout_ref.rollout.multi_turn.enable=True", "actor_rollout_ref.rollout.multi_turn.enable"),
        ("trainer.v1.trainer_mode=separate_async", "trainer.v1.trainer_mode"),
        ("+actor_rollout_ref.rollout.custom.dppo_num_topk=8", "actor_rollout_ref.rollout.custom.dppo_num_topk"),
    ],
)
def test_topk_rules_name_the_key(override, key):
    cfg = _compose(TOPK, override)
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        check_actor_config(cfg)
    assert actor_rule_violations(_compose(BINARY, override)) == []  # binary modes run with all of them


def test_missing_rollout_logprobs_for_every_mode():
    for mode in (TOPK, BINARY):
        msgs = actor_rule_violations(_compose(mode, "actor_rollout_ref.rollout.calculate_log_probs=False"))
        assert any("actor_rollout_ref.rollout.calculate_log_probs=True" in m for m in msgs)


def test_dppo_config_target_and_bad_knob():
    cfg = _compose(
        TOPK,
        "actor_rollout_ref.actor.policy_loss._target_=dppo_verl.config.DPPOPolicyLossConfig",
        "+actor_rollout_ref.actor.policy_loss.num_topk=8",
        "+actor_rollout_ref.rollout.custom.dppo_num_topk=8",
    )
    check_actor_config(cfg)
    from verl.utils.config import omega_conf_to_dataclass

    pl = omega_conf_to_dataclass(cfg.actor_rollout_ref.actor.policy_loss)  # what the worker builds
    assert type(pl).__name__ == "DPPOPolicyLossConfig" and pl.num_topk == 8
    bad = _compose(TOPK, "actor_rollout_ref.actor.policy_loss._target_=dppo_verl.config.DPPOPolicyLossConfig",
                   "+actor_rollout_ref.actor.policy_loss.anchor=old")
    with pytest.raises(ValueError, match="anchor=old is not available for dppo_tv_topk"):
        check_actor_config(bad)


def test_unknown_mode_lists_valid_ones():
    with pytest.raises(ValueError, match=r"unknown divergence 'js'; registered: \[.*'kl'.*'tv'"):
        check_actor_config(_compose("actor_rollout_ref.actor.policy_loss.loss_mode=dppo_js_topk"))
