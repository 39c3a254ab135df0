"""Optional fused kernels behind ``backend="triton"`` of :mod:`dppo_verl.ops.vocab_parallel`.

Nothing here imports triton at import time: :func:`load_vocab_stats_triton` imports it on first use and says
what to install when it is missing, so the torch paths (the reference and the CPU default) never need it.
"""

from __future__ import annotations

__all__ = ["load_logprob_grad_triton", "load_vocab_stats_triton"]


def _import_triton():
    try:
        import triton  # noqa: F401
    except ImportError as e:
        raise ImportError(
            "vocab_parallel backend='triton' needs the `triton` package (it ships with CUDA builds of torch; "
            "`pip install triton`), or use backend='auto' (torch.compile) / 'eager'"
        ) from e


def load_vocab_stats_triton():
    """The :mod:`.vocab_stats_triton` module (imports triton); ``ImportError`` naming the fix when absent.

    Triton decides between compiling and interpreting when a jit function is defined, its own library
    included: for the CPU interpreter (tests only) ``TRITON_INTERPRET=1`` must be in the environment before
    triton is first imported in the process.
    """
    _import_triton()
    from . import vocab_stats_triton

    return vocab_stats_triton


def load_logprob_grad_triton():
    """The :mod:`.logprob_grad_triton` module (backward of the fused log pi(a_t)); same rules as above."""
    _import_triton()
    from . import logprob_grad_triton

    return logprob_grad_triton
