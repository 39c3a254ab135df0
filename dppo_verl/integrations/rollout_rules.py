"""Rollout-side rules: mu must be the engine's *full-vocabulary* sampling distribution.

With top-p / top-k / min-p sampling or a repetition penalty the engine renormalises over a truncated or
reshaped set, so its log-probs (the anchor mu of every DPPO mode) are biased against the trainer's
full-vocabulary pi; "raw" logprobs ignore temperature. Top-K modes also need K logprobs per token, which vLLM
caps at ``max_logprobs`` (20 by default). One function, called by the launcher before any worker starts.

Opt-out for the truncation rules (you accept a biased ratio and divergence):
``+actor_rollout_ref.rollout.custom.dppo_allow_truncated_sampling=True`` turns those errors into warnings.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from ..config import parse_loss_mode
from .rules import _select

__all__ = ["rollout_rule_violations", "check_rollout_config", "OPT_OUT_KEY"]

logger = logging.getLogger("dppo_verl")
R = "actor_rollout_ref.rollout"
OPT_OUT_KEY = f"{R}.custom.dppo_allow_truncated_sampling"
VLLM_DEFAULT_MAX_LOGPROBS = 20


def _truncation_problems(config) -> list[str]:
    checks = (
        (f"{R}.top_p", lambda v: v is not None and float(v) < 1.0, "1.0"),
        (f"{R}.top_k", lambda v: v is not None and int(v) > 0, "-1"),
        (f"{R}.min_p", lambda v: v is not None and float(v) > 0.0, "0.0"),
        (f"{R}.repetition_penalty", lambda v: v is not None and float(v) != 1.0, "1.0"),
        (f"{R}.logprobs_mode", lambda v: v not in (None, "processed_logprobs"), "processed_logprobs"),
    )
    return [
        f"{key}={_select(config, key)} makes the rollout log-probs (mu) differ from the full-vocabulary sampling "
        f"distribution the trainer's pi is compared with; set {key}={ok}"
        for key, bad, ok in checks
        if bad(_select(config, key))
    ]


def rollout_rule_violations(config: Any) -> tuple[list[str], list[str]]:
    """``(errors, warnings)`` for the rollout settings of a DPPO run (empty for other loss modes)."""
    parsed = parse_loss_mode(_select(config, "actor_rollout_ref.actor.policy_loss.loss_mode"))
    if parsed is None:
        return [], []
    truncation = _truncation_problems(config)
    opted_out = bool(_select(config, OPT_OUT_KEY, False))
    errors = [] if opted_out else [p + f" (or accept the bias: +{OPT_OUT_KEY}=True)" for p in truncation]
    warnings = truncation if opted_out else []
    if parsed[1] == "topk" and _select(config, f"{R}.name") in (None, "vllm"):
        k = _select(config, f"{R}.custom.dppo_num_topk")
        cap = _select(config, f"{R}.engine_kwargs.vllm.max_logprobs", VLLM_DEFAULT_MAX_LOGPROBS)
        if k is not None and int(k) > int(cap):
            errors.append(
                f"{R}.custom.dppo_num_topk={k} exceeds vLLM's max_logprobs={cap}: "
                f"set +{R}.engine_kwargs.vllm.max_logprobs={k}"
            )
    errors += _sglang_problems(config)
    return errors, warnings


def _sglang_problems(config) -> list[str]:
    """SGLang reports log-probs after temperature unless SGLANG_RETURN_ORIGINAL_LOGPROB is set (then of the raw
    logits): with temperature != 1 that mu is not the sampling distribution. Read from the launcher's
    environment, which Ray passes on to the rollout servers it starts here."""
    if _select(config, f"{R}.name") != "sglang":
        return []
    flag = os.environ.get("SGLANG_RETURN_ORIGINAL_LOGPROB", "").strip().lower() in ("1", "true", "yes")
    temperature = float(_select(config, f"{R}.temperature", 1.0) or 1.0)
    if flag and temperature != 1.0:
        return [f"SGLANG_RETURN_ORIGINAL_LOGPROB is set, so SGLang returns log-probs before temperature "
                f"({R}.temperature={temperature}): unset it for DPPO"]
    return []


def check_rollout_config(config: Any) -> None:
    errors, warnings = rollout_rule_violations(config)
    for w in warnings:
        logger.warning("dppo_verl (opted out): %s", w)
    if errors:
        raise ValueError("dppo_verl: unsupported rollout configuration:\n  - " + "\n  - ".join(errors))
