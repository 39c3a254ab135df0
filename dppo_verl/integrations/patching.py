"""The one way dppo_verl changes verl (or vLLM, SGLang, importlib) at runtime: :func:`patch_attr`.

Every patch is

- **named** (``"actor.ppo_loss"``) and **recorded** in :data:`APPLIED` with its target and outcome;
- **signature-checked**: the target must exist and have the parameter shape the wrapper was written for
  (:func:`param_shape`); otherwise nothing is changed, the drift is recorded, and plain verl runs on untouched.
  The error (symbol, expected and found signature, installed verl) is raised only where a DPPO mode is used
  (:func:`raise_if_drifted`), never in a run that does not use DPPO;
- **idempotent** (a target already wrapped by the same patch is left alone) and **thread-safe** (one lock).

:func:`when_imported` applies a patch right after a module's first import without importing it ourselves
(importing verl's engine package would load megatron-core and every backend in every process).
"""

from __future__ import annotations

import importlib.abc
import inspect
import logging
import sys
import threading
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

__all__ = [
    "APPLIED", "PatchRecord", "PatchDrift", "patch_attr", "patch_on_import", "when_imported", "param_shape",
    "drifted", "raise_if_drifted", "record_applied", "record_drift", "source_has_marker",
]

logger = logging.getLogger("dppo_verl")
_LOCK = threading.RLock()
Signature = Union[str, Sequence[str], None]


@dataclass
class PatchRecord:
    name: str
    target: str  # "verl.workers.utils.losses.ppo_loss"
    needed_by: str  # "dppo" (every DPPO mode), "topk", "fused", "cpu", "demo"
    ok: bool
    detail: str = ""  # the drift message when not ok


APPLIED: dict[str, PatchRecord] = {}


class PatchDrift(RuntimeError):
    """A DPPO mode needs a patch whose verl target is missing or has another signature."""


def _verl_version() -> str:
    mod = sys.modules.get("verl")
    return str(getattr(mod, "__version__", "not imported"))


def param_shape(fn: Callable) -> str:
    """Parameter names and kinds, annotations dropped: ``"self, data, loss_function"``, ``"x, *, y=, **kw"``."""
    parts, star_done = [], False
    for p in inspect.signature(fn).parameters.values():
        if p.kind is p.VAR_POSITIONAL:
            parts.append("*" + p.name)
            star_done = True
        elif p.kind is p.VAR_KEYWORD:
            parts.append("**" + p.name)
        else:
            if p.kind is p.KEYWORD_ONLY and not star_done:
                parts.append("*")
                star_done = True
            parts.append(p.name + ("=" if p.default is not p.empty else ""))
    return ", ".join(parts)


def _check_signature(obj: Any, signature: Signature) -> Optional[str]:
    """None when ``obj`` fits ``signature`` (exact :func:`param_shape`, or a tuple of names it must accept)."""
    if signature is None:
        return None
    if not callable(obj):
        return f"is not callable ({type(obj).__name__})"
    try:
        got = param_shape(obj)
    except (TypeError, ValueError) as e:
        return f"has no inspectable signature ({e})"
    if isinstance(signature, str):
        return None if got == signature else f"has signature ({got}), expected ({signature})"
    names = set(inspect.signature(obj).parameters)
    missing = [n for n in signature if n not in names]
    return f"lacks parameters {missing} (has ({got}))" if missing else None


def record_drift(name: str, target: str, needed_by: str, problem: str, *, detail: Optional[str] = None) -> PatchRecord:
    """Record that patch ``name`` could not be applied; logged once at WARNING (plain verl is unaffected).
    ``detail`` replaces the standard message (symbol, problem, installed verl) where that does not fit."""
    detail = detail or (
        f"dppo_verl patch '{name}': {target} {problem} in the installed verl {_verl_version()} "
        f"(dppo_verl supports verl=={_pin()}). Runs without a DPPO loss mode are unaffected; "
        f"DPPO modes that need it are disabled.")
    rec = PatchRecord(name, target, needed_by, ok=False, detail=detail)
    with _LOCK:
        if name not in APPLIED or APPLIED[name].ok:
            logger.warning(detail)
        APPLIED[name] = rec
    return rec


def record_applied(name: str, target: str, needed_by: str) -> None:
    """Record a change made through a host's own API (a registry entry, an environment variable), not a patch."""
    with _LOCK:
        APPLIED[name] = PatchRecord(name, target, needed_by, ok=True)


def _pin() -> str:
    from ..contract import VERL_PIN

    return VERL_PIN


def patch_attr(owner: Any, attr: str, wrap: Callable[[Any], Any], *, name: str, signature: Signature,
               needed_by: str = "dppo", target: Optional[str] = None) -> bool:
    """Replace ``owner.attr`` by ``wrap(owner.attr)`` once. Returns False (and records the drift) when the
    target is missing or does not fit ``signature``; True when patched now or already."""
    where = target or f"{_owner_name(owner)}.{attr}"
    with _LOCK:
        if not hasattr(owner, attr):
            record_drift(name, where, needed_by, "does not exist")
            return False
        orig = getattr(owner, attr)
        mark = getattr(orig, "dppo_patch", None)
        if mark is not None and (mark == name or (name in APPLIED and APPLIED[name].ok)):
            return True  # ours already (applied twice, or the same wrapper rebound elsewhere)
        problem = _check_signature(orig, signature)
        if problem is not None:
            record_drift(name, where, needed_by, problem)
            return False
        new = wrap(orig)
        if new is orig:  # the wrapper stood aside (e.g. verl already carries a patches/ diff)
            APPLIED[name] = PatchRecord(name, where, needed_by, ok=True, detail="stood aside")
            return True
        if getattr(new, "dppo_patch", None) is None:  # not a wrapper that is already marked (a rebinding)
            try:
                new.dppo_wrapped, new.dppo_patch = orig, name
            except (AttributeError, TypeError):  # a plain value (a flag), not a function
                pass
        setattr(owner, attr, new)
        APPLIED[name] = PatchRecord(name, where, needed_by, ok=True)
        return True


def _owner_name(owner: Any) -> str:
    if inspect.ismodule(owner):
        return owner.__name__
    cls = owner if inspect.isclass(owner) else type(owner)
    return f"{cls.__module__}.{cls.__qualname__}"


def _resolve(module: Any, path: str) -> tuple[Any, str]:
    """``(owner, leaf)`` of a dotted attribute path inside a module (``"Cls.method"``)."""
    *owners, leaf = path.split(".")
    obj = module
    for part in owners:
        obj = getattr(obj, part, None)
        if obj is None:
            return None, leaf
    return obj, leaf


def patch_on_import(module_name: str, path: str, wrap: Callable[[Any], Any], *, name: str, signature: Signature,
                    needed_by: str = "dppo") -> None:
    """:func:`patch_attr` on ``module_name``'s ``path`` (``"Cls.method"`` or ``"function"``) once it is imported."""

    def apply(module) -> None:
        owner, leaf = _resolve(module, path)
        target = f"{module_name}.{path}"
        if owner is None:
            record_drift(name, target, needed_by, "does not exist")
            return
        patch_attr(owner, leaf, wrap, name=name, signature=signature, needed_by=needed_by, target=target)

    when_imported(module_name, apply)


def drifted(needed_by: Sequence[str]) -> list[PatchRecord]:
    """The patches of these kinds that could not be applied in this process."""
    with _LOCK:
        return [r for r in APPLIED.values() if not r.ok and r.needed_by in needed_by]


def raise_if_drifted(needed_by: Sequence[str], what: str) -> None:
    """Raise :class:`PatchDrift` naming every drifted patch ``what`` (e.g. a loss mode) depends on."""
    bad = drifted(needed_by)
    if bad:
        raise PatchDrift(f"{what} cannot run:\n  - " + "\n  - ".join(r.detail for r in bad))


def source_has_marker(fn: Any, marker: str) -> bool:
    """True when ``fn``'s source text contains ``marker`` (a patches/ diff); False when there is no source."""
    try:
        return marker in inspect.getsource(fn)
    except (OSError, TypeError):
        return False


# --- import hook ---------------------------------------------------------------------------------------------

_PENDING: dict[str, list[Callable]] = {}


class _Finder(importlib.abc.MetaPathFinder):
    """Finds nothing itself: asks the finders after it, then wraps the loader to run the pending patches.

    It never edits ``sys.meta_path`` while searching (other threads may be importing), and skips itself by
    identity instead of recursing."""

    def find_spec(self, name, path=None, target=None):
        with _LOCK:
            if name not in _PENDING:
                return None
        for finder in list(sys.meta_path):
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            with _LOCK:
                fns = _PENDING.pop(name, [])
            for fn in fns:
                fn(module)

        spec.loader.exec_module = exec_and_patch
        return spec


_FINDER = _Finder()


def when_imported(name: str, fn: Callable[[Any], None]) -> None:
    """Call ``fn(module)`` now if ``name`` is imported, else right after its first import."""
    with _LOCK:
        module = sys.modules.get(name)
        if module is None:
            _PENDING.setdefault(name, []).append(fn)
            if _FINDER not in sys.meta_path:
                sys.meta_path.insert(0, _FINDER)
            return
    fn(module)
