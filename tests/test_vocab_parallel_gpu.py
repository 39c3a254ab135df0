"""GPU check of the vocab-parallel op (compiled and eager backends) against the dense fp64 reference.

Runs only where CUDA is available (never in CI); speed lives in benchmarks/bench_vocab_parallel.py --device cuda.
"""

import pytest
import torch

import reference as ref
from dppo_verl.ops.vocab_parallel import vocab_parallel_logprobs

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CPU coverage: test_vocab_parallel_on_cpu.py)"),
]


@pytest.mark.parametrize("backend", ["compile", "eager"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_matches_fp64_reference(backend, dtype):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(512, 151936, generator=g) * 4).to(dtype)
    ids = torch.randint(0, 151936, (512, 21), generator=g)
    got = vocab_parallel_logprobs(logits.cuda(), ids.cuda(), backend=backend).cpu().double()
    want = ref.logprobs_at(logits, ids)
    lse = torch.logsumexp(logits.double(), -1, keepdim=True).abs()
    assert bool(((got - want).abs() <= 1e-5 + torch.finfo(torch.float32).eps * lse).all())
