"""The contract between dppo_verl's processes and verl: every batch key, model-output key, config path, environment
variable and marker, spelled once (SPEC, "Config and data contract"). Nothing here imports verl or torch.

Who writes and who reads (the process map of :mod:`dppo_verl.integrations`)::

    rollout server (vLLM / SGLang)  --extra_fields-->  agent loop  --batch keys-->  actor (logits hook)
    actor logits hook  --model-output keys-->  actor ppo_loss wrapper  --HandOff-->  DPPO policy loss
    driver (launcher / main_ppo hook)  --config paths, env vars-->  every Ray worker

Shapes: ``B`` samples, ``T`` response tokens, ``K`` rollout top-K ranks, ``N`` packed logits rows.
"""

from __future__ import annotations

# --- batch keys, rollout -> actor ----------------------------------------------------------------------------
ROLLOUT_LOG_PROBS = "rollout_log_probs"  # [B, T] fp32 log mu(a_t) (verl's own key)
ROLLOUT_TOPK_IDS = "rollout_topk_ids"  # [B, T, K] int32, the engine's ranks 1..K, untouched
ROLLOUT_TOPK_LOGPROBS = "rollout_topk_logprobs"  # [B, T, K] fp32, -inf where a rank is missing
TOPK_KEYS = (ROLLOUT_TOPK_IDS, ROLLOUT_TOPK_LOGPROBS)
OLD_LOG_PROBS = "old_log_probs"  # [B, T] fp32 log pi_old(a_t), verl's recomputation (its own key)
# [B, T, K] fp32 log pi_old at the rollout's top-K ids, -inf where the rollout's rank is missing: written by verl's
# pi_old pass for the Top-K modes (integrations.actor.old_pass), read by anchor=old and masked_at_start_frac
OLD_TOPK_LOGPROBS = "old_topk_logprobs"
# [B, T] fp32 each response token's divergence from the mode's anchor at the step's start (pi_old), written by verl's
# pi_old pass (integrations.actor.old_pass); the loss's actor/dppo/masked_at_start_frac reads it
START_DIVERGENCE = "dppo_start_divergence"
OUT_OLD_TOPK_PREFIX = "dppo_old_topk_"  # + k: [N] one rank of it per engine output (verl's outputs are 1-D per row)
# extra_fields only (popped before the batch): the tool agent's rows cover this many assistant turns
TOPK_TURNS = "dppo_topk_turns"

# --- model outputs, actor logits hook -> loss (per packed row, shaped like verl's log_probs) ------------------
OUT_DIVERGENCE = "dppo_divergence"  # [N] D_t of the Top-K estimator
OUT_SUPPORT_SIZE = "dppo_support_size"  # [N] valid support slots, 1..K + 1
OUT_DDOT = "dppo_ddot"  # [N] D-dot_t, direction=predictive only
OUT_TOPK_VALID = "dppo_topk_valid"  # [N] top-K row status: 1 valid, 0 missing, -1 log-prob != rollout_log_probs
# [N] log(sum over never-sampled ids of exp(z)) - z(label): the trainer's mass on ids the rollout cannot sample
OUT_EXCLUDED = "dppo_excluded_log_ratio"
TOKEN_OUTPUT_KEYS = (OUT_DIVERGENCE, OUT_SUPPORT_SIZE, OUT_DDOT, OUT_TOPK_VALID, OUT_EXCLUDED)

# --- config paths (verl's Hydra tree) ------------------------------------------------------------------------
ACTOR = "actor_rollout_ref.actor"
ROLLOUT = "actor_rollout_ref.rollout"
POLICY_LOSS = f"{ACTOR}.policy_loss"
LOSS_MODE = f"{POLICY_LOSS}.loss_mode"
SAMPLED_IDS_KNOB = f"{POLICY_LOSS}.sampled_ids"  # which ids the rollout engine samples from (mu's normalisation)
CONFIG_TARGET = "dppo_verl.config.DPPOPolicyLossConfig"  # policy_loss._target_ for the DPPO knobs
NUM_TOPK_CUSTOM = "dppo_num_topk"  # key under rollout.custom: the K the rollout engine returns
ROLLOUT_NUM_TOPK = f"{ROLLOUT}.custom.{NUM_TOPK_CUSTOM}"
ALLOW_TRUNCATED_SAMPLING = f"{ROLLOUT}.custom.dppo_allow_truncated_sampling"
CALCULATE_LOG_PROBS = f"{ROLLOUT}.calculate_log_probs"
EXTERNAL_LIB = "actor_rollout_ref.model.external_lib"
MODEL_PATH = "actor_rollout_ref.model.path"
RAY_ENV_VARS = "ray_kwargs.ray_init.runtime_env.env_vars"
DEFAULT_AGENT_LOOP = f"{ROLLOUT}.agent.default_agent_loop"  # verl's loop for samples without an agent_name
MULTI_TURN = f"{ROLLOUT}.multi_turn"  # the tool agent's settings (verl's V1 never reads multi_turn.enable)

DEFAULT_NUM_TOPK = 20  # K of the paper's runs

# --- plugin loading and environment --------------------------------------------------------------------------
PLUGIN_MODULE = "dppo_verl.plugin"  # importing it installs the plugin (verl's entry point names it)
ENV_EXTERNAL_MODULES = "VERL_USE_EXTERNAL_MODULES"  # verl imports these modules in every process
ENV_PLATFORM = "VERL_PLATFORM"  # "cpu" asks for dppo_verl's CPU platform; anything else is verl's business
ENV_DRIVER_VERSION = "DPPO_VERL_DRIVER_VERSION"  # the driver's dppo_verl version, checked on every node
ENV_ANY_VERL = "DPPO_VERL_ALLOW_ANY_VERL"  # "1": run DPPO on a verl other than the pinned one (own risk)
CPU_PLATFORM = "cpu"

# --- markers -------------------------------------------------------------------------------------------------
PATCHED_SOURCE_MARKER = "DPPO_TOPK_PATCHED"  # left in verl's source by the patches/ diffs
METRIC_PREFIX = "actor/dppo/"
VERL_PIN = "0.9.1"
