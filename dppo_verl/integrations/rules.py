"""Which verl settings a DPPO mode can run with: one function, called by the launcher before any worker starts.

Binary modes need only the sampled-token log-probs, so they run with every verl option. Top-K modes need the
logits (verl's logits-processor hook) and the rollout's per-token top-K tensors, which several verl paths do
not provide. Each rule names the config key to change.
"""

from __future__ import annotations

from typing import Any

from ..config import parse_loss_mode, resolve_knobs

__all__ = ["actor_rule_violations", "check_actor_config", "TOPK_STRATEGIES"]

TOPK_STRATEGIES = ("fsdp", "fsdp2", "megatron")

# (config key, bad value predicate, why) for Top-K modes.
_TOPK_RULES = (
    ("actor_rollout_ref.model.use_fused_kernels", bool, "fused kernels never materialise the logits the Top-K divergence needs"),
    ("actor_rollout_ref.actor.fsdp_config.pad_to_length", bool, "pad_to_length breaks the hook's row alignment"),
    ("actor_rollout_ref.actor.pad_to_length", bool, "pad_to_length breaks the hook's row alignment"),
    ("actor_rollout_ref.actor.megatron.dynamic_context_parallel", bool, "dynamic CP layouts are not reproduced by the hook"),
    ("distillation.enabled", bool, "top-K distillation uses the same engine hook"),
    ("actor_rollout_ref.rollout.disaggregation.enabled", bool, "prefill/decode disaggregation bypasses the top-K rollout capture"),
    ("actor_rollout_ref.rollout.multi_turn.enable", bool, "multi-turn agent loops keep only the first turn's top-K"),
    ("trainer.v1.trainer_mode", lambda v: v not in (None, "sync"), "async partial rollouts merge log-probs but not the top-K tensors"),
    ("actor_rollout_ref.actor.strategy", lambda v: v is not None and v not in TOPK_STRATEGIES, f"Top-K supports the {TOPK_STRATEGIES} engines"),
)


def _select(config: Any, key: str, default=None):
    from omegaconf import OmegaConf

    if isinstance(config, dict):
        config = OmegaConf.create(config)
    return OmegaConf.select(config, key, default=default)


def actor_rule_violations(config: Any) -> list[str]:
    """Every rule the full verl config (``DictConfig`` or dict) breaks for its DPPO loss mode, as messages."""
    mode = _select(config, "actor_rollout_ref.actor.policy_loss.loss_mode")
    parsed = parse_loss_mode(mode)
    if parsed is None:
        return []
    problems = []
    try:
        knobs = resolve_knobs(mode, _select(config, "actor_rollout_ref.actor.policy_loss", {}))
    except (ValueError, KeyError) as e:
        return [str(e)]
    if knobs.anchor == "rollout" and not _select(config, "actor_rollout_ref.rollout.calculate_log_probs", True):
        problems.append(f"{mode} anchors on the rollout log-probs: set actor_rollout_ref.rollout.calculate_log_probs=True")
    if parsed[1] != "topk":
        return problems
    for key, bad, why in _TOPK_RULES:
        value = _select(config, key)
        if bad(value):
            problems.append(f"{mode} cannot run with {key}={value}: {why}")
    if knobs.fused_logprobs:
        problems += _fused_logprob_violations(config, mode)
    k_rollout = _select(config, "actor_rollout_ref.rollout.custom.dppo_num_topk")
    if k_rollout is not None and int(k_rollout) != knobs.num_topk:
        problems.append(
            f"{mode}: the rollout requests K={k_rollout} (actor_rollout_ref.rollout.custom.dppo_num_topk) but the loss "
            f"expects K={knobs.num_topk} (actor_rollout_ref.actor.policy_loss.num_topk): make them equal"
        )
    return problems


def _fused_logprob_violations(config: Any, mode: str) -> list[str]:
    """``policy_loss.fused_logprobs`` replaces verl's log-prob pass over the logits with a Triton kernel."""
    import importlib.util

    key = "actor_rollout_ref.actor.policy_loss.fused_logprobs=True"
    problems = []
    if _select(config, "actor_rollout_ref.model.use_fused_kernels"):
        problems.append(f"{mode}: {key} reads the logits, which actor_rollout_ref.model.use_fused_kernels=True "
                        "never materialises: set one of them False")
    if importlib.util.find_spec("triton") is None:
        problems.append(f"{mode}: {key} needs the `triton` package (it ships with CUDA builds of torch)")
    return problems


def check_actor_config(config: Any) -> None:
    """Raise one ``ValueError`` listing every violated rule (nothing to do for non-DPPO modes)."""
    problems = actor_rule_violations(config)
    if problems:
        raise ValueError("dppo_verl: unsupported configuration:\n  - " + "\n  - ".join(problems))
