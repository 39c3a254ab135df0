"""Entry-point validation shared by the ops: errors name the tensor, its shape and what was wrong."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

__all__ = ["check_shape", "check_finite_logprobs", "check_int_ids"]


def check_shape(name: str, x: torch.Tensor, shape: Sequence[Optional[int]]) -> None:
    """Raise ``ValueError`` unless ``x.shape`` matches ``shape`` (None = any size)."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    ok = x.dim() == len(shape) and all(s is None or s == d for s, d in zip(shape, x.shape))
    if not ok:
        want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        raise ValueError(f"{name} has shape {list(x.shape)}, expected {want}")


def check_finite_logprobs(name: str, x: torch.Tensor, where: Optional[torch.Tensor] = None) -> None:
    """Log-probabilities must be <= 0-ish and not NaN/+inf where ``where`` is True (-inf is a valid p = 0).

    One fused reduction; it syncs with the device once, which entry points (once per micro-batch) can afford.
    """
    bad = torch.isnan(x) | torch.isposinf(x)
    if where is not None:
        bad = bad & where
    if bool(bad.any()):
        idx = bad.nonzero()[0].tolist()
        raise ValueError(f"{name} (shape {list(x.shape)}) has NaN/+inf log-probabilities, first at index {idx}")


def check_int_ids(name: str, ids: torch.Tensor, vocab_size: Optional[int], where: Optional[torch.Tensor] = None):
    """Token ids must be an integer tensor with every (selected) entry in ``[0, vocab_size)``."""
    if ids.dtype not in (torch.int32, torch.int64, torch.int16, torch.uint8):
        raise ValueError(f"{name} must hold integer token ids (int32/int64), got dtype {ids.dtype}")
    if vocab_size is None or ids.numel() == 0:
        return
    out = (ids < 0) | (ids >= vocab_size)
    if where is not None:
        out = out & where
    if bool(out.any()):
        idx = out.nonzero()[0].tolist()
        raise ValueError(
            f"{name} (shape {list(ids.shape)}) has ids outside [0, {vocab_size}): "
            f"{int(ids[tuple(idx)])} at index {idx}"
        )
