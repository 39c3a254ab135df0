"""Carry the rollout top-K from the rollout server into verl 0.9.1's V1 batch.

The rollout server (vLLM / SGLang integration) puts ``rollout_topk_ids`` / ``rollout_topk_logprobs`` (numpy
``[G, K]`` over the G generated tokens) into ``TokenOutput.extra_fields``; verl's agent loops forward
``extra_fields`` into ``AgentLoopOutput``, and the V1 trainer turns each sample into tensors with
``AgentLoopOutput.as_dict`` (its only caller). We wrap ``as_dict`` to pop the two arrays, align them with the
response (mask-0 tokens inserted by the agent loop get id 0 / -inf rows, see
:func:`.rollout_topk.align_to_response`) and emit int32 / fp32 ``[R, K]`` tensors next to ``rollout_log_probs``;
verl stacks them into ``[B, R, K]`` (jagged when lengths differ), which the actor hook reads.

Two more places see per-sample fields: V1's synthetic padding samples (``construct_minimal_padding_template``
copies every field of a real sample, then shrinks the response to 1 token: we shrink the top-K to ``[1, K]``
of id 0 / -inf too), and the legacy trainer (``trainer.use_v1=false``), whose ``AgentLoopWorker._postprocess``
concatenates padded ``[1, T]`` rows: we pop the arrays there and add padded ``[B, T, K]`` tensors to the batch.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from . import mark_applied
from ._lazy import when_imported
from .topk_hook import TOPK_KEYS

__all__ = ["apply_agent_loop_output_patch", "apply_legacy_agent_loop_patch"]

MODULE = "verl.experimental.agent_loop.agent_loop"
PADDING_MODULE = "verl.trainer.ppo.padding_utils"


def _wrap_as_dict(orig):
    @functools.wraps(orig)
    def as_dict(self):
        output = orig(self)
        found = _pop_topk(output.get("extra_fields") or {})
        if found is None:
            return output
        from .rollout_topk import align_to_response

        ids, logp = align_to_response(*found, output["response_mask"].tolist())
        output["rollout_topk_ids"] = torch.from_numpy(ids)
        output["rollout_topk_logprobs"] = torch.from_numpy(logp)
        return output

    as_dict.dppo_wrapped = orig
    return as_dict


def _pop_topk(extra: dict):
    ids, logp = (extra.pop(k, None) for k in TOPK_KEYS)
    if (ids is None) != (logp is None):
        raise ValueError(f"rollout returned only one of {TOPK_KEYS} in extra_fields")
    return None if ids is None else (np.asarray(ids), np.asarray(logp))


def _wrap_postprocess(orig):
    """Legacy trainer: ``inputs`` are ``_InternalAgentLoopOutput`` with ``response_mask`` ``[1, T]`` (padded)."""

    @functools.wraps(orig)
    def _postprocess(self, inputs, *args, **kwargs):
        from .rollout_topk import align_to_response

        found = [_pop_topk(inp.extra_fields) for inp in inputs]
        output = orig(self, inputs, *args, **kwargs)
        if all(f is None for f in found):
            return output
        if any(f is None for f in found):
            missing = [i for i, f in enumerate(found) if f is None]
            raise ValueError(f"rollout top-K missing for samples {missing[:8]} of a batch that has it for others")
        rows = [align_to_response(ids, logp, inp.response_mask[0].tolist()) for (ids, logp), inp in zip(found, inputs)]
        output.batch["rollout_topk_ids"] = torch.from_numpy(np.stack([r[0] for r in rows]))  # [B, T, K]
        output.batch["rollout_topk_logprobs"] = torch.from_numpy(np.stack([r[1] for r in rows]))
        return output

    _postprocess.dppo_wrapped = orig
    return _postprocess


def _wrap_padding_template(orig):
    @functools.wraps(orig)
    def construct_minimal_padding_template(source_td, source_tag, eos_token_id):
        sample, tag = orig(source_td, source_tag, eos_token_id)
        if "rollout_topk_ids" in sample:
            r = sample["responses"].shape[0]  # 1 synthetic response token, response_mask 0
            k = sample["rollout_topk_ids"].shape[-1]
            sample["rollout_topk_ids"] = torch.zeros(r, k, dtype=torch.int32)
            sample["rollout_topk_logprobs"] = torch.full((r, k), float("-inf"), dtype=torch.float32)
        return sample, tag

    construct_minimal_padding_template.dppo_wrapped = orig
    return construct_minimal_padding_template


def _patch_legacy(module) -> None:
    from .._compat import require

    worker = require(module, "AgentLoopWorker")
    require(worker, "_postprocess")
    if not hasattr(worker._postprocess, "dppo_wrapped"):
        worker._postprocess = _wrap_postprocess(worker._postprocess)


def _patch_padding(module) -> None:
    from .._compat import require

    fn = require(module, "construct_minimal_padding_template")
    if not hasattr(fn, "dppo_wrapped"):
        module.construct_minimal_padding_template = _wrap_padding_template(fn)


def _patch(module) -> None:
    from .._compat import require

    cls = require(module, "AgentLoopOutput")
    require(cls, "as_dict")
    if not hasattr(cls.as_dict, "dppo_wrapped"):
        cls.as_dict = _wrap_as_dict(cls.as_dict)


def apply_agent_loop_output_patch() -> None:
    """Wrap ``AgentLoopOutput.as_dict`` when verl's agent-loop module is imported (idempotent)."""
    if mark_applied("agent_loop_output_topk"):
        when_imported(MODULE, _patch)


def apply_legacy_agent_loop_patch() -> None:
    """Legacy-trainer batches and V1 synthetic padding samples carry the rollout top-K too (idempotent)."""
    if mark_applied("agent_loop_legacy_topk"):
        when_imported(MODULE, _patch_legacy)
        when_imported(PADDING_MODULE, _patch_padding)
