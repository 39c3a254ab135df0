"""Unsupported combinations fail with the config key to change; binary modes run with everything."""

import os

import pytest

from dppo_verl.launch.rules import actor_rule_violations, check_actor_config


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


K20 = "+actor_rollout_ref.rollout.custom.dppo_num_topk=20"


def test_default_config_passes():
    check_actor_config(_compose(TOPK, K20))
    check_actor_config(_compose(BINARY))
    check_actor_config(_compose())  # vanilla: not ours, nothing to check


def test_topk_without_rollout_k_names_the_key():
    """Stock main_ppo users select the mode alone: the rollout would return no top-K and the run would die after
    model load and the first rollout. Refused before Ray, naming the key (the launcher's shorthand fills it in)."""
    with pytest.raises(ValueError, match=r"set \+actor_rollout_ref\.rollout\.custom\.dppo_num_topk=20"):
        check_actor_config(_compose(TOPK))


@pytest.mark.parametrize(
    "override,key",
    [
        ("actor_rollout_ref.model.use_fused_kernels=True", "actor_rollout_ref.model.use_fused_kernels"),
        ("actor_rollout_ref.actor.fsdp_config.pad_to_length=True", "actor_rollout_ref.actor.fsdp_config.pad_to_length"),
        ("distillation.enabled=True", "distillation.enabled"),
        ("actor_rollout_ref.rollout.disaggregation.enabled=True", "actor_rollout_ref.rollout.disaggregation.enabled"),
        ("trainer.v1.trainer_mode=separate_async", "trainer.v1.trainer_mode"),
        ("+actor_rollout_ref.rollout.custom.dppo_num_topk=8", "actor_rollout_ref.rollout.custom.dppo_num_topk"),
    ],
)
def test_topk_rules_name_the_key(override, key):
    cfg = _compose(TOPK, override, *([] if "dppo_num_topk" in override else [K20]))
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        check_actor_config(cfg)
    assert actor_rule_violations(_compose(BINARY, override)) == []  # binary modes run with all of them


def test_missing_rollout_logprobs_for_every_mode():
    for mode in ((TOPK, K20), (BINARY,)):
        msgs = actor_rule_violations(_compose(*mode, "actor_rollout_ref.rollout.calculate_log_probs=False"))
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
                   "+actor_rollout_ref.actor.policy_loss.anchor=old", "+actor_rollout_ref.actor.policy_loss.fused_logprobs=True",
                   K20)
    with pytest.raises(ValueError, match="fused_logprobs=True is not available with anchor=old"):
        check_actor_config(bad)


def test_unknown_mode_lists_valid_ones():
    with pytest.raises(ValueError, match=r"unknown divergence 'js'; registered: \[.*'kl'.*'tv'"):
        check_actor_config(_compose("actor_rollout_ref.actor.policy_loss.loss_mode=dppo_js_topk"))


@pytest.mark.parametrize("override,key", [
    ("algorithm.rollout_correction.rollout_is=token", "algorithm.rollout_correction.rollout_is=null"),
    ("algorithm.rollout_correction.rollout_rs=token_k1", "algorithm.rollout_correction.rollout_rs=null"),
])
def test_rollout_correction_on_top_of_dppo_is_refused(override, key):
    """verl's pi_old/mu weights on a loss already weighted by min(pi/mu, C) would count the correction twice."""
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        check_actor_config(_compose(BINARY, override))
    anchored_old = _compose(BINARY, override, "actor_rollout_ref.actor.policy_loss._target_=dppo_verl.config.DPPOPolicyLossConfig",
                            "+actor_rollout_ref.actor.policy_loss.anchor=old")
    assert actor_rule_violations(anchored_old) == []  # anchored on pi_old, verl's correction is the ablation's own
    assert actor_rule_violations(_compose(override)) == []  # vanilla: verl's business


def test_legacy_bypass_mode_would_replace_the_loss():
    bypass = "algorithm.rollout_correction.bypass_mode=True"
    with pytest.raises(ValueError, match=r"rewrites .*loss_mode to 'bypass_mode'.*bypass_mode=False or trainer\.use_v1=True"):
        check_actor_config(_compose(BINARY, bypass, "trainer.use_v1=False"))
    assert actor_rule_violations(_compose(BINARY, bypass)) == []  # V1 keeps the loss mode (and skips pi_old)


def test_multi_turn_detected_the_way_verl_selects_the_agent_loop(tmp_path):
    """verl picks the loop from the data's agent_name column, else rollout.agent.default_agent_loop; it never reads
    multi_turn.enable. Top-K modes run with single_turn_agent and tool_agent (every turn's top-K is carried,
    test_tool_agent_topk_on_cpu.py) and refuse any other loop, which may keep some turns' top-K only."""
    import pandas as pd

    from dppo_verl.launch.rules import check_config

    single = tmp_path / "single.parquet"
    pd.DataFrame({"prompt": ["a", "b"], "agent_name": ["single_turn_agent", None]}).to_parquet(single)
    tool = tmp_path / "tool.parquet"
    pd.DataFrame({"prompt": ["a", "b"], "agent_name": ["single_turn_agent", "tool_agent"]}).to_parquet(tool)
    custom = tmp_path / "custom.parquet"
    pd.DataFrame({"prompt": ["a", "b"], "agent_name": ["tool_agent", "my_agent"]}).to_parquet(custom)
    check_config(_compose(TOPK, K20, f"data.train_files={single}", f"data.val_files={single}"))
    check_config(_compose(TOPK, K20, f"data.train_files={tool}", f"data.val_files={single}"))
    check_config(_compose(TOPK, K20, "actor_rollout_ref.rollout.agent.default_agent_loop=tool_agent"))
    with pytest.raises(ValueError, match=r"agent loops \['my_agent'\] \(data column agent_name"):
        check_config(_compose(TOPK, K20, f"data.train_files={tool}", f"data.val_files={custom}"))
    with pytest.raises(ValueError, match=r"agent loops \['my_agent'\]"):
        check_config(_compose(TOPK, K20, "actor_rollout_ref.rollout.agent.default_agent_loop=my_agent"))
    check_config(_compose(BINARY, f"data.train_files={custom}"))  # binary modes run with any loop
    check_config(_compose(TOPK, K20, "actor_rollout_ref.rollout.multi_turn.enable=True"))  # verl ignores the flag


def test_topk_above_a_local_models_vocabulary_is_refused(tmp_path):
    """vLLM's engine core dies on K above the model's vocabulary (torch.topk "selected index k out of range"): the
    launcher reads vocab_size from a local model folder's config.json and refuses, naming the key and the limit. A
    hub id cannot be read before the workers start: it passes here (the rollout server checks at its first request)."""
    from dppo_verl.launch.rules import check_config

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "qwen2", "vocab_size": 16}')
    small = _compose(TOPK, K20, f"actor_rollout_ref.model.path={model}")
    with pytest.raises(ValueError, match=r"dppo_num_topk=20 exceeds the model's vocabulary of 16 ids \(vocab_size in "
                                         + str(model).replace(".", r"\.") + r"/config\.json\).*at most 16"):
        check_config(small)
    (model / "config.json").write_text('{"model_type": "qwen2", "vocab_size": 20}')
    check_config(_compose(TOPK, K20, f"actor_rollout_ref.model.path={model}"))  # K = V: every id is a candidate
    (model / "config.json").write_text('{"model_type": "llava", "text_config": {"vocab_size": 16}}')
    with pytest.raises(ValueError, match=r"vocabulary of 16 ids"):  # multimodal configs nest the text model's size
        check_config(_compose(TOPK, K20, f"actor_rollout_ref.model.path={model}"))
    check_config(_compose(TOPK, K20, "actor_rollout_ref.model.path=Qwen/Qwen2.5-0.5B-Instruct"))  # a hub id
    check_config(_compose(BINARY, f"actor_rollout_ref.model.path={model}"))  # binary modes ask for no top-K


def test_old_anchored_topk_needs_the_pi_old_pass_and_the_v1_trainer():
    """Top-K anchor=old reads old_topk_logprobs from verl's pi_old pass (V1 trainer, no bypass); it weighs against mu,
    so verl's rollout correction on top is refused as for the rollout anchor."""
    old = ("actor_rollout_ref.actor.policy_loss._target_=dppo_verl.config.DPPOPolicyLossConfig",
           "+actor_rollout_ref.actor.policy_loss.anchor=old", K20)
    assert actor_rule_violations(_compose(TOPK, *old)) == []
    msgs = actor_rule_violations(_compose(TOPK, *old, "algorithm.rollout_correction.bypass_mode=True"))
    assert any("bypass_mode=False" in m for m in msgs), msgs
    msgs = actor_rule_violations(_compose(TOPK, *old, "trainer.use_v1=False"))
    assert any("trainer.use_v1=True" in m and "old_topk_logprobs" in m for m in msgs), msgs
    msgs = actor_rule_violations(_compose(TOPK, *old, "algorithm.rollout_correction.rollout_is=token"))
    assert any("rollout_is=null" in m for m in msgs), msgs


def test_pi_old_pass_outputs_are_only_a_dppo_modes_pi_old_pass():
    import functools

    from tensordict import TensorDict
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.losses import ppo_loss

    from conftest import make_actor_config
    from dppo_verl.config import DPPOPolicyLossConfig
    from dppo_verl.integrations.actor.old_pass import old_pass_of
    from verl.workers.config import PolicyLossConfig

    def call(pl, **flags):
        data = TensorDict({}, batch_size=[1])
        tu.assign_non_tensor(data, **flags)
        return old_pass_of(functools.partial(ppo_loss, config=make_actor_config(pl)), data)

    old_topk = DPPOPolicyLossConfig(loss_mode="dppo_tv_topk", anchor="old")
    assert call(old_topk, compute_loss=False)[0] == "dppo_tv_topk"
    assert call(old_topk, compute_loss=True) is None  # an evaluation with a loss
    assert call(old_topk, compute_loss=False, no_lora_adapter=True) is None  # the reference policy (LoRA)
    assert call(DPPOPolicyLossConfig(loss_mode="dppo_kl_binary"), compute_loss=False)[0] == "dppo_kl_binary"
    assert call(PolicyLossConfig(loss_mode="vanilla"), compute_loss=False) is None  # plain verl: untouched
    assert old_pass_of(None, TensorDict({}, batch_size=[1])) is None  # a worker without a loss (the ref worker)
