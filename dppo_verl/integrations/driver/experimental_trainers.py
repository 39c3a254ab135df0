"""Single controller, verl surface
``verl.experimental.separation.ray_trainer.SeparateRayPPOTrainer._init_resource_pools``: the trainer rules for verl's experimental entry points, again at first use.

``fully_async_main`` and ``one_step_off_policy.main_ppo`` call verl's ``run_ppo``, so the driver hook
(:mod:`.ray_runtime_env`) refuses a DPPO config they cannot run before Ray starts. ``run_ppo`` skips that hook when
Ray is already up (``ray.is_initialized()``), so their trainers check again. Both trainers (``FullyAsyncTrainer``, a
Ray actor, and ``OneStepOffRayTrainer``) subclass verl's ``SeparateRayPPOTrainer`` without calling its constructor,
and override ``init_workers``; the first thing either ``init_workers`` does is the base class's
``_init_resource_pools``, before any worker exists. That is the hook: for DPPO modes only,
:func:`dppo_verl.launch.trainer_rules.trainer_rule_violations` with the entry point named by the trainer class.
"""

from __future__ import annotations

import functools

from ...contract import LOSS_MODE
from ...knobs import parse_loss_mode
from ..patching import patch_on_import

__all__ = ["apply_experimental_trainer_rules", "ENTRY_OF_TRAINER", "MODULE"]

MODULE = "verl.experimental.separation.ray_trainer"
_FULLY = "verl.experimental.fully_async_policy.fully_async_main"
_ONE_STEP = "verl.experimental.one_step_off_policy.main_ppo"
ENTRY_OF_TRAINER = {"FullyAsyncTrainer": _FULLY, "FullyAsyncRollouter": _FULLY, "OneStepOffRayTrainer": _ONE_STEP}


def check_trainer(trainer) -> None:
    """Raise for a DPPO mode the experimental trainer ``trainer`` (a ``SeparateRayPPOTrainer``) cannot run."""
    from omegaconf import OmegaConf

    config = trainer.config
    mode = OmegaConf.select(config, LOSS_MODE, default=None)
    parsed = parse_loss_mode(mode)
    if parsed is None:
        return
    from ...launch.trainer_rules import experimental_entry_point, trainer_rule_violations

    name = type(trainer).__name__
    entry = ENTRY_OF_TRAINER.get(name) or experimental_entry_point(config) or f"{MODULE} ({name})"
    problems = trainer_rule_violations(config, mode, parsed.is_topk, entry=entry)
    if problems:
        raise ValueError("dppo_verl: unsupported configuration:\n  - " + "\n  - ".join(problems))


def _wrap(orig):
    @functools.wraps(orig)
    def _init_resource_pools(self):
        check_trainer(self)
        return orig(self)

    return _init_resource_pools


def apply_experimental_trainer_rules() -> None:
    """Wrap ``SeparateRayPPOTrainer._init_resource_pools`` when its module is imported (idempotent)."""
    patch_on_import(MODULE, "SeparateRayPPOTrainer._init_resource_pools", _wrap, name="driver.experimental_trainers",
                    signature="self", needed_by="dppo")
