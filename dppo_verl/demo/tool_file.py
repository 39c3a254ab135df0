"""The file verl loads by path for ``make demo AGENT=tool`` (``rollout.multi_turn.function_tool_path``): it executes
it in every agent-loop worker before building any loop, which registers the demo's tool with verl's
``@function_tool`` and, by importing :mod:`.tool_format`, its tool-call parser. Loaded twice in one process (by
path and as a module), it registers the same function object, which verl accepts.
"""

from verl.tools.function_tool import function_tool

from dppo_verl.demo.tool_format import TOOL_NAME, reverse_digits

function_tool(TOOL_NAME)(reverse_digits)
