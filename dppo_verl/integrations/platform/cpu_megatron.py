"""verl 0.9.1's Megatron engine (megatron-core 0.16.1, vanilla mbridge 0.15.1) on the CPU platform, over gloo.

Applied only when the CPU platform was asked for (``VERL_PLATFORM=cpu``), lazily: each patch when verl, megatron-core
or mbridge first imports the module it touches. Every patch goes through
:func:`dppo_verl.integrations.patching.patch_attr` (named ``platform.cpu_megatron.*``, recorded, idempotent). On any
other platform nothing here runs. What each one answers (the failure seen without it):

- ``rng``: megatron's RNG tracker keeps *CUDA* generator states (``model_parallel_cuda_manual_seed`` ->
  ``torch.cuda.get_rng_state``: "Torch not compiled with CUDA enabled"); its state getters/setters use the CPU
  generator instead.
- ``device``: megatron-core and mbridge allocate on ``torch.cuda.current_device()`` / ``device="cuda"`` and call
  ``.cuda()`` in ~60 places (model placement, grad buffers, TP gathers, grad norm). There is no device hook in
  megatron-core, so the listed modules (:data:`CUDA_MODULES`, and only those) see a ``torch`` whose factory functions
  map a CUDA device to the CPU and whose ``torch.cuda`` answers the few calls they make on the CPU; everything else
  passes through to the real ``torch``. ``nn.Module.cuda("cpu")`` (what they call with that device) becomes
  ``.to("cpu")``; any other argument goes to the original. This is the broad patch of the set: confined to these
  modules, to this platform, and tested (tests/test_cpu_megatron_on_cpu.py).
- ``type_names``: the distributed optimizer and ``clip_grad_by_total_norm_fp32`` dispatch on
  ``param.type() == "torch.cuda.BFloat16Tensor"`` (else "Wrapped parameters must be one of torch.cuda.FloatTensor,
  ..."). ``Tensor.type()`` answers the CUDA name for a CPU tensor only while one of those calls runs in the *same
  thread* (a thread-local depth, so other threads never see it).
- ``local_spec``: mbridge and verl ask for Transformer Engine layer specs (``TENorm`` is CUDA-only): megatron-core's
  local spec instead (torch norms, ``ColumnParallelLinear``, ``DotProductAttention``).
- ``weight_names``: mbridge's HF<->mcore name map assumes TE's fused norm names (``linear_qkv.layer_norm_weight``);
  the local spec's ``input_layernorm.weight`` / ``pre_mlp_layernorm.weight`` are translated (load and export).
- ``attention_mask``: verl's BSHD path passes a TE-style ``[b, s]`` "real token" mask; the local
  ``DotProductAttention`` wants ``[b, 1, sq, sk]`` with True = masked: causal AND padded-key, built from it.

The config a CPU Megatron actor needs is :func:`cpu_megatron_overrides` (one function for the demo and the tests).
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import types

from ...contract import CPU_PLATFORM, ENV_PLATFORM
from ..patching import patch_attr, patch_on_import, when_imported

__all__ = ["CUDA_MODULES", "apply_cpu_megatron", "cpu_megatron_overrides"]

P = "platform.cpu_megatron"
ENGINE_MODULE = "verl.workers.engine.megatron.transformer_impl"
# The modules of megatron-core / mbridge / verl's mcore code that allocate on CUDA in the paths verl's Megatron
# engine runs (model build, forward/backward, DDP grad buffers, distributed optimizer, grad norm, weight export).
CUDA_MODULES = (
    "megatron.core.tensor_parallel.layers", "megatron.core.tensor_parallel.mappings",
    "megatron.core.tensor_parallel.random", "megatron.core.tensor_parallel.utils",
    "megatron.core.tensor_parallel.cross_entropy", "megatron.core.tensor_parallel.data",
    "megatron.core.distributed.param_and_grad_buffer", "megatron.core.distributed.distributed_data_parallel",
    "megatron.core.distributed.finalize_model_grads", "megatron.core.optimizer",
    "megatron.core.optimizer.optimizer", "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.distrib_optimizer", "megatron.core.optimizer.grad_scaler",
    "megatron.core.transformer.module", "megatron.core.transformer.attention",
    "megatron.core.transformer.dot_product_attention", "megatron.core.transformer.transformer_block",
    "megatron.core.transformer.transformer_layer", "megatron.core.models.gpt.gpt_model",
    "megatron.core.models.common.embeddings.rotary_pos_embedding", "megatron.core.pipeline_parallel.schedules",
    "megatron.core.utils", "megatron.core.fusions.fused_softmax", "mbridge.core.util", "mbridge.core.bridge",
    "mbridge.core.llm_bridge",
)


# --- device ------------------------------------------------------------------------------------------------------


def _cpu_device(dev):
    """A CUDA device (``"cuda"``, ``"cuda:1"``, an index, ``torch.device("cuda")``) -> the CPU; anything else as is."""
    import torch

    if isinstance(dev, bool):
        return dev
    if isinstance(dev, int) or (isinstance(dev, str) and dev.startswith("cuda")):
        return "cpu"
    if isinstance(dev, torch.device) and dev.type == "cuda":
        return torch.device("cpu")
    return dev


_FACTORIES = ("tensor", "zeros", "empty", "ones", "full", "arange", "zeros_like", "empty_like", "ones_like",
              "full_like", "randn", "rand", "as_tensor", "randint")


@functools.lru_cache(maxsize=None)
def _torch_on_cpu() -> types.ModuleType:
    """The ``torch`` the modules of :data:`CUDA_MODULES` see (one object, built once)."""
    import torch

    cuda = types.ModuleType("torch.cuda (dppo_verl: on the CPU)")
    cuda.__getattr__ = lambda name: getattr(torch.cuda, name)
    cuda.current_device = lambda: "cpu"
    cuda.is_available = lambda: False
    cuda.device_count = lambda: 0
    cuda.synchronize = cuda.empty_cache = lambda *a, **k: None
    cuda.manual_seed = lambda seed: torch.manual_seed(seed)  # one generator serves "CUDA" and CPU randomness
    cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    cuda.memory_allocated = cuda.max_memory_allocated = cuda.memory_reserved = lambda *a, **k: 0
    cuda.nvtx = types.SimpleNamespace(range_push=lambda *a, **k: None, range_pop=lambda *a, **k: None,
                                      range=lambda *a, **k: contextlib.nullcontext())
    cuda.current_stream = lambda *a, **k: types.SimpleNamespace(wait_stream=lambda *a, **k: None,
                                                               synchronize=lambda: None)
    proxy = types.ModuleType("torch (dppo_verl: CUDA devices mapped to the CPU)")
    proxy.__getattr__ = lambda name: getattr(torch, name)
    proxy.cuda = cuda

    def on_cpu(fn):
        @functools.wraps(fn)
        def factory(*args, **kwargs):
            if "device" in kwargs:
                kwargs["device"] = _cpu_device(kwargs["device"])
            return fn(*args, **kwargs)

        return factory

    for name in _FACTORIES:
        setattr(proxy, name, on_cpu(getattr(torch, name)))

    def device(*args, **kwargs):
        if args and (isinstance(args[0], int) or (isinstance(args[0], str) and args[0].startswith("cuda"))):
            return torch.device("cpu")
        return torch.device(*args, **kwargs)

    proxy.device = device
    return proxy


def _use_torch_on_cpu(module) -> None:
    import torch

    if getattr(module, "torch", None) is torch:
        patch_attr(module, "torch", lambda _torch: _torch_on_cpu(), name=f"{P}.device@{module.__name__}",
                   signature=None, needed_by="cpu")


def _wrap_module_cuda(orig):
    @functools.wraps(orig)
    def cuda(self, device=None):
        if str(device) == "cpu":  # the mapped current_device(): never a valid argument of the real .cuda()
            return self.to("cpu")
        return orig(self, device)

    return cuda


# --- type names --------------------------------------------------------------------------------------------------

_CUDA_NAMES = threading.local()


def _wrap_tensor_type(orig):
    def type_(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs and getattr(_CUDA_NAMES, "depth", 0) and self.device.type == "cpu":
            return orig(self).replace("torch.", "torch.cuda.", 1)
        return orig(self, dtype, non_blocking, **kwargs)

    return type_


def _with_cuda_type_names(orig):
    @functools.wraps(orig)
    def call(*args, **kwargs):
        _CUDA_NAMES.depth = getattr(_CUDA_NAMES, "depth", 0) + 1
        try:
            return orig(*args, **kwargs)
        finally:
            _CUDA_NAMES.depth -= 1

    return call


# --- layer spec, weight names, attention mask -----------------------------------------------------------------------


def _local_decoder_spec(orig):
    @functools.wraps(orig)
    def get_gpt_decoder_block_spec(config, use_transformer_engine=True, *args, **kwargs):
        return orig(config, False, *args, **kwargs)  # TE is CUDA-only: megatron-core's local spec

    return get_gpt_decoder_block_spec


_LOCAL_TO_TE = (("input_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight"),
                ("pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight"))


def _wrap_name_map(orig):
    @functools.wraps(orig)
    def _weight_name_mapping_mcore_to_hf(self, mcore_weights_name):
        for local, te in _LOCAL_TO_TE:
            if ".layers." in mcore_weights_name and mcore_weights_name.endswith(local):
                mcore_weights_name = mcore_weights_name[: -len(local)] + te
                break
        return orig(self, mcore_weights_name)

    return _weight_name_mapping_mcore_to_hf


def _wrap_attention(orig):
    @functools.wraps(orig)
    def forward(self, query, key, value, attention_mask, *args, **kwargs):
        import torch

        if attention_mask is not None and attention_mask.dim() == 2 and attention_mask.dtype == torch.bool:
            sq, sk = query.size(0), key.size(0)  # [s, b, h, d]
            causal = torch.ones(sq, sk, dtype=torch.bool, device=query.device).tril(sk - sq)
            attention_mask = ~(causal[None, None] & attention_mask[:, None, None, :])  # [b, 1, sq, sk], True = masked
        return orig(self, query, key, value, attention_mask, *args, **kwargs)

    return forward


def _cpu_rng(module) -> None:
    import torch

    patch_attr(module, "_get_cuda_rng_state", lambda _o: (lambda *a, **k: torch.get_rng_state()),
               name=f"{P}.rng.get", signature="device=, clone=, graph_safe=", needed_by="cpu")
    patch_attr(module, "_set_cuda_rng_state", lambda _o: (lambda new_state, *a, **k: torch.set_rng_state(new_state)),
               name=f"{P}.rng.set", signature="new_state, device=, graph_safe=", needed_by="cpu")


def _apply_all(_engine_module=None) -> None:
    import torch

    patch_attr(torch.nn.Module, "cuda", _wrap_module_cuda, name=f"{P}.module_cuda", signature="self, device=",
               needed_by="cpu")
    patch_attr(torch.Tensor, "type", _wrap_tensor_type, name=f"{P}.type_names", signature=None, needed_by="cpu")
    for name in CUDA_MODULES:
        when_imported(name, _use_torch_on_cpu)
    when_imported("megatron.core.tensor_parallel.random", _cpu_rng)
    for module, path in (("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer.__init__"),
                         ("megatron.core.optimizer.optimizer", "Float16OptimizerWithFloat16Params.__init__"),
                         ("megatron.core.optimizer.clip_grads", "clip_grad_by_total_norm_fp32"),
                         ("megatron.core.optimizer.optimizer", "clip_grad_by_total_norm_fp32")):
        patch_on_import(module, path, _with_cuda_type_names, name=f"{P}.type_names@{module}.{path}", signature=None,
                        needed_by="cpu")
    for module in ("mbridge.core.llm_bridge", "verl.models.mcore.model_initializer"):
        patch_on_import(module, "get_gpt_decoder_block_spec", _local_decoder_spec, name=f"{P}.local_spec@{module}",
                        signature=("config", "use_transformer_engine"), needed_by="cpu")
    patch_on_import("mbridge.core.bridge", "Bridge._weight_name_mapping_mcore_to_hf", _wrap_name_map,
                    name=f"{P}.weight_names", signature="self, mcore_weights_name", needed_by="cpu")
    patch_on_import("megatron.core.transformer.dot_product_attention", "DotProductAttention.forward", _wrap_attention,
                    name=f"{P}.attention_mask", signature=("query", "key", "value", "attention_mask"), needed_by="cpu")


def apply_cpu_megatron() -> bool:
    """When the CPU platform was asked for: apply everything above once verl's Megatron engine module is imported.
    Returns whether it was asked for."""
    if os.environ.get(ENV_PLATFORM, "").strip().lower() != CPU_PLATFORM:  # cpu_platform_requested(), verl-free
        return False
    when_imported(ENGINE_MODULE, _apply_all)
    return True


def cpu_megatron_overrides(prefix: str = "actor_rollout_ref.actor") -> list[str]:
    """Hydra overrides a verl Megatron actor needs on the CPU (``prefix`` = the actor's config node).

    Each line answers a failure seen without it; THD packing, sequence parallelism, context parallelism, TE fusions
    and FP8 need Transformer Engine or CUDA kernels and stay GPU-only.
    """
    m = f"{prefix}.megatron"
    t = f"{m}.override_transformer_config"
    return [
        f"{m}.vanilla_mbridge=True",  # Megatron-Bridge is not installed here; mbridge is
        f"{m}.use_remove_padding=False",  # THD packing: "Packed sequence is not supported by DotProductAttention"
        "actor_rollout_ref.model.use_remove_padding=False",  # the same, for verl's model-side switch
        f"{t}.attention_backend=local",  # no flash / TE attention on the CPU
        f"+{t}.use_cpu_initialization=True",  # initialise weights on the host
        f"+{t}.masked_softmax_fusion=False",  # CUDA kernels, all of these
        f"+{t}.bias_activation_fusion=False",
        f"+{t}.gradient_accumulation_fusion=False",
        f"+{t}.apply_rope_fusion=False",
        f"+{t}.persist_layer_norm=False",
        f"+{t}.sequence_parallel=False",  # mbridge sets SP = (tp > 1); the local spec's torch norms refuse SP
        f"{m}.sequence_parallel=False",
    ]
