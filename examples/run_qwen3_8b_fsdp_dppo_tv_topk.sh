#!/usr/bin/env bash
# DPPO Top-K TV, Qwen3-8B, FSDP2, one node of 8 GPUs, vLLM rollouts returning the top-20 logprobs.
# Paper settings (arXiv 2602.04879, Sec. 5 / App. G.2): delta = 0.15 (TV), K = 20, mu-anchored ratio and mask,
# Dr.GRPO advantages (no std normalisation, seq-mean-token-sum-norm), lr 1e-6, 256 prompts x 16 samples,
# mini-batch 32 (8 optimizer steps per rollout batch), temperature 1 with top_p = 1 / top_k = -1 (required).
#   bash examples/run_qwen3_8b_fsdp_dppo_tv_topk.sh [extra verl overrides] [--dry-run]
set -euo pipefail
MODEL=${MODEL:-Qwen/Qwen3-8B}
DATA_DIR=${DATA_DIR:-$HOME/data/dapo-math-17k}
TRAIN=${DPPO_VERL_TRAIN:-dppo-verl-train}

ARGS=(
  actor.policy_loss=dppo_tv_topk
  actor.policy_loss.delta_low=0.15 actor.policy_loss.delta_high=0.15
  actor.policy_loss.num_topk=20 actor.policy_loss.truncation_cap=20.0
  algorithm.adv_estimator=grpo algorithm.norm_adv_by_std_in_grpo=False algorithm.use_kl_in_reward=False
  data.train_files="$DATA_DIR/train.parquet" data.val_files="$DATA_DIR/test.parquet"
  data.train_batch_size=256 data.max_prompt_length=2048 data.max_response_length=8192
  actor_rollout_ref.model.path="$MODEL" actor_rollout_ref.model.use_remove_padding=True
  actor_rollout_ref.actor.strategy=fsdp2 actor_rollout_ref.ref.strategy=fsdp2
  actor_rollout_ref.actor.optim.lr=1e-6 actor_rollout_ref.actor.ppo_mini_batch_size=32
  actor_rollout_ref.actor.use_dynamic_bsz=True actor_rollout_ref.actor.ppo_max_token_len_per_gpu=20480
  actor_rollout_ref.actor.loss_agg_mode=seq-mean-token-sum-norm actor_rollout_ref.actor.use_kl_loss=False
  actor_rollout_ref.actor.ulysses_sequence_parallel_size=2
  actor_rollout_ref.rollout.name=vllm actor_rollout_ref.rollout.n=16
  actor_rollout_ref.rollout.temperature=1.0 actor_rollout_ref.rollout.top_p=1.0 actor_rollout_ref.rollout.top_k=-1
  actor_rollout_ref.rollout.tensor_model_parallel_size=2 actor_rollout_ref.rollout.gpu_memory_utilization=0.6
  trainer.nnodes=1 trainer.n_gpus_per_node=8 trainer.total_training_steps=500
  trainer.project_name=dppo_verl trainer.experiment_name=qwen3_8b_fsdp_dppo_tv_topk
)
exec $TRAIN "${ARGS[@]}" "$@"
