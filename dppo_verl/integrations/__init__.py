"""Integrations: one small module per verl surface, each installed by named, idempotent ``apply_*()`` functions.

``APPLIED`` records which patches ran in this process (tests and the launcher's self-check read it).
"""

APPLIED: dict[str, bool] = {}


def mark_applied(name: str) -> bool:
    """Record ``name`` as applied; returns False when it had already been applied (caller should skip)."""
    if APPLIED.get(name):
        return False
    APPLIED[name] = True
    return True
