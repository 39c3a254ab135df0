"""The CPU Megatron patches (dppo_verl.integrations.platform.cpu_megatron): only with the CPU platform asked for,
and each one narrow: CUDA devices map to the CPU in the listed modules only, CUDA type names only inside the
optimizer calls of the same thread, the attention mask exactly causal AND real-key. The engine itself runs in
tests/test_megatron_engine_on_cpu.py."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import torch

PROBE = (
    "import os, sys, torch\n"
    "import verl, verl.workers.engine.megatron.transformer_impl\n"
    "import megatron.core.tensor_parallel.layers as layers\n"
    "from dppo_verl.integrations.patching import APPLIED\n"
    "names = sorted(k for k in APPLIED if k.startswith('platform.cpu_megatron'))\n"
    "print('RESULT', layers.torch is torch, torch.nn.Module.cuda.__name__, len(names),\n"
    "      'platform.cpu_megatron.device@megatron.core.tensor_parallel.layers' in names)\n"
)


def _probe(**env):
    base = {k: v for k, v in os.environ.items() if k not in ("VERL_PLATFORM", "VERL_ENGINE_DEVICE")}
    r = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env={**base, **env}, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return next(line for line in r.stdout.splitlines() if line.startswith("RESULT")).split()[1:]


def test_applied_only_with_the_cpu_platform():
    assert _probe() == ["True", "cuda", "0", "False"]  # not asked for: megatron-core untouched
    same, _, count, layers = _probe(VERL_PLATFORM="cpu")
    assert same == "False" and int(count) > 10 and layers == "True"


def test_cuda_devices_map_to_the_cpu_and_nothing_else():
    from dppo_verl.integrations.platform.cpu_megatron import _cpu_device, _torch_on_cpu

    t = _torch_on_cpu()
    assert t.zeros(2, device="cuda").device.type == "cpu" and t.empty(3, device=0).device.type == "cpu"
    assert t.zeros(2, device=torch.device("cuda", 1)).device.type == "cpu"
    assert t.zeros(2, device="meta").device.type == "meta"  # other devices pass through
    assert t.device("cuda:0") == torch.device("cpu") and t.device("meta") == torch.device("meta")
    assert t.cuda.current_device() == "cpu" and t.Tensor is torch.Tensor and t.float32 is torch.float32
    assert _cpu_device(True) is True and _cpu_device(None) is None


def test_cuda_type_names_only_inside_the_wrapped_call_of_this_thread():
    from dppo_verl.integrations.platform import cpu_megatron as cm

    wrapped_type = cm._wrap_tensor_type(torch._C.TensorBase.type)
    x = torch.zeros(2, dtype=torch.bfloat16)
    inside, other, ready, done = [], [], threading.Event(), threading.Event()

    def optimizer_init():
        inside.append(wrapped_type(x))
        ready.set()
        done.wait(5)

    def elsewhere():
        ready.wait(5)
        other.append(wrapped_type(x))
        done.set()

    threads = [threading.Thread(target=cm._with_cuda_type_names(optimizer_init)), threading.Thread(target=elsewhere)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert inside == ["torch.cuda.BFloat16Tensor"] and other == ["torch.BFloat16Tensor"]
    assert wrapped_type(x) == "torch.BFloat16Tensor" and wrapped_type(x, torch.float32).dtype == torch.float32


def test_module_cuda_only_for_the_mapped_device():
    from dppo_verl.integrations.platform.cpu_megatron import _wrap_module_cuda

    calls = []
    cuda = _wrap_module_cuda(lambda self, device=None: calls.append(device) or self)
    m = torch.nn.Linear(2, 2)
    assert cuda(m, "cpu") is m and calls == []  # what megatron calls with the mapped current_device()
    cuda(m, 0)
    assert calls == [0]  # anything else: the original (which raises without CUDA)


def test_attention_mask_is_causal_and_real_keys():
    from dppo_verl.integrations.platform.cpu_megatron import _wrap_attention

    seen = []
    forward = _wrap_attention(lambda self, q, k, v, mask, *a, **kw: seen.append(mask))
    s, b = 4, 2
    q = torch.zeros(s, b, 1, 8)
    real = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)  # verl's [b, s]: sample 0 padded at the end
    forward(None, q, q, q, real)
    masked = seen[0]  # [b, 1, sq, sk], True = masked
    for bi in range(b):
        for i in range(s):
            for j in range(s):
                assert bool(masked[bi, 0, i, j]) == (j > i or not bool(real[bi, j])), (bi, i, j)
    other = torch.ones(b, 1, s, s, dtype=torch.bool)
    forward(None, q, q, q, other)
    assert seen[1] is other  # a mask already in megatron's form passes through
