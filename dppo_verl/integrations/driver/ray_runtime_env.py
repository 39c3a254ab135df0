"""Driver side, verl surface ``verl.trainer.constants_ppo.get_ppo_ray_runtime_env``: validate a DPPO run before Ray.

Stock ``python -m verl.trainer.main_ppo`` runs as ``__main__``, so no import hook on ``verl.trainer.main_ppo`` ever
fires. ``run_ppo`` calls ``get_ppo_ray_runtime_env(config)`` right before ``ray.init`` (and ``main_ppo`` imports it
by name after ``import verl`` has loaded this plugin), so wrapping it lets the driver, for DPPO modes only:

1. run every launch rule (:func:`dppo_verl.launch.rules.check_config`) and refuse a bad config before any Ray
   process exists, naming the key to set;
2. refuse when a patch a DPPO mode depends on drifted in this process (verl version, missing symbols);
3. add to the workers' environment the driver's dppo_verl version (every node compares it with its own) and, when
   the CPU platform was asked for here, ``VERL_PLATFORM=cpu``.

For every other loss mode the original runs alone and its result is returned untouched.
"""

from __future__ import annotations

import functools
import os

from ...knobs import parse_loss_mode
from ...contract import CPU_PLATFORM, ENV_DRIVER_VERSION, ENV_PLATFORM, LOSS_MODE
from ..patching import patch_on_import, raise_if_drifted

__all__ = ["apply_driver_validation", "PATCH"]

PATCH = "driver.ray_runtime_env"
MODULE = "verl.trainer.constants_ppo"


def _wrap(orig):
    @functools.wraps(orig)
    def get_ppo_ray_runtime_env(config=None):
        runtime_env = orig(config)
        if config is None:
            return runtime_env
        from omegaconf import OmegaConf

        mode = OmegaConf.select(config, LOSS_MODE, default=None)
        parsed = parse_loss_mode(mode)
        if parsed is None:
            return runtime_env
        from ... import __version__
        from ...launch.rules import check_config

        raise_if_drifted(("dppo", "topk") if parsed.is_topk else ("dppo",), mode)
        check_config(config)
        env = runtime_env.setdefault("env_vars", {})
        env[ENV_DRIVER_VERSION] = __version__
        if os.environ.get(ENV_PLATFORM, "").strip().lower() == CPU_PLATFORM:
            env[ENV_PLATFORM] = CPU_PLATFORM
        return runtime_env

    return get_ppo_ray_runtime_env


def apply_driver_validation() -> None:
    """Wrap ``get_ppo_ray_runtime_env`` when ``verl.trainer.constants_ppo`` is first imported (by ``main_ppo``)."""
    patch_on_import(MODULE, "get_ppo_ray_runtime_env", _wrap, name=PATCH, signature="config=", needed_by="dppo")
