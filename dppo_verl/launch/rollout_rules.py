"""Rollout-side rules: mu must be the engine's *full-vocabulary* sampling distribution.

With top-p / top-k / min-p sampling or a repetition penalty the engine renormalises over a truncated or
reshaped set, so its log-probs (the anchor mu of every DPPO mode) are biased against the trainer's
full-vocabulary pi; "raw" logprobs ignore temperature. Top-K modes also need K logprobs per token, which vLLM
caps at ``max_logprobs`` (20 by default), and K at most the model's vocabulary (read here from a local model
folder; a hub id is checked by the rollout server at its first request). One function, called by the launcher
before any worker starts.

Opt-out for the truncation rules (you accept a biased ratio and divergence):
``+actor_rollout_ref.rollout.custom.dppo_allow_truncated_sampling=True`` turns those errors into warnings.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Optional

from ..knobs import parse_loss_mode, resolve_knobs
from ..contract import (
    ALLOW_TRUNCATED_SAMPLING, LOSS_MODE, MODEL_PATH, POLICY_LOSS, ROLLOUT, ROLLOUT_NUM_TOPK, SAMPLED_IDS_KNOB,
)
from ..integrations.rollout.topk_arrays import k_vocabulary_problem
from .rules import select as _select

__all__ = ["rollout_rule_violations", "check_rollout_config", "OPT_OUT_KEY", "agent_loops_in_use", "model_vocab_size"]

logger = logging.getLogger("dppo_verl")
R = ROLLOUT
OPT_OUT_KEY = ALLOW_TRUNCATED_SAMPLING
VLLM_DEFAULT_MAX_LOGPROBS = 20
# Agent loops whose Top-K data path is tested: one turn, or verl's tool agent (every turn's rows, rollout/tool_agent.py)
TOPK_AGENT_LOOPS = ("single_turn_agent", "tool_agent")


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
    parsed = parse_loss_mode(_select(config, LOSS_MODE))
    if parsed is None:
        return [], []
    truncation = _truncation_problems(config)
    opted_out = bool(_select(config, OPT_OUT_KEY, False))
    errors = [] if opted_out else [p + f" (or accept the bias: +{OPT_OUT_KEY}=True)" for p in truncation]
    warnings = truncation if opted_out else []
    if parsed.is_topk:
        errors += _multi_turn_problems(config, _select(config, LOSS_MODE))
    if parsed.is_topk and _select(config, f"{R}.name") in (None, "vllm"):
        k = _select(config, ROLLOUT_NUM_TOPK)
        cap = _select(config, f"{R}.engine_kwargs.vllm.max_logprobs", VLLM_DEFAULT_MAX_LOGPROBS)
        if k is not None and int(k) > int(cap):
            errors.append(
                f"{ROLLOUT_NUM_TOPK}={k} exceeds vLLM's max_logprobs={cap}: "
                f"set +{R}.engine_kwargs.vllm.max_logprobs={k}"
            )
    if parsed.is_topk and _select(config, ROLLOUT_NUM_TOPK) is not None:
        path = _select(config, MODEL_PATH)
        problem = k_vocabulary_problem(int(_select(config, ROLLOUT_NUM_TOPK)), model_vocab_size(path),
                                       f"vocab_size in {path}/config.json")
        errors += [problem] if problem else []
    errors += _sglang_problems(config)
    return errors, warnings


def model_vocab_size(path: Any) -> Optional[int]:
    """``vocab_size`` of a local HF model folder's ``config.json`` (or its ``text_config``); None when the path is
    not a local folder (a hub id: the rollout server checks again at its first request)."""
    cfg_path = os.path.join(os.path.expanduser(str(path)), "config.json") if path else ""
    if not os.path.isfile(cfg_path):
        return None
    with open(cfg_path) as f:
        cfg = json.load(f)
    vocab = cfg.get("vocab_size", (cfg.get("text_config") or {}).get("vocab_size"))
    return None if vocab is None else int(vocab)


def agent_loops_in_use(config) -> set[str]:
    """The agent loops verl will run, found the way verl selects them: the ``agent_name`` column of the training and
    validation data (per sample), else ``rollout.agent.default_agent_loop``. Files that cannot be read here (a remote
    path, a format other than parquet) contribute the default only; the worker checks again at first use."""
    default = _select(config, f"{R}.agent.default_agent_loop", "single_turn_agent") or "single_turn_agent"
    found = {default}
    for key in ("data.train_files", "data.val_files"):
        files = _select(config, key)
        for path in ([files] if isinstance(files, str) else list(files or [])):
            found |= _agent_names_in(str(path), default)
    return found


def _agent_names_in(path: str, default: str) -> set[str]:
    if not path.endswith(".parquet") or not os.path.isfile(path):
        return set()
    try:
        import pyarrow.parquet as pq
    except ImportError:  # pragma: no cover - verl depends on pyarrow
        return set()
    if "agent_name" not in pq.read_schema(path).names:
        return set()
    column = pq.read_table(path, columns=["agent_name"]).column("agent_name").to_pylist()
    return {default if v is None else str(v) for v in column}


def _multi_turn_problems(config, mode: str) -> list[str]:
    other = sorted(a for a in agent_loops_in_use(config) if a not in TOPK_AGENT_LOOPS)
    if not other:
        return []
    return [f"{mode}: the agent loops {other} (data column agent_name / {R}.agent.default_agent_loop) are not among "
            f"those whose rollout top-K is carried across turns {list(TOPK_AGENT_LOOPS)} (a multi-turn loop may keep "
            "some turns' top-K only, e.g. the first turn's extra_fields); use a binary mode (dppo_tv_binary) or one "
            "of those loops"]


def _sglang_problems(config) -> list[str]:
    """SGLang reports log-probs after temperature unless SGLANG_RETURN_ORIGINAL_LOGPROB is set (then of the raw
    logits): with temperature != 1 that mu is not the sampling distribution. Read from the launcher's
    environment, which Ray passes on to the rollout servers it starts here. And verl 0.9.1's SGLang server masks no
    head rows (unlike its vLLM server): mu is normalised over every row, so pi must be too (``sampled_ids=all``)."""
    if _select(config, f"{R}.name") != "sglang":
        return []
    problems = []
    flag = os.environ.get("SGLANG_RETURN_ORIGINAL_LOGPROB", "").strip().lower() in ("1", "true", "yes")
    temperature = float(_select(config, f"{R}.temperature", 1.0) or 1.0)
    if flag and temperature != 1.0:
        problems.append(f"SGLANG_RETURN_ORIGINAL_LOGPROB is set, so SGLang returns log-probs before temperature "
                        f"({R}.temperature={temperature}): unset it for DPPO")
    mode = _select(config, LOSS_MODE)
    knobs = resolve_knobs(mode, _select(config, POLICY_LOSS) or {})
    if knobs.anchor == "rollout" and knobs.sampled_ids != "all":
        problems.append(f"{mode}: verl's SGLang server samples from every row of the model's head (it masks none, "
                        f"unlike its vLLM server), so the trainer's pi must be normalised over every row too: set "
                        f"{SAMPLED_IDS_KNOB}=all (dppo-verl-train sets it for rollout.name=sglang)")
    return problems


def check_rollout_config(config: Any) -> None:
    """Rollout rules alone (:func:`dppo_verl.launch.rules.check_config` runs every rule)."""
    errors, warnings = rollout_rule_violations(config)
    for w in warnings:
        logger.warning("dppo_verl (opted out): %s", w)
    if errors:
        raise ValueError("dppo_verl: unsupported rollout configuration:\n  - " + "\n  - ".join(errors))
