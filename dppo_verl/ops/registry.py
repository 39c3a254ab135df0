"""One named-registry mechanism for the divergences (:mod:`.divergence`) and the loss shapes (:mod:`.shapes`).

It refuses a taken name (verl's own registry silently overwrites; we do not), lists the valid names on a bad
lookup, and tells listeners about every entry, past and future: that is how the loss layer registers
``<shape>_<divergence>_<estimator>`` modes in verl without these pure-torch modules knowing about verl.
"""

from __future__ import annotations

from typing import Callable, Generic, TypeVar

__all__ = ["NamedRegistry"]

T = TypeVar("T")  # an entry with ``.fn`` (named in the duplicate error)


class NamedRegistry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind  # "divergence", "loss shape": the word in every error message
        self._items: dict[str, T] = {}
        self._listeners: list[Callable[[T], None]] = []

    def add(self, name: str, item: T) -> None:
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} is already registered (by {self._items[name].fn.__qualname__})")
        self._items[name] = item
        for listener in list(self._listeners):
            listener(item)

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise KeyError(f"unknown {self.kind} {name!r}; registered: {sorted(self._items)}") from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def listen(self, listener: Callable[[T], None]) -> None:
        """Call ``listener(item)`` for every entry registered so far and every one registered later."""
        self._listeners.append(listener)
        for item in list(self._items.values()):
            listener(item)
