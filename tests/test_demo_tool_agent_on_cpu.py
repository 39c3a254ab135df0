"""CI smoke of ``make demo AGENT=tool``: verl's real trainer (main_ppo, Ray, vLLM CPU, FSDP actor) with every sample
through verl's multi-turn ``tool_agent`` loop, the demo's reverse tool and compact call format, for 2 steps with the
Top-K loss (``dppo_tv_topk``).

The same code path as ``make demo AGENT=tool`` (``python -m dppo_verl.demo run --agent tool``), smaller batch.
Checks what issue #20 asks of it: finite metrics every step, the Top-K path (``support_size`` > 1), every response
token with its own top-K row across the assistant turns (``topk_valid_frac`` = 1), and trajectories with more than
one assistant turn (verl's ``num_turns/max`` >= 3: a call, the tool's answer, a second turn), plus the plot, the
summary and the tool-call count from verl's rollout dumps. A Ray resource shortage hangs silently, hence the hard
timeouts.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from dppo_verl.demo import report
from test_demo_smoke_on_cpu import check_smoke_run, check_smoke_step, run_demo_smoke


@pytest.mark.timeout(1000)
def test_demo_tool_agent_two_steps_topk(tmp_path):
    # 8 prompts x 2 samples: enough trajectories that the warm-started model (tool calls in ~30% of its warm-start
    # examples) calls the tool in some of them.
    proc, run_dir = run_demo_smoke(tmp_path, "--agent", "tool", "--batch", "8", "--minibatches", "2")
    records = report.read_records(str(run_dir / "metrics.jsonl"))
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        check_smoke_step(r["data"])  # finite, Top-K path, every mask-1 token of every turn with its own row
        assert report.NUM_TURNS_MAX in r["data"]
    assert max(r["data"][report.NUM_TURNS_MAX] for r in records) >= 3  # a tool call and a second assistant turn
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps_logged"] == 2 and summary["exit_code"] == 0 and summary["agent"] == "tool"
    assert summary["num_turns_max"] >= 3 and sum(summary["tool_calls_per_step"]) > 0
    assert 0 < summary["tool_call_rate_first"] <= 1 and summary["samples_per_step"] == 16
    check_smoke_run(summary, proc.stdout + proc.stderr, 2)
    command = (run_dir / "command.txt").read_text()
    assert "default_agent_loop=tool_agent" in command and "multi_turn.format=dppo_demo_call" in command
