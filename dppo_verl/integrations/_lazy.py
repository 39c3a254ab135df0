"""Run a patch when a module is imported, without importing it ourselves (keeps ``import verl`` cheap).

verl loads plugins on ``import verl`` in every process; importing the engine package there would pull in
megatron-core and every engine backend. ``when_imported(name, fn)`` calls ``fn(module)`` right away if the
module is loaded, else right after its first import.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from typing import Callable

__all__ = ["when_imported"]

_PENDING: dict[str, list[Callable]] = {}


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name not in _PENDING:
            return None
        sys.meta_path.remove(self)  # find the real spec without recursing into ourselves
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        exec_module = loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            for fn in _PENDING.pop(name, []):
                fn(module)

        loader.exec_module = exec_and_patch
        return spec


_FINDER = _Finder()


def when_imported(name: str, fn: Callable) -> None:
    if name in sys.modules:
        fn(sys.modules[name])
        return
    _PENDING.setdefault(name, []).append(fn)
    if _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)
