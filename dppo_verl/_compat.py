"""Is the installed verl the one dppo_verl was written against? Answers, never side effects on verl.

verl loads ``verl.plugins`` entry points inside ``try/except`` and logs failures at DEBUG, so a failure here must
not be an exception at import: :mod:`dppo_verl.plugin` records every problem as a drift
(:func:`dppo_verl.integrations.patching.record_drift`, logged at WARNING) and the DPPO modes raise it, naming the
symbol and the installed version, when a run uses them. Runs without a DPPO mode are unaffected.
"""

from __future__ import annotations

import importlib
import logging
import os
from typing import Any, Optional

from .contract import ENV_ANY_VERL, VERL_PIN

PIN = f"verl=={VERL_PIN}"
logger = logging.getLogger("dppo_verl")

# verl internals the integrations rely on beyond the patched functions (module, attribute). Modules that would pull
# in megatron-core or every engine backend are checked when they are first imported (their patches' signatures).
REQUIRED_SYMBOLS = (
    ("verl.trainer.ppo.core_algos", "register_policy_loss"),
    ("verl.trainer.ppo.core_algos", "POLICY_LOSS_REGISTRY"),
    ("verl.trainer.ppo.core_algos", "agg_loss"),
    ("verl.workers.utils.padding", "no_padding_2_padding"),
    ("verl.utils.tensordict_utils", "assign_non_tensor"),
    ("verl.utils.tensordict_utils", "get_non_tensor_data"),
    ("verl.utils.metric", "Metric"),
    ("verl.utils.metric", "AggregationType"),
    ("verl.utils.ulysses", "slice_input_tensor"),
    ("verl.utils.ulysses", "get_ulysses_sequence_parallel_world_size"),
    ("verl.plugin.platform", "PlatformRegistry"),
    ("verl.workers.config", "PolicyLossConfig"),
)


def installed_verl_version() -> Optional[str]:
    try:
        import verl
    except ImportError:
        return None
    return str(getattr(verl, "__version__", None))


def verl_version_problem() -> Optional[str]:
    """None when the installed verl is the pinned one (or ``DPPO_VERL_ALLOW_ANY_VERL=1``); else what is wrong."""
    version = installed_verl_version()
    if version == VERL_PIN:
        return None
    if version is not None and os.environ.get(ENV_ANY_VERL, "") == "1":
        logger.warning("dppo_verl: running on verl %s (supports %s) because %s=1", version, PIN, ENV_ANY_VERL)
        return None
    return (f"dppo_verl supports {PIN}; the installed verl is {version}. pip install '{PIN}' "
            f"(or set {ENV_ANY_VERL}=1 to try this verl at your own risk)")


def missing_symbols() -> list[str]:
    """``module.attr`` names of :data:`REQUIRED_SYMBOLS` the installed verl lacks."""
    missing = []
    for module, attr in REQUIRED_SYMBOLS:
        try:
            mod = importlib.import_module(module)
        except ImportError:
            missing.append(f"{module} (module)")
            continue
        if not hasattr(mod, attr):
            missing.append(f"{module}.{attr}")
    return missing


def require(module: Any, attr: str):
    """``getattr(module, attr)`` or an ImportError naming the symbol and the installed verl version."""
    mod = importlib.import_module(module) if isinstance(module, str) else module
    if not hasattr(mod, attr):
        msg = (f"dppo_verl relies on {mod.__name__}.{attr}, which the installed verl {installed_verl_version()} "
               f"does not have; dppo_verl supports {PIN}")
        logger.error(msg)
        raise ImportError(msg)
    return getattr(mod, attr)
