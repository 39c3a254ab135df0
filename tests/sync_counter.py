"""Count device-to-host synchronisations made by dppo_verl's code (verl's and torch's own excluded).

A sync is any op whose result the host must wait for: the explicit reads (``.item()``, ``bool(t)``, ``.tolist()``,
``int(t)``, ``.cpu()``: aten ``_local_scalar_dense`` / a device-to-host copy) and the implicit ones (boolean-mask
indexing and ``nonzero`` / ``masked_select``, ``repeat_interleave`` without ``output_size``, ``unique``: ops whose
output shape depends on the data). On CPU nothing actually waits, but the same ops stall a GPU stream, so they are
counted the same way here. An op counts when the innermost Python frame outside torch belongs to ``dppo_verl``
(verl calling torch is verl's sync, not ours). Shared by tests and ``benchmarks/bench_actor_step.py``.
"""

from __future__ import annotations

import os
import sys
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["SyncCounter", "SYNC_OPS"]

# aten ops that need the host to see device data (explicit reads, data-dependent output shapes)
SYNC_OPS = {
    "_local_scalar_dense", "nonzero", "nonzero_static", "masked_select", "unique", "_unique", "_unique2",
    "unique_consecutive", "unique_dim", "is_nonzero", "equal",
}
_TORCH = os.path.dirname(torch.__file__)


def _ours(depth: int = 2) -> str | None:
    """``file:line`` of the innermost non-torch frame if it is dppo_verl's, else None."""
    frame = sys._getframe(depth)
    while frame is not None:
        path = frame.f_code.co_filename
        if not path.startswith(_TORCH) and "sync_counter" not in path:
            return f"{os.path.basename(path)}:{frame.f_lineno}" if f"{os.sep}dppo_verl{os.sep}" in path else None
        frame = frame.f_back
    return None


class SyncCounter(TorchDispatchMode):
    """``with SyncCounter() as c: ...`` then ``c.total`` and ``c.where`` (a Counter of ``file:line``)."""

    def __init__(self):
        super().__init__()
        self.where: Counter = Counter()
        self._tolist = None

    def __enter__(self):
        # Tensor.tolist reads device memory without an aten op the dispatch mode would see
        self._tolist = orig = torch.Tensor.tolist
        counter = self

        def tolist(t, *a, **k):
            where = _ours(depth=1)
            if where is not None:
                counter.where[f"tolist @ {where}"] += 1
            return orig(t, *a, **k)

        torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        sync = name in SYNC_OPS
        if name == "index" or name == "index_put_" or name == "index_put":  # boolean-mask indexing
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            sync = any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ())
        elif name == "repeat_interleave":
            sync = kwargs.get("output_size") is None and not (len(args) > 2 and args[2] is not None) \
                and isinstance(args[0], torch.Tensor) and args[0].dim() == 1 and len(args) < 3
        elif name in ("_to_copy", "copy_"):  # device -> host copy (a GPU tensor to cpu)
            src = args[0] if name == "_to_copy" else args[1]
            dst_dev = kwargs.get("device") if name == "_to_copy" else args[0].device
            sync = isinstance(src, torch.Tensor) and src.device.type != "cpu" and str(dst_dev) == "cpu"
        if sync:
            where = _ours()
            if where is not None:
                self.where[f"{name} @ {where}"] += 1
        return func(*args, **kwargs)

    @property
    def total(self) -> int:
        return sum(self.where.values())
