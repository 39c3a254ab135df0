"""Rule-based reward with partial credit for the demo's "reverse digits" task.

verl loads it with ``reward.custom_reward_function.path=pkg://dppo_verl.demo.reward`` and
``reward.custom_reward_function.name=compute_score``; its naive reward manager passes the decoded response
(special tokens already skipped) as ``solution_str`` and the parquet's ``reward_model.ground_truth``.
The module imports nothing from the package, so verl can also load it by file path
(``reward.custom_reward_function.path=/abs/path/to/dppo_verl/demo/reward.py``).

With ``make demo AGENT=tool`` (verl's tool agent) the decoded response holds every turn, e.g.
``<|call|>604876\n<|tool|>678406\n678406``: the answer scored is the line after the last tool answer; a call that
never got its answer back scores 0 (text from a call marker on is not an answer).

Partial credit matters for the demo: a tiny model rarely gets a whole answer right early on, and an
all-or-nothing reward would give GRPO groups with no variance (zero advantage, nothing to learn from).
"""

from __future__ import annotations

__all__ = ["clean_answer", "compute_score", "final_answer_text"]

# The demo's tool tokens (dppo_verl.demo.assets.CALL_TOKEN / TOOL_TOKEN; this module imports nothing from the
# package, so verl can load it by path: tests/test_demo_tool_agent_on_cpu.py checks the two stay equal).
CALL_TOKEN, TOOL_TOKEN = "<|call|>", "<|tool|>"
# Text after any of these is not part of the answer (a model that misses eos keeps generating).
_STOP_MARKERS = ("<|im_end|>", "<|endoftext|>", "<|user|>", "<|assistant|>", "\n", CALL_TOKEN)


def final_answer_text(solution_str: str) -> str:
    """The last assistant turn's text: after the last tool answer (``<|tool|>...\n``), or all of it without one."""
    text = solution_str or ""
    if TOOL_TOKEN not in text:
        return text
    tool_answer_and_rest = text.rsplit(TOOL_TOKEN, 1)[1]
    return tool_answer_and_rest.split("\n", 1)[1] if "\n" in tool_answer_and_rest else ""


def clean_answer(solution_str: str) -> str:
    """The answer part of a response: the final turn, cut at the first stop marker, spaces removed."""
    text = final_answer_text(solution_str)
    for marker in _STOP_MARKERS:
        text = text.split(marker, 1)[0]
    return "".join(text.split())


def compute_score(data_source: str, solution_str: str, ground_truth: str, extra_info=None, **kwargs) -> float:
    """Fraction of positions that match the ground truth, over the longer of the two lengths.

    1.0 only for an exact match; an empty answer scores 0; every missing or extra character costs as much as
    a wrong one (dividing by the longer length), so padding an answer with junk never pays.
    """
    del data_source, extra_info, kwargs  # one task; the signature is verl's contract
    answer, truth = clean_answer(solution_str), str(ground_truth)
    if not answer or not truth:
        return float(answer == truth)
    hits = sum(a == b for a, b in zip(answer, truth))
    return hits / max(len(answer), len(truth))
