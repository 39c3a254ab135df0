"""dppo-verl-train: shorthand expansion, validation before Ray, dry run (no Ray is started here)."""

import pytest

from dppo_verl.train import expand_overrides, main


def test_shorthand_topk_expands_to_one_consistent_config():
    out, notes = expand_overrides(["actor.policy_loss=dppo_tv_topk", "trainer.total_training_steps=3"])
    assert "actor_rollout_ref.actor.policy_loss.loss_mode=dppo_tv_topk" in out
    assert "actor_rollout_ref.actor.policy_loss._target_=dppo_verl.config.DPPOPolicyLossConfig" in out
    assert "+actor_rollout_ref.rollout.custom.dppo_num_topk=20" in out
    assert "actor_rollout_ref.rollout.calculate_log_probs=True" in out
    assert "actor_rollout_ref.model.external_lib=dppo_verl" in out
    assert "trainer.total_training_steps=3" in out and notes


def test_knobs_get_plus_and_k_follows_num_topk():
    out, _ = expand_overrides(["actor_rollout_ref.actor.policy_loss=dppo_kl_topk", "actor.policy_loss.num_topk=8",
                               "actor_rollout_ref.actor.policy_loss.delta_high=0.1"])
    assert "+actor_rollout_ref.actor.policy_loss.num_topk=8" in out
    assert "+actor_rollout_ref.actor.policy_loss.delta_high=0.1" in out
    assert "+actor_rollout_ref.rollout.custom.dppo_num_topk=8" in out


def test_binary_requests_no_topk_and_full_form_is_untouched():
    out, _ = expand_overrides(["actor.policy_loss=dppo_tv_binary"])
    assert not any("dppo_num_topk" in a for a in out)
    full = ["actor_rollout_ref.actor.policy_loss.loss_mode=dppo_tv_topk"]
    assert expand_overrides(full) == (full, [])  # stock form: passed through


def test_unknown_mode_lists_valid_modes():
    with pytest.raises(SystemExit, match=r"unknown DPPO loss mode; valid: \[.*'dppo_tv_topk'"):
        expand_overrides(["actor.policy_loss=dppo_tv_top3"])


def test_dry_run_resolves_and_validates(capsys):
    assert main(["actor.policy_loss=dppo_tv_topk", "actor.policy_loss.delta_high=0.2", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "loss_mode: dppo_tv_topk" in out and "dppo_num_topk: 20" in out and "delta_high: 0.2" in out
    assert "dry run" in out


def test_inconsistent_config_fails_in_the_driver(capsys):
    rc = main(["actor.policy_loss=dppo_kl_topk", "actor_rollout_ref.model.use_fused_kernels=True", "--dry-run"])
    assert rc == 2
    assert "actor_rollout_ref.model.use_fused_kernels" in capsys.readouterr().err
    rc = main(["actor.policy_loss=dppo_kl_topk", "+actor_rollout_ref.rollout.custom.dppo_num_topk=5", "--dry-run"])
    assert rc == 2 and "dppo_num_topk" in capsys.readouterr().err  # K differs on the two sides
