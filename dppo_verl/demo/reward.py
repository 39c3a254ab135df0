"""Rule-based reward with partial credit for the demo's "reverse digits" task.

verl loads it with ``reward.custom_reward_function.path=pkg://dppo_verl.demo.reward`` and
``reward.custom_reward_function.name=compute_score``; its naive reward manager passes the decoded response
(special tokens already skipped) as ``solution_str`` and the parquet's ``reward_model.ground_truth``.
The module imports nothing from the package, so verl can also load it by file path
(``reward.custom_reward_function.path=/abs/path/to/dppo_verl/demo/reward.py``).

Partial credit matters for the demo: a tiny model rarely gets a whole answer right early on, and an
all-or-nothing reward would give GRPO groups with no variance (zero advantage, nothing to learn from).
"""

from __future__ import annotations

__all__ = ["clean_answer", "compute_score"]

# Text after any of these is not part of the answer (a model that misses eos keeps generating).
_STOP_MARKERS = ("<|im_end|>", "<|endoftext|>", "<|user|>", "<|assistant|>", "\n")


def clean_answer(solution_str: str) -> str:
    """The answer part of a response: cut at the first stop marker, spaces removed."""
    text = solution_str or ""
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
