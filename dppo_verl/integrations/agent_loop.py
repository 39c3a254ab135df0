"""Carry the rollout top-K from the rollout server into verl 0.9.1's V1 batch.

The rollout server (vLLM / SGLang integration) puts ``rollout_topk_ids`` / ``rollout_topk_logprobs`` (numpy
``[G, K]`` over the G generated tokens) into ``TokenOutput.extra_fields``; verl's agent loops forward
``extra_fields`` into ``AgentLoopOutput``, and the V1 trainer turns each sample into tensors with
``AgentLoopOutput.as_dict`` (its only caller). We wrap ``as_dict`` to pop the two arrays, align them with the
response (mask-0 tokens inserted by the agent loop get id 0 / -inf rows, see
:func:`.rollout_topk.align_to_response`) and emit int32 / fp32 ``[R, K]`` tensors next to ``rollout_log_probs``;
verl stacks them into ``[B, R, K]`` (jagged when lengths differ), which the actor hook reads.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from . import mark_applied
from ._lazy import when_imported
from .topk_hook import TOPK_KEYS

__all__ = ["apply_agent_loop_output_patch"]

MODULE = "verl.experimental.agent_loop.agent_loop"


def _wrap_as_dict(orig):
    @functools.wraps(orig)
    def as_dict(self):
        output = orig(self)
        extra = output.get("extra_fields") or {}
        ids, logp = (extra.pop(k, None) for k in TOPK_KEYS)
        if ids is None and logp is None:
            return output
        if ids is None or logp is None:
            raise ValueError(f"rollout returned only one of {TOPK_KEYS} in extra_fields")
        from .rollout_topk import align_to_response

        ids, logp = align_to_response(np.asarray(ids), np.asarray(logp), output["response_mask"].tolist())
        output["rollout_topk_ids"] = torch.from_numpy(ids)
        output["rollout_topk_logprobs"] = torch.from_numpy(logp)
        return output

    as_dict.dppo_wrapped = orig
    return as_dict


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
