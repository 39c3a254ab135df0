"""Ahead-of-time compile of a Triton kernel for an H100 (sm_90) without a GPU, shared by the kernel tests.

The interpreter runs plain Python, so code it accepts may still fail in Triton's frontend, LLVM or ptxas (e.g. an
fp32 -> bf16 store); compiling the real kernel here catches that in CI. Skips (with the reason) where this pytest
process interprets kernels, or where the installed triton lacks the compile API or ptxas.
"""

import os

import pytest


def compile_sm90(kernel, signature: dict, constexprs: dict, num_warps: int, monkeypatch, tmp_path):
    """``triton.compile`` of ``kernel`` for ``GPUTarget("cuda", 90, 32)``; returns the compiled object."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("this pytest process runs with TRITON_INTERPRET set")
    triton = pytest.importorskip("triton")
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as e:
        pytest.skip(f"this triton has no ahead-of-time compile API: {e}")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))  # never reuse a cached binary
    src = ASTSource(kernel, signature, constexprs=constexprs)
    try:
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    except RuntimeError as e:
        if "ptxas" in str(e) and "not found" in str(e).lower():
            pytest.skip(f"no ptxas in this triton install: {e}")
        raise
    assert compiled.asm["cubin"], "ptxas produced no sm_90 binary"
    return compiled
