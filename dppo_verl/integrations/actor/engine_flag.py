"""Actor side, verl surface ``verl.workers.engine.base.BaseEngine.train_batch`` (the one implementation every engine
inherits): raise verl's logits-hook flag for Top-K modes, after the first-use checks.

verl 0.9.1's engines call the loss function as a logits processor only when a micro-batch carries the non-tensor
flag ``distillation_use_topk`` (added for on-policy distillation). Side effects of the flag, documented in the
README's support matrix: the Megatron engine calls ``empty_cache()`` before every optimizer step, and dynamic
context parallelism refuses to run.
"""

from __future__ import annotations

import functools

from ...knobs import parse_loss_mode
from ...contract import ROLLOUT_NUM_TOPK, TOPK_KEYS
from ..patching import patch_on_import, raise_if_drifted

__all__ = ["apply_train_batch_topk_flag", "loss_mode_of", "PATCH"]

PATCH = "actor.train_batch_topk_flag"
MODULE = "verl.workers.engine.base"
SIGNATURE = "self, data, loss_function"


def loss_mode_of(loss_function) -> str | None:
    """The ``policy_loss.loss_mode`` bound into verl's ``partial(ppo_loss, config=...)``, or None."""
    config = getattr(loss_function, "keywords", {}).get("config")
    policy_loss = getattr(config, "policy_loss", None)
    return None if policy_loss is None else policy_loss.get("loss_mode", None)


def _refuse_engine_modes(engine, data, mode: str) -> None:
    """First-use twins of the launch-time rules (:mod:`dppo_verl.launch.rules`) that the engine itself can see."""
    from verl.utils import tensordict_utils as tu

    if tu.get_non_tensor_data(data=data, key="distillation_use_topk", default=False):
        raise ValueError(f"{mode} cannot run together with top-K distillation: set distillation.enabled=False")
    if tu.get_non_tensor_data(data=data, key="use_fused_kernels", default=False):
        raise ValueError(f"{mode} needs the logits: set actor_rollout_ref.model.use_fused_kernels=False")
    if getattr(engine, "pad_to_length", False):
        raise ValueError(f"{mode} cannot run with pad_to_length: set actor_rollout_ref.actor.fsdp_config.pad_to_length=False")
    missing = [k for k in TOPK_KEYS if k not in data.keys()]
    if missing:
        raise ValueError(
            f"{mode}: the actor batch lacks {missing}; the rollout must return top-K logprobs "
            f"(+{ROLLOUT_NUM_TOPK}=K, and dppo_verl installed where the rollout servers run). No silent binary run."
        )


def _wrap_train_batch(orig):
    @functools.wraps(orig)
    def train_batch(self, data, loss_function):
        mode = loss_mode_of(loss_function)
        parsed = parse_loss_mode(mode)
        if parsed is not None and parsed.is_topk:
            from verl.utils import tensordict_utils as tu

            raise_if_drifted(("dppo", "topk"), mode)
            _refuse_engine_modes(self, data, mode)
            # Makes both engines call the loss function as a logits processor (verl's OPD hook).
            tu.assign_non_tensor(data, distillation_use_topk=True, distillation_only=False)
        return orig(self, data, loss_function)

    return train_batch


def apply_train_batch_topk_flag() -> None:
    """Wrap ``BaseEngine.train_batch`` when ``verl.workers.engine.base`` is first imported (importing it here would
    load every engine backend, megatron-core included, in every process that imports verl)."""
    patch_on_import(MODULE, "BaseEngine.train_batch", _wrap_train_batch, name=PATCH, signature=SIGNATURE,
                    needed_by="topk")
