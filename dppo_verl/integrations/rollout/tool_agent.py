"""Rollout top-K across the assistant turns of verl 0.9.1's ``tool_agent`` loop (``ToolAgentLoop``).

Each assistant turn is one ``server_manager.generate`` call whose ``TokenOutput.extra_fields`` carries that turn's
``rollout_topk_ids`` / ``rollout_topk_logprobs`` ``[G_t, K]`` (put there by :mod:`.vllm_server` /
:mod:`.sglang_server`, merged over resumed attempts by :mod:`.async_client`). verl's loop copies ``extra_fields``
of the *first* turn only (``if not agent_data.extra_fields: ...update(output.extra_fields)``), so the rows of later
turns were lost. Two wrappers fix that per trajectory:

- ``_handle_generating_state`` (one assistant turn): for the duration of the call, ``self.server_manager`` is a
  transparent recorder that keeps the ``TokenOutput`` (verl instantiates one loop object per trajectory in
  ``AgentLoopWorker._run_agent_loop`` and runs its states one after the other, so the swap is not shared); the
  turn's rows are appended after the rows already kept, and checked against the ``response_mask == 1`` tokens
  verl appended for it;
- ``_handle_processing_tools_state`` (tool output, next generation prompt: ``response_mask`` 0): some
  Continuous-Token builders (GLM, Gemma 4, DeepSeek) drop trailing tokens of the runtime prefix at this junction,
  generated ones included (with their mask and log-prob), so the same number of trailing rows is dropped here.

After each state the kept rows replace the two keys in ``agent_data.extra_fields`` (the dict verl's ``run`` puts
into ``AgentLoopOutput``), with :data:`~dppo_verl.contract.TOPK_TURNS` (the number of assistant turns) as the sign
that the rows cover every turn. The kept rows are then exactly one per ``response_mask == 1`` token, in order:
:func:`.topk_arrays.align_to_response` (``as_dict``) puts them on those positions, gives tool tokens id 0 / -inf
rows, and cuts them where verl cuts the response at ``response_length``. A trajectory without top-K (binary modes,
other losses) leaves ``extra_fields`` as verl built it; a run whose rollout config asks for no top-K
(``rollout.custom.dppo_num_topk`` unset: binary modes, other losses) runs verl's handlers as they are.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import numpy as np

from ...contract import TOPK_KEYS, TOPK_TURNS
from ..patching import patch_on_import
from .topk_arrays import requested_topk

__all__ = ["apply_tool_agent_topk", "MODULE"]

MODULE = "verl.experimental.agent_loop.tool_agent_loop"
_ATTR = "_dppo_topk_rows"  # on verl's per-trajectory AgentData (verl itself adds _active_tools the same way)


@dataclass
class _Rows:
    """One trajectory's kept top-K rows, one per ``response_mask == 1`` token, in order."""

    ids: Optional[np.ndarray] = None  # [N, K] int32
    logp: Optional[np.ndarray] = None  # [N, K] fp32
    turns: int = 0  # assistant turns seen
    bare_turns: int = 0  # turns that generated tokens without a top-K

    def add_turn(self, output, request_id) -> None:
        self.turns += 1
        ids, logp = (output.extra_fields.get(k) for k in TOPK_KEYS)
        if (ids is None) != (logp is None):
            raise ValueError(f"request {request_id}, assistant turn {self.turns}: the rollout returned only one of "
                             f"{TOPK_KEYS} in extra_fields")
        n = len(output.token_ids)
        if ids is None:
            self.bare_turns += 1 if n else 0
            return
        ids, logp = np.asarray(ids, dtype=np.int32), np.asarray(logp, dtype=np.float32)
        k = None if self.ids is None else self.ids.shape[1]
        if ids.ndim != 2 or logp.shape != ids.shape or ids.shape[0] != n or (k is not None and ids.shape[1] != k):
            raise ValueError(f"request {request_id}, assistant turn {self.turns}: {TOPK_KEYS} of shapes "
                             f"{list(ids.shape)} / {list(logp.shape)} for {n} generated tokens, expected [{n}, "
                             f"{k or 'K'}]")
        self.ids = ids if self.ids is None else np.concatenate([self.ids, ids])
        self.logp = logp if self.logp is None else np.concatenate([self.logp, logp])

    def drop_last(self, n: int) -> None:
        if self.ids is not None and n > 0:
            self.ids, self.logp = self.ids[: len(self.ids) - n], self.logp[: len(self.logp) - n]

    def check(self, generated: int, request_id) -> None:
        """``generated``: the trajectory's ``response_mask == 1`` tokens now; one kept row each."""
        if self.ids is None:
            return
        if self.bare_turns:
            raise ValueError(f"request {request_id}: {self.bare_turns} of {self.turns} assistant turns generated "
                             f"tokens without a rollout top-K ({TOPK_KEYS}) while others carried one: every turn's "
                             "rollout server must return the top-K")
        if len(self.ids) != generated:
            raise ValueError(f"request {request_id}: {len(self.ids)} rollout top-K rows ({TOPK_KEYS[0]}) kept for "
                             f"{generated} response_mask == 1 tokens after assistant turn {self.turns}: verl's "
                             "tool agent changed how it merges turns; the rows would not line up")

    def publish(self, extra_fields: dict) -> None:
        if self.ids is not None:
            extra_fields.update({TOPK_KEYS[0]: self.ids, TOPK_KEYS[1]: self.logp, TOPK_TURNS: self.turns})


class _Recorder:
    """Stands in for the loop's ``server_manager`` during one state: records each ``TokenOutput``, forwards all."""

    def __init__(self, inner):
        self.inner, self.outputs = inner, []

    async def generate(self, *args, **kwargs):
        output = await self.inner.generate(*args, **kwargs)
        self.outputs.append(output)
        return output

    def __getattr__(self, name):  # only reached for attributes other than those set in __init__
        return getattr(self.inner, name)


def _rows_of(agent_data) -> _Rows:
    rows = getattr(agent_data, _ATTR, None)
    if rows is None:
        rows = _Rows()
        setattr(agent_data, _ATTR, rows)
    return rows


def _wrap_generating(orig):
    @functools.wraps(orig)
    async def _handle_generating_state(self, agent_data, sampling_params, ignore_termination=False):
        if requested_topk(self.rollout_config) is None:  # no top-K asked of the servers: verl's handler as is
            return await orig(self, agent_data, sampling_params, ignore_termination=ignore_termination)
        rows, recorder = _rows_of(agent_data), _Recorder(self.server_manager)
        self.server_manager = recorder
        try:
            state = await orig(self, agent_data, sampling_params, ignore_termination=ignore_termination)
        finally:
            self.server_manager = recorder.inner
        for output in recorder.outputs:  # one generate call per turn in verl 0.9.1
            rows.add_turn(output, agent_data.request_id)
        rows.check(sum(agent_data.response_mask), agent_data.request_id)
        rows.publish(agent_data.extra_fields)
        return state

    return _handle_generating_state


def _wrap_processing_tools(orig):
    @functools.wraps(orig)
    async def _handle_processing_tools_state(self, agent_data):
        if requested_topk(self.rollout_config) is None:
            return await orig(self, agent_data)
        generated_before = sum(agent_data.response_mask)
        state = await orig(self, agent_data)
        rows = _rows_of(agent_data)
        # A builder that trims the runtime prefix's tail trims generated tokens' mask and log-probs with it; the
        # tool output itself adds mask-0 tokens only. verl drops the whole merge when it would pass response_length.
        rows.drop_last(generated_before - sum(agent_data.response_mask))
        rows.check(sum(agent_data.response_mask), agent_data.request_id)
        rows.publish(agent_data.extra_fields)
        return state

    return _handle_processing_tools_state


def apply_tool_agent_topk() -> None:
    """Wrap the tool agent's two turn handlers when its module is imported (idempotent)."""
    patch_on_import(MODULE, "ToolAgentLoop._handle_generating_state", _wrap_generating,
                    name="rollout.tool_agent.generating",
                    signature="self, agent_data, sampling_params, ignore_termination=", needed_by="topk")
    patch_on_import(MODULE, "ToolAgentLoop._handle_processing_tools_state", _wrap_processing_tools,
                    name="rollout.tool_agent.processing_tools", signature="self, agent_data", needed_by="topk")
