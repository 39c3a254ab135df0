"""Actor side, verl surface ``verl.workers.engine.base.BaseEngine.train_batch`` (the one implementation every engine
inherits): raise verl's logits-hook flag for Top-K modes, and for binary modes whose rollout samples from fewer ids
than the head has (:mod:`.sampled_ids`), after the first-use checks; expose those ids to the hook and the loss.

verl 0.9.1's engines call the loss function as a logits processor only when a micro-batch carries the non-tensor
flag ``distillation_use_topk`` (added for on-policy distillation). Side effects of the flag, documented in the
README's support matrix: the Megatron engine calls ``empty_cache()`` before every optimizer step, and dynamic
context parallelism refuses to run.
"""

from __future__ import annotations

import functools

from ...knobs import parse_loss_mode, resolve_knobs, weighs_against_mu
from ...contract import ROLLOUT_NUM_TOPK, SAMPLED_IDS_KNOB, TOPK_KEYS
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


def _refuse_engine_modes(engine, data, mode: str, needs_topk: bool, why: str) -> None:
    """First-use twins of the launch-time rules (:mod:`dppo_verl.launch.rules`) that the engine itself can see.
    ``why``: what the logits hook is raised for (in the messages)."""
    from verl.utils import tensordict_utils as tu

    if tu.get_non_tensor_data(data=data, key="distillation_use_topk", default=False):
        raise ValueError(f"{mode} cannot run together with top-K distillation: set distillation.enabled=False")
    if tu.get_non_tensor_data(data=data, key="use_fused_kernels", default=False):
        raise ValueError(f"{mode} needs the logits ({why}): set actor_rollout_ref.model.use_fused_kernels=False")
    if getattr(engine, "pad_to_length", False):
        raise ValueError(f"{mode} cannot run with pad_to_length ({why}): set "
                         "actor_rollout_ref.actor.fsdp_config.pad_to_length=False")
    missing = [k for k in TOPK_KEYS if k not in data.keys()] if needs_topk else []
    if missing:
        raise ValueError(
            f"{mode}: the actor batch lacks {missing}; the rollout must return top-K logprobs "
            f"(+{ROLLOUT_NUM_TOPK}=K, and dppo_verl installed where the rollout servers run). No silent binary run."
        )


def _sampled_ids(engine, knobs):
    """The ids the rollout samples from when they are not the whole head and the loss weighs against mu, else None."""
    if not weighs_against_mu(knobs):
        return None  # binary anchor=old: pi against pi_old only, one normalisation already
    from .sampled_ids import sampled_ids_of

    ids = sampled_ids_of(getattr(engine, "model_config", None), knobs.sampled_ids)
    head = getattr(getattr(getattr(engine, "model_config", None), "hf_config", None), "vocab_size", None)
    if head is not None and ids.is_everything(int(head)):
        return None
    return ids


def _wrap_train_batch(orig):
    @functools.wraps(orig)
    def train_batch(self, data, loss_function):
        mode = loss_mode_of(loss_function)
        parsed = parse_loss_mode(mode)
        if parsed is None:
            return orig(self, data, loss_function)
        from verl.utils import tensordict_utils as tu

        from .sampled_ids import sampled_ids_scope

        knobs = resolve_knobs(mode, loss_function.keywords["config"].policy_loss)
        ids = _sampled_ids(self, knobs)
        if parsed.is_topk or ids is not None:
            raise_if_drifted(("dppo", "topk"), mode)
            why = "the Top-K divergence" if parsed.is_topk else f"the mass on ids the rollout never samples, {SAMPLED_IDS_KNOB}"
            _refuse_engine_modes(self, data, mode, parsed.is_topk, why)
            # Makes both engines call the loss function as a logits processor (verl's OPD hook).
            tu.assign_non_tensor(data, distillation_use_topk=True, distillation_only=False)
        with sampled_ids_scope(ids):
            return orig(self, data, loss_function)

    return train_batch


def apply_train_batch_topk_flag() -> None:
    """Wrap ``BaseEngine.train_batch`` when ``verl.workers.engine.base`` is first imported (importing it here would
    load every engine backend, megatron-core included, in every process that imports verl)."""
    patch_on_import(MODULE, "BaseEngine.train_batch", _wrap_train_batch, name=PATCH, signature=SIGNATURE,
                    needed_by="topk")
