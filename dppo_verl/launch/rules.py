"""Which verl settings a DPPO mode can run with. One set of rules, run on the composed config:

- before Ray starts: by ``dppo-verl-train`` (:mod:`.cli`) and, for stock ``python -m verl.trainer.main_ppo``, by
  the driver hook :mod:`dppo_verl.integrations.driver.ray_runtime_env`;
- again at first use in the worker, for what a worker can see (:mod:`dppo_verl.integrations.actor.engine_flag`).

Binary modes need only the sampled-token log-probs, so they run with most verl options. Top-K modes need the
logits (verl's logits-processor hook) and the rollout's per-token top-K tensors, which several verl paths do not
provide. Every message names the config key to change. Rollout-side rules are in :mod:`.rollout_rules`, the
trainer's (V1 trainer modes, verl's experimental entry points) in :mod:`.trainer_rules`.
"""

from __future__ import annotations

import logging
from typing import Any

from ..knobs import parse_loss_mode, resolve_knobs, weighs_against_mu
from ..contract import CALCULATE_LOG_PROBS, LOSS_MODE, OLD_TOPK_LOGPROBS, POLICY_LOSS, ROLLOUT, ROLLOUT_NUM_TOPK
from .trainer_rules import trainer_rule_violations

__all__ = ["actor_rule_violations", "check_actor_config", "check_config", "select", "TOPK_STRATEGIES"]

logger = logging.getLogger("dppo_verl")
TOPK_STRATEGIES = ("fsdp", "fsdp2", "megatron")
RC = "algorithm.rollout_correction"

# (config key, bad value predicate, why) for Top-K modes.
_TOPK_RULES = (
    ("actor_rollout_ref.model.use_fused_kernels", bool, "fused kernels never materialise the logits the Top-K divergence needs"),
    ("actor_rollout_ref.actor.fsdp_config.pad_to_length", bool, "pad_to_length breaks the hook's row alignment"),
    ("actor_rollout_ref.actor.pad_to_length", bool, "pad_to_length breaks the hook's row alignment"),
    ("actor_rollout_ref.actor.megatron.dynamic_context_parallel", bool, "dynamic CP layouts are not reproduced by the hook"),
    ("distillation.enabled", bool, "top-K distillation uses the same engine hook"),
    (f"{ROLLOUT}.disaggregation.enabled", bool, "prefill/decode disaggregation bypasses the top-K rollout capture"),
    ("actor_rollout_ref.actor.strategy", lambda v: v is not None and v not in TOPK_STRATEGIES, f"Top-K supports the {TOPK_STRATEGIES} engines"),
)


def select(config: Any, key: str, default=None):
    """``OmegaConf.select`` on a DictConfig, a dict or an object with ``.get``."""
    from omegaconf import OmegaConf

    if isinstance(config, dict):
        config = OmegaConf.create(config)
    return OmegaConf.select(config, key, default=default)


def _anchor_rules(config, mode: str, knobs) -> list[str]:
    problems = []
    against_mu = weighs_against_mu(knobs)
    if against_mu and not select(config, CALCULATE_LOG_PROBS, True):
        problems.append(f"{mode} weights every token by min(pi/mu, C) against the rollout log-probs (Eq. 11): set "
                        f"{CALCULATE_LOG_PROBS}=True")
    if knobs.anchor == "old" and select(config, f"{RC}.bypass_mode"):
        problems.append(f"{mode} with policy_loss.anchor=old reads verl's recomputed pi_old, which "
                        f"{RC}.bypass_mode=True skips (old_log_probs := rollout_log_probs): set {RC}.bypass_mode=False")
    if knobs.anchor == "old" and knobs.estimator == "topk" and select(config, "trainer.use_v1", True) is False:
        problems.append(f"{mode} with policy_loss.anchor=old needs verl's V1 trainer (trainer.use_v1=True): the legacy "
                        f"trainer keeps only log-probs and entropy from the pi_old pass, not {OLD_TOPK_LOGPROBS}")
    for key in ("rollout_is", "rollout_rs"):
        value = select(config, f"{RC}.{key}")
        if value is not None and against_mu:
            problems.append(
                f"{mode} already weights every token by min(pi/mu, C) against the rollout (Eq. 11); "
                f"{RC}.{key}={value} would apply verl's pi_old/mu correction on top of it: set {RC}.{key}=null"
            )
    if select(config, f"{RC}.bypass_mode") and select(config, "trainer.use_v1", True) is False:
        problems.append(
            f"{mode}: the legacy trainer (trainer.use_v1=False) with {RC}.bypass_mode=True rewrites "
            f"{LOSS_MODE} to 'bypass_mode', replacing the DPPO loss: set {RC}.bypass_mode=False or trainer.use_v1=True"
        )
    return problems


def _topk_rules(config, mode: str, knobs) -> list[str]:
    problems = [f"{mode} cannot run with {key}={select(config, key)}: {why}"
                for key, bad, why in _TOPK_RULES if bad(select(config, key))]
    if knobs.fused_logprobs:
        problems += _fused_logprob_violations(config, mode)
    k_rollout = select(config, ROLLOUT_NUM_TOPK)
    if k_rollout is None:
        problems.append(
            f"{mode} needs the rollout's top-K log-probs: set +{ROLLOUT_NUM_TOPK}={knobs.num_topk} "
            f"(dppo-verl-train's shorthand actor.policy_loss={mode} sets it for you)"
        )
    elif int(k_rollout) != knobs.num_topk:
        problems.append(
            f"{mode}: the rollout requests K={k_rollout} ({ROLLOUT_NUM_TOPK}) but the loss expects "
            f"K={knobs.num_topk} ({POLICY_LOSS}.num_topk): make them equal"
        )
    return problems


def actor_rule_violations(config: Any) -> list[str]:
    """Every actor/algorithm rule the full verl config (``DictConfig`` or dict) breaks for its DPPO loss mode."""
    mode = select(config, LOSS_MODE)
    parsed = parse_loss_mode(mode)
    if parsed is None:
        return []
    try:
        knobs = resolve_knobs(mode, select(config, POLICY_LOSS, {}))
    except (ValueError, KeyError) as e:
        return [str(e)]
    problems = _anchor_rules(config, mode, knobs) + trainer_rule_violations(config, mode, parsed.is_topk)
    if parsed.is_topk:
        problems += _topk_rules(config, mode, knobs)
    return problems


def _fused_logprob_violations(config: Any, mode: str) -> list[str]:
    """``policy_loss.fused_logprobs`` replaces verl's log-prob pass over the logits with a Triton kernel."""
    import importlib.util

    key = f"{POLICY_LOSS}.fused_logprobs=True"
    problems = []
    if select(config, "actor_rollout_ref.model.use_fused_kernels"):
        problems.append(f"{mode}: {key} reads the logits, which actor_rollout_ref.model.use_fused_kernels=True "
                        "never materialises: set one of them False")
    if importlib.util.find_spec("triton") is None:
        problems.append(f"{mode}: {key} needs the `triton` package (it ships with CUDA builds of torch)")
    return problems


def check_actor_config(config: Any) -> None:
    """Raise one ``ValueError`` listing every violated actor rule (nothing to do for non-DPPO modes)."""
    problems = actor_rule_violations(config)
    if problems:
        raise ValueError("dppo_verl: unsupported configuration:\n  - " + "\n  - ".join(problems))


def check_config(config: Any) -> None:
    """Every launch rule (actor, algorithm, rollout): one ``ValueError`` listing all violations; warnings logged.
    Nothing to do, and nothing read, for a config without a DPPO loss mode."""
    from .rollout_rules import rollout_rule_violations

    if parse_loss_mode(select(config, LOSS_MODE)) is None:
        return
    errors = actor_rule_violations(config)
    rollout_errors, warnings = rollout_rule_violations(config)
    for w in warnings:
        logger.warning("dppo_verl (opted out): %s", w)
    errors += rollout_errors
    if errors:
        raise ValueError("dppo_verl: unsupported configuration:\n  - " + "\n  - ".join(errors))
