#!/usr/bin/env bash
# DPPO Binary TV on a single GPU: Qwen3-0.6B on GSM8K. Binary needs no logits hook and no top-K rollout,
# so it runs with every verl option (fused kernels included). delta = 0.15, mu-anchored.
#   bash examples/run_single_gpu_dppo_tv_binary.sh [extra verl overrides] [--dry-run]
set -euo pipefail
MODEL=${MODEL:-Qwen/Qwen3-0.6B}
DATA_DIR=${DATA_DIR:-$HOME/data/gsm8k}
TRAIN=${DPPO_VERL_TRAIN:-dppo-verl-train}

ARGS=(
  actor.policy_loss=dppo_tv_binary
  actor.policy_loss.delta_low=0.15 actor.policy_loss.delta_high=0.15 actor.policy_loss.truncation_cap=20.0
  algorithm.adv_estimator=grpo algorithm.norm_adv_by_std_in_grpo=False algorithm.use_kl_in_reward=False
  data.train_files="$DATA_DIR/train.parquet" data.val_files="$DATA_DIR/test.parquet"
  data.train_batch_size=64 data.max_prompt_length=512 data.max_response_length=1024
  actor_rollout_ref.model.path="$MODEL" actor_rollout_ref.model.use_remove_padding=True
  actor_rollout_ref.actor.strategy=fsdp2 actor_rollout_ref.ref.strategy=fsdp2
  actor_rollout_ref.actor.optim.lr=1e-6 actor_rollout_ref.actor.ppo_mini_batch_size=16
  actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=8
  actor_rollout_ref.actor.loss_agg_mode=seq-mean-token-sum-norm actor_rollout_ref.actor.use_kl_loss=False
  actor_rollout_ref.rollout.name=vllm actor_rollout_ref.rollout.n=8
  actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=16
  actor_rollout_ref.rollout.temperature=1.0 actor_rollout_ref.rollout.gpu_memory_utilization=0.5
  actor_rollout_ref.rollout.tensor_model_parallel_size=1  # verl's default (2) needs two GPUs (found by make rehearse)
  trainer.nnodes=1 trainer.n_gpus_per_node=1 trainer.total_training_steps=200
  trainer.project_name=dppo_verl trainer.experiment_name=single_gpu_dppo_tv_binary
)
exec $TRAIN "${ARGS[@]}" "$@"
