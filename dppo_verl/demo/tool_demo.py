"""``make demo AGENT=tool``: the demo task through verl's multi-turn ``tool_agent`` loop.

The model may answer "reverse 604876" directly (``678406``), or call the demo's tool (``<|call|>604876``, see
:mod:`.tool_format`), read its answer and copy it (``\\n<|tool|>678406\\n<|assistant|>678406``): two assistant
turns with tool tokens (``response_mask`` 0) between them, so verl logs ``num_turns`` 4 for such a trajectory (user,
assistant, tool, assistant) and 2 for a direct answer. The warm start sees both kinds (:data:`.warmstart.
TOOL_WARM_START`); RL with the Top-K loss then trains on every assistant turn's top-K rows.

verl logs no per-trajectory tool count, so the run dumps its rollouts (``trainer.rollout_data_dir``: verl writes
``<step>.jsonl`` with each decoded response and its score) and :func:`tool_call_stats` counts the calls there.
"""

from __future__ import annotations

import json
import os

from ..contract import DEFAULT_AGENT_LOOP, MULTI_TURN
from .assets import CALL_TOKEN
from .reward import TOOL_TOKEN

__all__ = ["RESPONSE_LENGTH", "ROLLOUTS", "tool_call_stats", "tool_overrides"]

# Call (<= 8 tokens) + "\n<|tool|>" + answer + "\n<|assistant|>" (<= 10) + answer and eos (<= 7) = 25, with slack
# for a second call; the single-turn demo's 12 would cut every tool-using trajectory.
RESPONSE_LENGTH = 32
ROLLOUTS = "rollouts"  # under the run folder: verl's per-step rollout dumps
TOOL_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tool_file.py")


def tool_overrides(run_dir: str) -> list[str]:
    """verl overrides that run every sample through ``tool_agent`` with the demo's tool and call format."""
    from .tool_format import PARSER_NAME

    return [
        f"{DEFAULT_AGENT_LOOP}=tool_agent",  # the demo's parquet has no agent_name column
        f"{MULTI_TURN}.function_tool_path={TOOL_FILE}",  # registers the tool and the parser in the workers
        f"{MULTI_TURN}.format={PARSER_NAME}",
        # One call, then the answer: a trajectory is at most user, assistant, tool, assistant.
        f"{MULTI_TURN}.max_assistant_turns=2", f"{MULTI_TURN}.max_user_turns=1",
        f"{MULTI_TURN}.max_tool_response_length=16",  # the tool echoes its argument: a runaway call stays short
        f"trainer.rollout_data_dir={os.path.join(run_dir, ROLLOUTS)}",
    ]


def _calls(output: str) -> bool:
    """A trajectory called the tool when the tool's answer came back into its response."""
    return TOOL_TOKEN in output


def tool_call_stats(run_dir: str) -> list[dict]:
    """Per logged step: ``{"step", "samples", "tool_call_rate", "reward_tool", "reward_direct"}`` from verl's
    rollout dumps (a reward is None where no sample of that kind exists). Empty when nothing was dumped."""
    folder = os.path.join(run_dir, ROLLOUTS)
    if not os.path.isdir(folder):
        return []
    stats = []
    for name in sorted((n for n in os.listdir(folder) if n.endswith(".jsonl")), key=lambda n: int(n.split(".")[0])):
        with open(os.path.join(folder, name)) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        if not rows:
            continue
        tool = [r["score"] for r in rows if _calls(r["output"])]
        direct = [r["score"] for r in rows if not _calls(r["output"])]
        stats.append({"step": int(name.split(".")[0]), "samples": len(rows), "tool_call_rate": len(tool) / len(rows),
                      "calls_without_answer": sum(CALL_TOKEN in r["output"] and not _calls(r["output"]) for r in rows),
                      "reward_tool": sum(tool) / len(tool) if tool else None,
                      "reward_direct": sum(direct) / len(direct) if direct else None})
    return stats


def summarize(stats: list[dict]) -> dict:
    """Tool-call rate and rewards at the first and last dumped step (for ``summary.json``)."""
    if not stats:
        return {"tool_call_rate_first": None, "tool_call_rate_last": None}
    first, last = stats[0], stats[-1]
    return {"tool_call_rate_first": first["tool_call_rate"], "tool_call_rate_last": last["tool_call_rate"],
            "reward_tool_calls_last": last["reward_tool"], "reward_direct_last": last["reward_direct"],
            "tool_calls_per_step": [round(s["tool_call_rate"] * s["samples"]) for s in stats],
            "samples_per_step": stats[-1]["samples"]}
