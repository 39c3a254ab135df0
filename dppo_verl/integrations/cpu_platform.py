"""A "cpu" platform for verl 0.9.1, so its FSDP engine (and the trainer around it) runs without an accelerator.

verl resolves every device question (device name, ``torch.<device>`` module, collective backend, Ray resource)
through the platform registry in :mod:`verl.plugin.platform`. It ships CUDA, NPU and ROCm platforms and, on a
machine without any of them, falls back to "nvidia". This module registers a ``"cpu"`` platform through verl's
own plugin API and adds the few small, named patches the FSDP engine still needs on CPU:

* :func:`register_cpu_platform` - register :class:`CPUPlatform` under the name ``"cpu"`` (no selection);
* :func:`apply_cpu_platform` - register it and, only when this host has no CUDA GPU (or ``force=True``),
  select it: ``VERL_PLATFORM=cpu`` (inherited by Ray workers) and, if verl already resolved another platform
  in this process, :func:`verl.plugin.platform.set_platform`;
* :func:`apply_gloo_process_group` - verl builds the backend string ``"cpu:gloo,<device>:<backend>"``, which on
  CPU becomes ``"cpu:gloo,cpu:gloo"`` (torch: "Duplicate device type cpu"); use plain ``"gloo"`` instead;
* :func:`apply_engine_device_override` - the FSDP engines are registered for ``cuda``/``npu`` only; verl's own
  ``VERL_ENGINE_DEVICE`` override makes the engine registry look them up as ``cuda``;
* :func:`apply_cpu_support` - all of the above, in order (what a CPU test or launcher calls).

Every function is idempotent and records itself in :data:`dppo_verl.integrations.APPLIED`. Importing this module
changes nothing; on a CUDA host :func:`apply_cpu_support` only registers the platform (never selects it). Nothing in
site-packages is edited; the patches rebind module attributes in this process only.

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

from . import mark_applied

__all__ = [
    "CPUPlatform",
    "PLATFORM_NAME",
    "apply_cpu_platform",
    "apply_cpu_support",
    "apply_engine_device_override",
    "apply_gloo_process_group",
    "cpu_device_module",
    "has_cuda_gpu",
    "register_cpu_platform",
]

logger = logging.getLogger("dppo_verl")

PLATFORM_NAME = "cpu"


def has_cuda_gpu() -> bool:
    """True when this host has a CUDA GPU: visible to torch here, or an ``nvidia-smi`` that works.

    The second test matters in CPU-only Ray actors of a GPU cluster, where ``torch.cuda.is_available()`` is
    False although the workers will have GPUs; there the CPU platform must not be selected.
    """
    if torch.cuda.is_available():
        return True
    return torch.version.cuda is not None and PlatformBase.check_smi_command("nvidia-smi")


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
    mark_applied("cpu_platform_registered")
    if PlatformRegistry.get(PLATFORM_NAME) is not CPUPlatform:
        PlatformRegistry.register(platform=PLATFORM_NAME)(CPUPlatform)
    return CPUPlatform


def apply_cpu_platform(force: bool = False) -> bool:
    """Register the CPU platform and select it when there is no CUDA GPU (or ``force``). Returns whether selected.

    Selection sets ``VERL_PLATFORM=cpu`` unless the user already set ``VERL_PLATFORM`` (then theirs wins), and
    replaces verl's platform singleton if this process already resolved a different one.
    """
    cls = register_cpu_platform()
    if not force and has_cuda_gpu():
        return False
    requested = os.environ.get("VERL_PLATFORM", "").strip().lower()
    if requested and requested != PLATFORM_NAME:
        logger.info("dppo_verl: VERL_PLATFORM=%s set by the user; not selecting the CPU platform", requested)
        return False
    os.environ["VERL_PLATFORM"] = PLATFORM_NAME
    current = platform_manager._current_platform
    if current is not None and not isinstance(current, cls):
        set_platform(cls())
    mark_applied("cpu_platform")
    return True


def _cpu_selected() -> bool:
    return get_platform().device_name == PLATFORM_NAME


def _rebind(module_name: str, attr: str, old, new) -> None:
    """Set ``module.attr = new`` there and in every loaded ``verl`` module that imported ``old`` by name."""
    setattr(sys.modules[module_name], attr, new)
    for name, mod in list(sys.modules.items()):
        if (name == "verl" or name.startswith("verl.")) and mod is not None and getattr(mod, attr, None) is old:
            setattr(mod, attr, new)


def apply_gloo_process_group() -> None:
    """Make verl's process-group helpers use plain ``gloo`` when the CPU platform is selected (idempotent).

    Patches ``initialize_global_process_group_ray`` (used by ``TrainingWorker``; an explicit, non-duplicate
    ``backend`` argument is honoured) and ``initialize_global_process_group`` (SFT trainer). On other platforms
    the originals run unchanged.
    """
    if not mark_applied("gloo_process_group"):
        return
    import verl.utils.distributed as dist_mod

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

    _rebind(dist_mod.__name__, "initialize_global_process_group_ray", orig_ray, initialize_global_process_group_ray)
    _rebind(dist_mod.__name__, "initialize_global_process_group", orig_global, initialize_global_process_group)


def apply_engine_device_override() -> None:
    """Set ``VERL_ENGINE_DEVICE=cuda`` (unless set) when the CPU platform is selected (idempotent).

    ``EngineRegistry.get_engine_cls`` looks engines up by device name; FSDP's are registered for cuda/npu only,
    and their code is device-agnostic through the platform, so the cuda registration is the right one on CPU.
    """
    if not _cpu_selected() or not mark_applied("engine_device_override"):
        return
    os.environ.setdefault("VERL_ENGINE_DEVICE", "cuda")


def apply_cpu_support(force: bool = False) -> bool:
    """Register/select the CPU platform and, if selected, apply the engine patches. Returns whether selected."""
    selected = apply_cpu_platform(force=force)
    if selected:
        apply_gloo_process_group()
        apply_engine_device_override()
    return selected
