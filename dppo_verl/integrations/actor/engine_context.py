"""Actor side, verl surfaces ``FSDPEngineWithLMHead.prepare_model_outputs`` and
``MegatronEngineWithLMHead._lm_head_logits_processor``: what the engine knows when it calls our logits processor.

verl hands the processor the logits and the micro-batch, but not two things the Top-K hook needs:

- verl's **labels** (the sampled tokens as the engine's log-prob pass sees them), for the opt-in fused hand-off
  (:mod:`.fused_logprob`);
- the Megatron **row layout**: which padding and context-parallel split ``gptmodel_forward_model_engine`` applied
  to the logits (:class:`MegatronLayout`, read by :mod:`.layout`): ``forced_max_seqlen`` (BSHD micro-batches are
  padded to the *mini-batch* maximum under verl's default ``pad_bshd_to_minibatch_max=True``), FP8 padding, the CP
  layout, the dynamic-CP size and the length bucket, each taken exactly where verl's ``forward_step`` takes it.

Each wrapper exposes them in a :class:`EngineCall` for the duration of that one engine call (a ``ContextVar``:
concurrent micro-batches never mix) and runs the exit hooks registered with :func:`on_exit`. Inert for every mode
that does not call our processor.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Optional

import torch

from ..patching import patch_on_import

__all__ = ["EngineCall", "MegatronLayout", "apply_engine_context", "current_call", "on_exit"]

FSDP_MODULE = "verl.workers.engine.fsdp.transformer_impl"
MEGATRON_MODULE = "verl.workers.engine.megatron.transformer_impl"


class MegatronLayout(NamedTuple):
    """The arguments ``gptmodel_forward_model_engine`` gives verl's ``preprocess_{thd,bshd}_engine``."""

    use_fp8_padding: bool = False
    cp_layout: str = "zigzag"
    local_cp_size: Optional[int] = None
    forced_max_seqlen: Optional[int] = None
    pad_to_length_bucket: Optional[int] = None  # verl refuses it with the logits hook (top-K flag): always None here


@dataclass
class EngineCall:
    labels: Optional[torch.Tensor] = None
    megatron: Optional[MegatronLayout] = None
    parked: list = field(default_factory=list)  # the fused hand-off's result, taken by the engine's log-prob pass


_CALL: contextvars.ContextVar[Optional[EngineCall]] = contextvars.ContextVar("dppo_engine_call", default=None)
_EXIT_HOOKS: list[Callable[[EngineCall], None]] = []


def current_call() -> Optional[EngineCall]:
    return _CALL.get()


def on_exit(hook: Callable[[EngineCall], None]) -> None:
    """Run ``hook(call)`` when each engine call ends (e.g. to report a fused result nobody took)."""
    if hook not in _EXIT_HOOKS:
        _EXIT_HOOKS.append(hook)


@contextlib.contextmanager
def _engine_call(call: EngineCall):
    token = _CALL.set(call)
    try:
        yield call
    finally:
        _CALL.reset(token)
        for hook in _EXIT_HOOKS:
            hook(call)


def megatron_layout(engine, batch) -> MegatronLayout:
    """What verl 0.9.1's ``MegatronEngineWithLMHead.forward_step`` passes to the forward function for ``batch``."""
    from verl.utils import tensordict_utils as tu

    fp8, cp_layout = None, "zigzag"
    modules = getattr(engine, "module", None)
    if modules:
        from megatron.core.utils import unwrap_model

        unwrapped = unwrap_model(modules[-1])  # the chunk with the output layer (post_process)
        fp8 = getattr(unwrapped.config, "fp8", None)
        cp_layout = type(engine)._get_context_parallel_layout(unwrapped)
    return MegatronLayout(
        use_fp8_padding=fp8 in ("e4m3", "hybrid"),
        cp_layout=cp_layout,
        local_cp_size=tu.get_non_tensor_data(data=batch, key="local_cp_size", default=None),
        forced_max_seqlen=tu.get_non_tensor_data(data=batch, key="forced_max_seqlen", default=None),
    )


def _wrap_fsdp_outputs(orig):
    @functools.wraps(orig)
    def prepare_model_outputs(self, output, output_args, micro_batch, logits_processor_func):
        with _engine_call(EngineCall(labels=output_args.get("input_ids_rmpad_rolled"))):
            return orig(self, output, output_args, micro_batch, logits_processor_func)

    return prepare_model_outputs


def _wrap_megatron_head(orig):
    @functools.wraps(orig)
    def _lm_head_logits_processor(self, logits, label, temperature, **kwargs):
        layout = megatron_layout(self, kwargs["batch"]) if kwargs.get("distillation_use_topk") else None
        with _engine_call(EngineCall(labels=label, megatron=layout)):
            return orig(self, logits, label, temperature, **kwargs)

    return _lm_head_logits_processor


def apply_engine_context() -> None:
    """Wrap both engines' logits paths when each engine module is first imported (importing them here would load
    megatron-core in every process)."""
    patch_on_import(FSDP_MODULE, "FSDPEngineWithLMHead.prepare_model_outputs", _wrap_fsdp_outputs,
                    name="actor.engine_context.fsdp", needed_by="fused",
                    signature="self, output, output_args, micro_batch, logits_processor_func")
    patch_on_import(MEGATRON_MODULE, "MegatronEngineWithLMHead._lm_head_logits_processor", _wrap_megatron_head,
                    name="actor.engine_context.megatron", needed_by="topk",
                    signature="self, logits, label, temperature, *, calculate_sum_pi_squared, calculate_entropy, "
                              "distillation_use_topk, distillation_only, logits_processor_func, batch, data_format")
