"""An injected training-inference mismatch for ``make study``: the rollout engine runs slightly different weights.

``DPPO_ROLLOUT_WEIGHT_NOISE=sigma`` (read in the vLLM worker process) makes every weight sync from the trainer load
``w + sigma * rms(w) * eps_name`` into vLLM instead of ``w``, where ``eps_name ~ N(0, 1)`` is drawn once per tensor
name from a fixed seed. The engine therefore samples from, and reports log-probs of, a consistently biased copy
of the policy (think of a quantised or differently-fused inference engine); the trainer keeps the true weights,
so mu != pi by an amount set with ``sigma``. The rollout's reported log-probs stay those of the policy it sampled
from, which is what DPPO's anchor assumes.

Loaded into verl's processes with ``VERL_USE_EXTERNAL_MODULES=...,dppo_verl.demo.perturb``; it patches
``vLLMColocateWorkerExtension._update_weights`` (the only door weights take into vLLM, verl 0.9.1
``workers/rollout/vllm_rollout/utils.py``) when that module is imported, and does nothing when the variable is
unset or 0. Never meant for real training.
"""

from __future__ import annotations

import logging
import os
import zlib

import torch

from ..integrations.patching import patch_on_import

__all__ = ["ENV", "PATCH", "noisy_weights", "apply_rollout_weight_noise"]

ENV = "DPPO_ROLLOUT_WEIGHT_NOISE"
PATCH = "demo.rollout_weight_noise"
_TARGET = "verl.workers.rollout.vllm_rollout.utils"
logger = logging.getLogger(__name__)


def noisy_weights(weights, sigma: float, seed: int = 0):
    """``[(name, w)] -> [(name, w + sigma * rms(w) * eps_name)]`` (new tensors; the inputs may be views into a
    reused transfer buffer). Integer tensors pass through; the noise is drawn in fp32 and cast back."""
    out = []
    for name, w in weights:
        if not torch.is_floating_point(w) or sigma == 0.0:
            out.append((name, w))
            continue
        gen = torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        w32 = w.detach().float()
        rms = w32.pow(2).mean().sqrt()
        eps = torch.randn(w.shape, generator=gen, dtype=torch.float32)
        out.append((name, (w32 + sigma * rms * eps.to(w32.device)).to(w.dtype)))
    return out


def _wrap(original):
    def _update_weights(self, weights, peft_config, base_sync_done):
        sigma = float(os.environ.get(ENV, "0") or 0)
        if sigma > 0 and not (peft_config and base_sync_done):
            weights = noisy_weights(list(weights), sigma)
        return original(self, weights, peft_config, base_sync_done)

    logger.warning("dppo_verl.demo.perturb: rollout weights get relative noise %s=%s", ENV, os.environ.get(ENV))
    return _update_weights


def apply_rollout_weight_noise() -> None:
    """Patch vLLM's weight loading (see module docstring) when ``DPPO_ROLLOUT_WEIGHT_NOISE`` is > 0."""
    if float(os.environ.get(ENV, "0") or 0) > 0:
        patch_on_import(_TARGET, "vLLMColocateWorkerExtension._update_weights", _wrap, name=PATCH,
                        signature="self, weights, peft_config, base_sync_done", needed_by="demo")


apply_rollout_weight_noise()
