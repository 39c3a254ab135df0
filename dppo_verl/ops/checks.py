"""Entry-point validation shared by the ops: errors name the tensor, its shape, the first bad index and value.

Device reads are the cost that matters (each ``bool(t)`` / ``.item()`` / ``.tolist()`` waits for the device):
:class:`DeferredChecks` computes every validation flag on the device and reads them back together, once; only when
a flag is set does it read more (the first bad index and value) to build the message.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

__all__ = [
    "DeferredChecks", "check_shape", "check_finite_logprobs", "check_int_ids", "check_int_dtype",
    "nonfinite_logprob_flags", "id_range_flags",
]


def check_shape(name: str, x: torch.Tensor, shape: Sequence[Optional[int]]) -> None:
    """Raise ``ValueError`` unless ``x.shape`` matches ``shape`` (None = any size). Host-only (no device read)."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    ok = x.dim() == len(shape) and all(s is None or s == d for s, d in zip(shape, x.shape))
    if not ok:
        want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        raise ValueError(f"{name} has shape {list(x.shape)}, expected {want}")


def check_int_dtype(name: str, ids: torch.Tensor) -> None:
    """Host-only: token ids must be an integer tensor."""
    if ids.dtype not in (torch.int32, torch.int64, torch.int16, torch.uint8):
        raise ValueError(f"{name} must hold integer token ids (int32/int64), got dtype {ids.dtype}")


class DeferredChecks:
    """Validation flags gathered on the device and read back with ONE host sync.

    ``add(bad, describe)``: ``bad`` is a bool tensor of any shape (True = a violation); ``describe(index)`` builds
    the message from the first bad index (it may read the device: it runs on the error path only). :meth:`run`
    raises for the first added check that fails, so add them in order of precedence (e.g. NaN before range).
    """

    def __init__(self) -> None:
        self._items: list[tuple[torch.Tensor, Callable[[list[int]], str]]] = []

    def add(self, bad: torch.Tensor, describe: Callable[[list[int]], str]) -> None:
        self._items.append((bad, describe))

    def extend(self, other: "DeferredChecks") -> None:
        """Take over ``other``'s queued checks (after this one's: precedence is kept)."""
        self._items.extend(other._items)
        other._items = []

    def __len__(self) -> int:
        return len(self._items)

    def run(self) -> None:
        self.read(None)

    def read(self, values: Optional[torch.Tensor]) -> list[float]:
        """Read every flag and ``values`` (a 1-D float tensor, e.g. stacked metrics) in ONE device read; raise for
        the first check that fails, else return ``values`` as a list (``[]`` for None)."""
        dev = values.device if values is not None else (self._items[0][0].device if self._items else None)
        # All flags in one reduction (one `any` over their concatenation, not one per flag: ~20 small ops fewer
        # per micro-batch); which check failed is sorted out on the error path only.
        parts = [torch.cat([bad.reshape(-1).to(dev) for bad, _ in self._items]).any().reshape(1).float()] \
            if self._items else []
        if values is not None:
            parts.append(values.float())
        if not parts:
            return []
        got = torch.cat(parts).tolist()  # the one device read
        n_flags = 1 if self._items else 0
        failed, rest = got[:n_flags], got[n_flags:]
        if any(failed):
            for bad, describe in self._items:
                if bool(bad.any()):
                    raise ValueError(describe(bad.nonzero()[0].tolist()))
        return rest


def nonfinite_logprob_flags(checks: DeferredChecks, name: str, x: torch.Tensor,
                            where: Optional[torch.Tensor] = None) -> None:
    """Queue: log-probabilities must not be NaN or +inf where ``where`` is True (-inf is a valid p = 0)."""
    bad = torch.isnan(x) | torch.isposinf(x)
    if where is not None:
        bad = bad & where
    checks.add(bad, lambda idx: f"{name} (shape {list(x.shape)}) has NaN/+inf log-probabilities, first at index "
                                f"{idx}: {x[tuple(idx)].item()}")


def id_range_flags(checks: DeferredChecks, name: str, ids: torch.Tensor, vocab_size: Optional[int],
                   where: Optional[torch.Tensor] = None) -> None:
    """Queue: every (selected) id must lie in ``[0, vocab_size)`` (nothing is queued when vocab_size is None)."""
    check_int_dtype(name, ids)
    if vocab_size is None or ids.numel() == 0:
        return
    out = (ids < 0) | (ids >= vocab_size)
    if where is not None:
        out = out & where
    checks.add(out, lambda idx: f"{name} (shape {list(ids.shape)}) has ids outside [0, {vocab_size}): "
                                f"{int(ids[tuple(idx)])} at index {idx}")


def check_finite_logprobs(name: str, x: torch.Tensor, where: Optional[torch.Tensor] = None) -> None:
    """Log-probabilities must not be NaN/+inf where ``where`` is True (-inf is a valid p = 0). One device read."""
    checks = DeferredChecks()
    nonfinite_logprob_flags(checks, name, x, where)
    checks.run()


def check_int_ids(name: str, ids: torch.Tensor, vocab_size: Optional[int], where: Optional[torch.Tensor] = None):
    """Token ids must be an integer tensor with every (selected) entry in ``[0, vocab_size)``. One device read."""
    checks = DeferredChecks()
    id_range_flags(checks, name, ids, vocab_size, where)
    checks.run()
