"""Fail loudly when the installed verl is not the one this plugin was written against.

verl loads ``verl.plugins`` entry points inside ``try/except`` and logs failures at DEBUG, so an import
error here would vanish; we log at ERROR *and* raise.
"""

from __future__ import annotations

import logging

SUPPORTED_VERL = "0.9"  # major.minor; pinned as verl==0.9.1 in pyproject.toml
PIN = "verl==0.9.1"

logger = logging.getLogger("dppo_verl")


def check_verl_version() -> str:
    try:
        import verl
    except ImportError as e:  # pragma: no cover - verl is a hard dependency
        raise ImportError(f"dppo_verl needs verl ({PIN}): {e}") from e
    version = getattr(verl, "__version__", None)
    if version is None or ".".join(str(version).split(".")[:2]) != SUPPORTED_VERL:
        msg = f"dppo_verl supports verl {SUPPORTED_VERL}.x ({PIN}); the installed verl is {version}. pip install '{PIN}'"
        logger.error(msg)
        raise ImportError(msg)
    return version


# verl internals the integrations rely on (module, attribute). Checked at install so that a verl upgrade fails
# with a message naming the symbol and the version instead of an AttributeError deep inside a Ray worker.
# Modules that would pull in megatron-core or every engine backend are checked when they are first imported.
REQUIRED_SYMBOLS = (
    ("verl.trainer.ppo.core_algos", "register_policy_loss"),
    ("verl.trainer.ppo.core_algos", "POLICY_LOSS_REGISTRY"),
    ("verl.trainer.ppo.core_algos", "agg_loss"),
    ("verl.workers.utils.losses", "ppo_loss"),
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


def require(module, attr: str, version: str | None = None):
    """``getattr(module, attr)`` or an ImportError naming the symbol and the installed verl version."""
    import importlib

    mod = importlib.import_module(module) if isinstance(module, str) else module
    if not hasattr(mod, attr):
        import verl

        msg = (
            f"dppo_verl relies on {mod.__name__}.{attr}, which the installed verl {version or verl.__version__} "
            f"does not have; dppo_verl supports {PIN}"
        )
        logger.error(msg)
        raise ImportError(msg)
    return getattr(mod, attr)


def check_verl_symbols() -> None:
    for module, attr in REQUIRED_SYMBOLS:
        require(module, attr)
