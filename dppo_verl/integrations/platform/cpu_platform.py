"""A "cpu" platform for verl 0.9.1, so its FSDP engine (and the trainer around it) runs without an accelerator.

verl resolves every device question (device name, ``torch.<device>`` module, collective backend, Ray resource)
through the platform registry in :mod:`verl.plugin.platform`. It ships CUDA, NPU and ROCm platforms and, on a
machine without any of them, falls back to "nvidia". This module registers a ``"cpu"`` platform through verl's
own plugin API and adds the few small, named patches the FSDP engine still needs on CPU:

* :func:`cpu_platform_requested` - whether the user asked for it: ``VERL_PLATFORM=cpu`` (set by hand, by the
  launcher for ``trainer.device=cpu``, or by the demo). **Nothing here runs unless it was asked for**: on a GPU,
  NPU or ROCm host, and on a CUDA container without ``nvidia-smi``, verl's platform choice is left alone;
* :func:`register_cpu_platform` - register :class:`CPUPlatform` under the name ``"cpu"``;
* :func:`apply_cpu_platform` - register it and select it (replacing the platform verl already resolved in this
  process, if any);
* :func:`apply_gloo_process_group` - verl builds the backend string ``"cpu:gloo,<device>:<backend>"``, which on
  CPU becomes ``"cpu:gloo,cpu:gloo"`` (torch: "Duplicate device type cpu"); use plain ``"gloo"`` instead;
* :func:`apply_engine_device_override` - the FSDP engines are registered for ``cuda``/``npu`` only; verl's own
  ``VERL_ENGINE_DEVICE`` override makes the engine registry look them up as ``cuda``;
* :func:`apply_cpu_support` - all of the above when asked for (what the plugin calls on install).

Every patch goes through :func:`dppo_verl.integrations.patching.patch_attr` (named, recorded, idempotent). Importing
this module changes nothing. Nothing in site-packages is edited; the patches rebind module attributes in this
process only.

Other settings the CPU path needs are configuration, not code: ``attn_implementation=sdpa`` (the default asks for
flash-attention), ``strategy=fsdp2`` (FSDP1 refuses CPU parameters with ``sync_module_states=True``), and
``infer_micro_batch_size_per_gpu`` set.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
import types
from datetime import timedelta
from typing import Any, Optional

import torch
from verl.plugin.platform import PlatformBase, PlatformRegistry, get_platform, platform_manager, set_platform

from ...contract import CPU_PLATFORM, ENV_PLATFORM
from ..patching import APPLIED, patch_attr, record_applied

__all__ = [
    "CPUPlatform",
    "PLATFORM_NAME",
    "apply_cpu_platform",
    "apply_cpu_support",
    "apply_engine_device_override",
    "apply_gloo_process_group",
    "cpu_device_module",
    "cpu_platform_requested",
    "register_cpu_platform",
]

logger = logging.getLogger("dppo_verl")

PLATFORM_NAME = CPU_PLATFORM


def cpu_platform_requested() -> bool:
    """True when this process was asked to run verl on the CPU: ``VERL_PLATFORM=cpu`` (inherited by Ray workers)."""
    return os.environ.get(ENV_PLATFORM, "").strip().lower() == PLATFORM_NAME


# ----------------------------------------------------------------------------------------------------------
# The device module: what verl calls on ``get_torch_device()`` (torch.cuda's API), answered for the CPU.
# ----------------------------------------------------------------------------------------------------------


def _noop(*args, **kwargs) -> None:
    return None


def _zero(*args, **kwargs) -> int:
    return 0


def _mem_get_info(*args, **kwargs) -> tuple[int, int]:
    """``(free, total)`` bytes of host memory, as ``torch.cuda.mem_get_info`` reports device memory."""
    import psutil

    vm = psutil.virtual_memory()
    return int(vm.available), int(vm.total)


def _build_device_module() -> types.ModuleType:
    """A ``torch.cuda``-shaped namespace for the CPU: ``torch.cpu`` plus no-op memory/cache/IPC calls."""
    mod = types.ModuleType("dppo_verl_cpu_device", "torch.cuda-like API for the CPU (memory calls are no-ops)")
    for name in ("Stream", "Event", "StreamContext", "stream", "current_stream", "is_available", "is_initialized"):
        setattr(mod, name, getattr(torch.cpu, name))
    mod.synchronize = _noop  # CPU kernels are synchronous
    mod.current_device = lambda: PLATFORM_NAME
    mod.device_count = lambda: 1
    mod.set_device = _noop
    mod.get_device_name = lambda *a, **k: "cpu"
    for name in ("empty_cache", "ipc_collect", "reset_peak_memory_stats", "reset_max_memory_allocated",
                 "set_per_process_memory_fraction", "manual_seed", "manual_seed_all"):
        setattr(mod, name, _noop)
    for name in ("memory_allocated", "max_memory_allocated", "memory_reserved", "max_memory_reserved"):
        setattr(mod, name, _zero)
    mod.mem_get_info = _mem_get_info
    mod.get_rng_state = lambda *a, **k: torch.get_rng_state()
    mod.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    return mod


@functools.lru_cache(maxsize=None)
def cpu_device_module() -> types.ModuleType:
    """The (cached) device module that :class:`CPUPlatform` hands out as ``get_torch_device()``."""
    return _build_device_module()


# ----------------------------------------------------------------------------------------------------------
# The platform
# ----------------------------------------------------------------------------------------------------------


class CPUPlatform(PlatformBase):
    """verl platform for host CPUs: device ``cpu``, collectives over ``gloo``.

    It reports the Ray resource ``GPU`` (and ``CUDA_VISIBLE_DEVICES``): verl's resource-pool check counts GPU/NPU
    resources only, so a CPU run asks Ray for fake GPUs (``ray_init.num_gpus``). ``is_platform_available`` is
    False so that auto-detection never picks it: it is chosen explicitly (``VERL_PLATFORM=cpu``,
    :func:`apply_cpu_platform`).
    """

    device_name = PLATFORM_NAME
    vendor_name = PLATFORM_NAME

    @property
    def device_module(self) -> types.ModuleType:
        return cpu_device_module()

    def is_available(self) -> bool:
        return True

    def is_platform_available(self, use_smi_check: bool = False) -> bool:
        return False

    def current_device(self) -> str:  # type: ignore[override]
        # A device *string*: verl does ``tensor.to(get_device_id())`` / ``torch.device(get_device_id())``;
        # an int would mean "accelerator 0" and move the model off the CPU.
        return PLATFORM_NAME

    def device_count(self) -> int:
        return 1

    def set_device(self, device_index: int) -> None:
        return None

    def synchronize(self, device_index: Optional[int] = None) -> None:
        return None

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def manual_seed_all(self, seed: int) -> None:
        torch.manual_seed(seed)

    def set_allocator_settings(self, settings: str) -> None:
        return None

    def empty_cache(self) -> None:
        return None

    def get_device_capability(self, device_index: int = 0) -> tuple[Optional[int], Optional[int]]:
        return None, None

    def communication_backend_name(self) -> str:
        return "gloo"

    def visible_devices_envvar(self) -> str:
        return "CUDA_VISIBLE_DEVICES"

    def ray_resource_name(self) -> str:
        return "GPU"

    def ray_resource_options(self, num_gpus: float) -> dict[str, Any]:
        return {"num_gpus": num_gpus}

    def ray_noset_envvars(self) -> list[str]:
        return ["RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"]

    def is_ipc_supported(self) -> bool:
        return False

    @contextlib.contextmanager
    def nvtx_range(self, msg: str):
        yield

    def profiler_start(self) -> None:
        return None

    def profiler_stop(self) -> None:
        return None

    def cudart(self) -> Any:
        return None


def register_cpu_platform() -> type:
    """Register :class:`CPUPlatform` as verl platform ``"cpu"`` (idempotent); returns the class."""
    if PlatformRegistry.get(PLATFORM_NAME) is not CPUPlatform:
        PlatformRegistry.register(platform=PLATFORM_NAME)(CPUPlatform)
    record_applied("platform.cpu.registered", "verl.plugin.platform.PlatformRegistry", "cpu")
    return CPUPlatform


def apply_cpu_platform() -> None:
    """Register the CPU platform and select it: ``VERL_PLATFORM=cpu``, and verl's platform singleton replaced if this
    process already resolved another one. Call only when asked for (:func:`cpu_platform_requested`)."""
    cls = register_cpu_platform()
    os.environ[ENV_PLATFORM] = PLATFORM_NAME
    current = platform_manager._current_platform
    if current is not None and not isinstance(current, cls):
        set_platform(cls())
    record_applied("platform.cpu.selected", "verl.plugin.platform.set_platform", "cpu")


def _cpu_selected() -> bool:
    return get_platform().device_name == PLATFORM_NAME


def _rebind(module, attr: str, new, name: str, signature: str) -> None:
    """``module.attr = new`` there and in every loaded ``verl`` module that imported the original by name."""
    orig = getattr(module, attr)
    patch_attr(module, attr, lambda _orig: new, name=name, signature=signature, needed_by="cpu")
    for mod_name, mod in list(sys.modules.items()):
        if mod is not module and mod_name.startswith("verl.") and getattr(mod, attr, None) is orig:
            patch_attr(mod, attr, lambda _orig: new, name=f"{name}@{mod_name}", signature=signature, needed_by="cpu")


def apply_gloo_process_group() -> None:
    """Make verl's process-group helpers use plain ``gloo`` when the CPU platform is selected (idempotent).

    Patches ``initialize_global_process_group_ray`` (used by ``TrainingWorker``; an explicit, non-duplicate
    ``backend`` argument is honoured) and ``initialize_global_process_group`` (SFT trainer). On other platforms
    the originals run unchanged.
    """
    import verl.utils.distributed as dist_mod

    if APPLIED.get("platform.cpu.gloo_ray") is not None:
        return
    orig_ray = dist_mod.initialize_global_process_group_ray
    orig_global = dist_mod.initialize_global_process_group

    @functools.wraps(orig_ray)
    def initialize_global_process_group_ray(timeout_second=None, backend=None):
        if _cpu_selected() and (backend is None or backend.replace(" ", "") == "cpu:gloo,cpu:gloo"):
            backend = "gloo"
        return orig_ray(timeout_second=timeout_second, backend=backend)

    @functools.wraps(orig_global)
    def initialize_global_process_group(timeout_second=36000):
        if not _cpu_selected():
            return orig_global(timeout_second=timeout_second)
        if not torch.distributed.is_initialized():
            torch.distributed.init_process_group(backend="gloo", timeout=timedelta(seconds=timeout_second),
                                                 init_method=os.environ.get("DIST_INIT_METHOD", None))
        return int(os.environ["LOCAL_RANK"]), int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])

    _rebind(dist_mod, "initialize_global_process_group_ray", initialize_global_process_group_ray,
            "platform.cpu.gloo_ray", "timeout_second=, backend=")
    _rebind(dist_mod, "initialize_global_process_group", initialize_global_process_group,
            "platform.cpu.gloo_global", "timeout_second=")


def apply_engine_device_override() -> None:
    """Set ``VERL_ENGINE_DEVICE=cuda`` (unless set) when the CPU platform is selected (idempotent).

    ``EngineRegistry.get_engine_cls`` looks engines up by device name; FSDP's are registered for cuda/npu only,
    and their code is device-agnostic through the platform, so the cuda registration is the right one on CPU.
    """
    if not _cpu_selected():
        return
    os.environ.setdefault("VERL_ENGINE_DEVICE", "cuda")
    record_applied("platform.cpu.engine_device", "env VERL_ENGINE_DEVICE", "cpu")


def apply_cpu_support() -> bool:
    """When the CPU platform was asked for: register and select it, then apply the engine patches. Returns whether
    it did anything (False, and no change at all, when it was not asked for)."""
    if not cpu_platform_requested():
        return False
    apply_cpu_platform()
    apply_gloo_process_group()
    apply_engine_device_override()
    return True
