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
