"""The demo's tool and its compact tool-call format, for ``make demo AGENT=tool`` (verl's ``tool_agent`` loop).

A call is ``<|call|>`` followed by the digits to reverse and eos (at most 8 tokens for the task's 6 digits; verl's
hermes format, ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, is ~60 byte tokens, which a 0.5M
parameter byte-level model would have to reproduce exactly). :class:`CallTokenParser` turns it into verl's
``FunctionCall`` and is registered in verl's ``ToolParser`` registry under :data:`PARSER_NAME` when this module is
imported. verl imports it in the agent-loop worker, before any loop is built, through the tool file
(``tool_file.py``, ``rollout.multi_turn.function_tool_path``), so the registry of the process that builds
``ToolAgentLoop`` (``ToolParser.get_tool_parser(multi_turn.format, ...)``) has it.
"""

from __future__ import annotations

import json

from verl.experimental.agent_loop.tool_parser import FunctionCall, ToolParser

from .assets import CALL_TOKEN

__all__ = ["PARSER_NAME", "TOOL_NAME", "CallTokenParser", "reverse_digits"]

PARSER_NAME = "dppo_demo_call"  # rollout.multi_turn.format
TOOL_NAME = "reverse"
_ARG = "digits"


def reverse_digits(digits: str) -> str:
    """Reverse a string of digits.

    Args:
        digits: The digits to reverse, e.g. "604876".
    """
    # Whatever the model put after the call marker comes back reversed: a garbled call costs reward, not a crash.
    return str(digits).strip()[::-1]


@ToolParser.register(PARSER_NAME)
class CallTokenParser(ToolParser):
    """``text<|call|>604876<|im_end|>`` -> content ``text``, one call of :data:`TOOL_NAME` with ``digits="604876"``."""

    async def extract_tool_calls(self, responses_ids, tools=None):
        # Special tokens (eos) dropped; the call marker is not special, so it survives the decode.
        text = self.tokenizer.decode(responses_ids, skip_special_tokens=True)
        if CALL_TOKEN not in text:
            return text, []
        content, _, argument = text.partition(CALL_TOKEN)
        return content, [FunctionCall(name=TOOL_NAME, arguments=json.dumps({_ARG: argument.strip()}))]
