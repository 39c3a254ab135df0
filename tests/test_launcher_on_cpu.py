"""dppo-verl-train: shorthand expansion, validation before Ray, dry run (no Ray is started here)."""

import pytest

import dppo_verl

from dppo_verl.train import expand_overrides, main


def test_shorthand_topk_expands_to_one_consistent_config():
    out, notes = expand_overrides(["actor.policy_loss=dppo_tv_topk", "trainer.total_training_steps=3"])
    assert "actor_rollout_ref.actor.policy_loss.loss_mode=dppo_tv_topk" in out
    assert "actor_rollout_ref.actor.policy_loss._target_=dppo_verl.config.DPPOPolicyLossConfig" in out
    assert "+actor_rollout_ref.rollout.custom.dppo_num_topk=20" in out
    assert "actor_rollout_ref.rollout.calculate_log_probs=True" in out
    assert "actor_rollout_ref.model.external_lib=dppo_verl.plugin" in out
    assert "+ray_kwargs.ray_init.runtime_env.env_vars.VERL_USE_EXTERNAL_MODULES=dppo_verl.plugin" in out
    assert "+ray_kwargs.ray_init.runtime_env.env_vars.DPPO_VERL_DRIVER_VERSION=" + dppo_verl.__version__ in out
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


def test_every_knob_has_a_short_form(capsys):
    """Knobs added after the core ones (TRM, CPPO) resolve through the shorthand too (Hydra needs the '+')."""
    assert main(["actor.policy_loss=cppo_tv_binary", "actor.policy_loss.delta_seq=0.5",
                 "actor.policy_loss.seq_agg=mean", "actor.policy_loss.cppo_w_min=0.7", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "delta_seq: 0.5" in out and "seq_agg: mean" in out and "cppo_w_min: 0.7" in out


def test_inconsistent_config_fails_in_the_driver(capsys):
    rc = main(["actor.policy_loss=dppo_kl_topk", "actor_rollout_ref.model.use_fused_kernels=True", "--dry-run"])
    assert rc == 2
    assert "actor_rollout_ref.model.use_fused_kernels" in capsys.readouterr().err
    rc = main(["actor.policy_loss=dppo_kl_topk", "+actor_rollout_ref.rollout.custom.dppo_num_topk=5", "--dry-run"])
    assert rc == 2 and "dppo_num_topk" in capsys.readouterr().err  # K differs on the two sides


@pytest.mark.parametrize(
    "override,key",
    [
        ("actor_rollout_ref.rollout.top_p=0.9", "actor_rollout_ref.rollout.top_p"),
        ("actor_rollout_ref.rollout.top_k=50", "actor_rollout_ref.rollout.top_k"),
        ("actor_rollout_ref.rollout.logprobs_mode=raw_logprobs", "actor_rollout_ref.rollout.logprobs_mode"),
        ("+actor_rollout_ref.rollout.min_p=0.05", "actor_rollout_ref.rollout.min_p"),
    ],
)
def test_truncated_sampling_is_refused_with_opt_out(capsys, override, key):
    assert main(["actor.policy_loss=dppo_tv_binary", override, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert key in err and "dppo_allow_truncated_sampling" in err
    assert main(["actor.policy_loss=dppo_tv_binary", override, "+actor_rollout_ref.rollout.custom.dppo_allow_truncated_sampling=True", "--dry-run"]) == 0


def test_k_above_vllm_max_logprobs(capsys):
    assert main(["actor.policy_loss=dppo_tv_topk", "actor.policy_loss.num_topk=32", "--dry-run"]) == 2
    assert "max_logprobs=32" in capsys.readouterr().err
    assert main(["actor.policy_loss=dppo_tv_topk", "actor.policy_loss.num_topk=32",
                 "+actor_rollout_ref.rollout.engine_kwargs.vllm.max_logprobs=32", "--dry-run"]) == 0


def test_yaml_string_shorthand(tmp_path, capsys):
    """A user YAML saying `policy_loss: dppo_kl_topk` (a string where verl has a node)."""
    (tmp_path / "my_run.yaml").write_text(
        "hydra:\n  searchpath:\n    - pkg://verl.trainer.config\n"
        "defaults:\n  - ppo_trainer\n  - _self_\n"
        "actor_rollout_ref:\n  actor:\n    policy_loss: dppo_kl_topk\n"
        "trainer:\n  total_training_steps: 7\n"
    )
    assert main(["--config-path", str(tmp_path), "--config-name", "my_run", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "loss_mode: dppo_kl_topk" in out and "total_training_steps: 7" in out and "dppo_num_topk: 20" in out


def test_sglang_original_logprob_env_with_temperature(capsys, monkeypatch):
    args = ["actor.policy_loss=dppo_tv_binary", "actor_rollout_ref.rollout.name=sglang",
            "actor_rollout_ref.rollout.temperature=0.7", "--dry-run"]
    assert main(args) == 0
    monkeypatch.setenv("SGLANG_RETURN_ORIGINAL_LOGPROB", "1")
    assert main(args) == 2 and "SGLANG_RETURN_ORIGINAL_LOGPROB" in capsys.readouterr().err
    assert main(args[:2] + ["--dry-run"]) == 0  # temperature 1: raw and processed log-probs agree


@pytest.mark.parametrize("extra,bypass", [
    ([], "true"),  # anchored on the rollout: verl's pi_old pass is skipped (V1 bypass: old_log_probs := mu)
    (["actor.policy_loss.anchor=old"], "false"),  # reads pi_old: keep the pass
    (["trainer.use_v1=False"], "false"),  # the legacy trainer's bypass would replace the loss
    (["algorithm.rollout_correction.bypass_mode=False"], "false"),  # the user's opt-out wins
])
def test_pi_old_pass_skipped_only_when_nothing_reads_it(capsys, extra, bypass):
    assert main(["actor.policy_loss=dppo_tv_binary", *extra, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"    bypass_mode: {bypass}" in out
    assert ("algorithm.rollout_correction.bypass_mode=True" in out.split("dry run")[0]) == (bypass == "true")


def test_sglang_rollout_normalises_pi_over_every_head_row(capsys):
    """verl's SGLang server masks no head rows (its vLLM server does): the launcher sets sampled_ids=all for it, the
    rule refuses the vLLM set with SGLang when the user asked for it explicitly (issue #17)."""
    assert main(["actor.policy_loss=dppo_tv_binary", "actor_rollout_ref.rollout.name=sglang", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "+actor_rollout_ref.actor.policy_loss.sampled_ids=all" in out.split("dry run")[0] and "sampled_ids: all" in out
    assert main(["actor.policy_loss=dppo_tv_binary", "actor_rollout_ref.rollout.name=sglang",
                 "actor_rollout_ref.actor.policy_loss.sampled_ids=vllm", "--dry-run"]) == 2
    assert "set actor_rollout_ref.actor.policy_loss.sampled_ids=all" in capsys.readouterr().err
    assert main(["actor.policy_loss=dppo_tv_binary", "--dry-run"]) == 0  # vLLM: the knob's default (tokenizer's ids)
    assert "sampled_ids" not in capsys.readouterr().out
