"""Carry the rollout top-K from the rollout server into verl 0.9.1's V1 batch.

The rollout server (vLLM / SGLang integration) puts ``rollout_topk_ids`` / ``rollout_topk_logprobs`` (numpy
``[G, K]`` over the G generated tokens) into ``TokenOutput.extra_fields``; verl's agent loops forward
``extra_fields`` into ``AgentLoopOutput``, and the V1 trainer turns each sample into tensors with
``AgentLoopOutput.as_dict`` (its only caller). We wrap ``as_dict`` to pop the two arrays, align them with the
response (mask-0 tokens inserted by the agent loop get id 0 / -inf rows, see
:func:`.topk_arrays.align_to_response`) and emit int32 / fp32 ``[R, K]`` tensors next to ``rollout_log_probs``;
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

from ...contract import ROLLOUT_TOPK_IDS, ROLLOUT_TOPK_LOGPROBS, TOPK_KEYS, TOPK_TURNS
from ..patching import patch_on_import
from .topk_arrays import align_to_response

__all__ = ["apply_agent_loop_output_patch", "apply_legacy_agent_loop_patch"]

MODULE = "verl.experimental.agent_loop.agent_loop"
PADDING_MODULE = "verl.trainer.ppo.padding_utils"


def _wrap_as_dict(orig):
    @functools.wraps(orig)
    def as_dict(self):
        output = orig(self)
        extra = output.get("extra_fields") or {}
        found, all_turns = _pop_topk(extra), extra.pop(TOPK_TURNS, None) is not None
        if found is None:
            return output
        if not all_turns:  # the tool agent's wrapper (tool_agent.py) marks rows that cover every turn
            _refuse_multi_turn(getattr(self, "num_turns", 0))
        ids, logp = align_to_response(*found, output["response_mask"].tolist())
        output[ROLLOUT_TOPK_IDS] = torch.from_numpy(ids)
        output[ROLLOUT_TOPK_LOGPROBS] = torch.from_numpy(logp)
        return output

    return as_dict


def _refuse_multi_turn(num_turns: int) -> None:
    """First-use twin of the launch rule (the ``agent_name`` column may be invisible at launch): a multi-turn agent
    loop other than ``tool_agent`` (whose turns :mod:`.tool_agent` collects) may keep some turns' top-K only, e.g.
    the first turn's ``extra_fields``, and its rows would then not line up with the response."""
    if num_turns > 2:  # user + assistant is one turn pair; more means tool/observation turns in between
        raise ValueError(
            f"Top-K DPPO got a multi-turn trajectory (num_turns={num_turns}) from an agent loop other than "
            "tool_agent, whose rollout top-K may cover only some assistant turns. Use a binary mode (dppo_tv_binary) "
            "with that agent loop, or tool_agent / single_turn_agent"
        )


def _pop_topk(extra: dict):
    ids, logp = (extra.pop(k, None) for k in TOPK_KEYS)
    if (ids is None) != (logp is None):
        raise ValueError(f"rollout returned only one of {TOPK_KEYS} in extra_fields")
    return None if ids is None else (np.asarray(ids), np.asarray(logp))


def _wrap_postprocess(orig):
    """Legacy trainer: ``inputs`` are ``_InternalAgentLoopOutput`` with ``response_mask`` ``[1, T]`` (padded)."""

    @functools.wraps(orig)
    def _postprocess(self, inputs, *args, **kwargs):
        found = [_pop_topk(inp.extra_fields) for inp in inputs]
        for inp in inputs:  # the tool agent's marker (see as_dict) must not reach the non-tensor batch
            inp.extra_fields.pop(TOPK_TURNS, None)
        output = orig(self, inputs, *args, **kwargs)
        if all(f is None for f in found):
            return output
        if any(f is None for f in found):
            missing = [i for i, f in enumerate(found) if f is None]
            raise ValueError(f"rollout top-K missing for samples {missing[:8]} of a batch that has it for others")
        rows = [align_to_response(ids, logp, inp.response_mask[0].tolist()) for (ids, logp), inp in zip(found, inputs)]
        output.batch[ROLLOUT_TOPK_IDS] = torch.from_numpy(np.stack([r[0] for r in rows]))  # [B, T, K]
        output.batch[ROLLOUT_TOPK_LOGPROBS] = torch.from_numpy(np.stack([r[1] for r in rows]))
        return output

    return _postprocess


def _wrap_padding_template(orig):
    @functools.wraps(orig)
    def construct_minimal_padding_template(source_td, source_tag, eos_token_id):
        sample, tag = orig(source_td, source_tag, eos_token_id)
        if ROLLOUT_TOPK_IDS in sample:
            r = sample["responses"].shape[0]  # 1 synthetic response token, response_mask 0
            k = sample[ROLLOUT_TOPK_IDS].shape[-1]
            sample[ROLLOUT_TOPK_IDS] = torch.zeros(r, k, dtype=torch.int32)
            sample[ROLLOUT_TOPK_LOGPROBS] = torch.full((r, k), float("-inf"), dtype=torch.float32)
        return sample, tag

    return construct_minimal_padding_template


def apply_agent_loop_output_patch() -> None:
    """Wrap ``AgentLoopOutput.as_dict`` when verl's agent-loop module is imported (idempotent)."""
    patch_on_import(MODULE, "AgentLoopOutput.as_dict", _wrap_as_dict, name="rollout.agent_loop.as_dict",
                    signature="self", needed_by="topk")


def apply_legacy_agent_loop_patch() -> None:
    """Legacy-trainer batches and V1 synthetic padding samples carry the rollout top-K too (idempotent)."""
    patch_on_import(MODULE, "AgentLoopWorker._postprocess", _wrap_postprocess, name="rollout.agent_loop.postprocess",
                    signature="self, inputs, input_non_tensor_batch=, validate=", needed_by="topk")
    patch_on_import(PADDING_MODULE, "construct_minimal_padding_template", _wrap_padding_template,
                    name="rollout.padding_template", signature="source_td, source_tag, eos_token_id", needed_by="topk")
