#!/usr/bin/env bash
# DPPO Top-K KL, Qwen3-30B-A3B-Base, Megatron TP=2 / EP=8 (vocab-parallel Top-K across the TP group),
# multi-node Ray (4 nodes x 8 GPUs), vLLM TP=4 rollouts with top-20 logprobs. delta = 0.05 (KL), K = 20.
#
# How the plugin reaches every node: `pip install dppo-verl` in the Python environment of EVERY node (verl loads
# it through its `verl.plugins` entry point in each process that imports verl). The launcher also sets
# actor_rollout_ref.model.external_lib=dppo_verl.plugin and VERL_USE_EXTERNAL_MODULES=dppo_verl.plugin in the Ray runtime env,
# so a node without the package fails loudly ("No module named dppo_verl") instead of training without DPPO.
#
#   on the head node:     ROLE=head   bash examples/run_qwen3_30b_a3b_megatron_dppo_kl_topk_multinode.sh
#   on each worker node:  ROLE=worker HEAD_IP=<head ip> bash examples/run_qwen3_30b_a3b_megatron_dppo_kl_topk_multinode.sh
#   check the config only (no Ray):   bash examples/run_qwen3_30b_a3b_megatron_dppo_kl_topk_multinode.sh --dry-run
set -euo pipefail
ROLE=${ROLE:-head}
NNODES=${NNODES:-4}
RAY_PORT=${RAY_PORT:-6379}
MODEL=${MODEL:-Qwen/Qwen3-30B-A3B-Base}
DATA_DIR=${DATA_DIR:-$HOME/data/dapo-math-17k}
TRAIN=${DPPO_VERL_TRAIN:-dppo-verl-train}
# Same on every node: NCCL over the cluster fabric, tokenizers quiet, vLLM V1 engine.
export NCCL_DEBUG=${NCCL_DEBUG:-WARN} TOKENIZERS_PARALLELISM=false VLLM_USE_V1=1

dry_run=0
for a in "$@"; do [[ $a == --dry-run ]] && dry_run=1; done

if [[ $dry_run == 0 ]]; then
  if [[ $ROLE == worker ]]; then
    exec ray start --address="${HEAD_IP:?set HEAD_IP}:$RAY_PORT" --num-gpus=8 --block
  fi
  ray start --head --port="$RAY_PORT" --num-gpus=8 --dashboard-host=0.0.0.0
  echo "waiting for $NNODES nodes..."; until [[ $(ray status 2>/dev/null | grep -c 'node_') -ge $NNODES ]]; do sleep 5; done
fi

ARGS=(
  --config-name ppo_megatron_trainer
  actor.policy_loss=dppo_kl_topk
  actor.policy_loss.delta_low=0.05 actor.policy_loss.delta_high=0.05
  actor.policy_loss.num_topk=20 actor.policy_loss.truncation_cap=20.0
  algorithm.adv_estimator=grpo algorithm.norm_adv_by_std_in_grpo=False algorithm.use_kl_in_reward=False
  data.train_files="$DATA_DIR/train.parquet" data.val_files="$DATA_DIR/test.parquet"
  data.train_batch_size=256 data.max_prompt_length=2048 data.max_response_length=8192
  actor_rollout_ref.model.path="$MODEL" actor_rollout_ref.model.use_remove_padding=True
  actor_rollout_ref.actor.megatron.tensor_model_parallel_size=2
  actor_rollout_ref.actor.megatron.expert_model_parallel_size=8
  actor_rollout_ref.actor.megatron.pipeline_model_parallel_size=1
  actor_rollout_ref.actor.optim.lr=1e-6 actor_rollout_ref.actor.ppo_mini_batch_size=32
  actor_rollout_ref.actor.use_dynamic_bsz=True actor_rollout_ref.actor.ppo_max_token_len_per_gpu=20480
  actor_rollout_ref.actor.loss_agg_mode=seq-mean-token-sum-norm actor_rollout_ref.actor.use_kl_loss=False
  actor_rollout_ref.rollout.name=vllm actor_rollout_ref.rollout.n=16
  actor_rollout_ref.rollout.temperature=1.0 actor_rollout_ref.rollout.top_p=1.0 actor_rollout_ref.rollout.top_k=-1
  actor_rollout_ref.rollout.tensor_model_parallel_size=4 actor_rollout_ref.rollout.gpu_memory_utilization=0.6
  trainer.nnodes="$NNODES" trainer.n_gpus_per_node=8 trainer.total_training_steps=500
  trainer.project_name=dppo_verl trainer.experiment_name=qwen3_30b_a3b_megatron_dppo_kl_topk
)
exec $TRAIN "${ARGS[@]}" "$@"
