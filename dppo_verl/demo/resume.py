"""Checkpoints and ``--resume`` for the demo runner: one metrics history across trainer restarts.

verl's ``file`` logger opens ``VERL_FILE_LOGGER_PATH`` with mode ``"wb"`` (``verl/utils/tracking.py``), so a
restarted trainer would truncate the history of the run it resumes. Each trainer start (an *attempt*) therefore
logs to its own ``attempts/metrics-<n>.jsonl``, and ``metrics.jsonl`` is their concatenation: appended to while the
attempt runs (:class:`MetricsMirror`) and rebuilt from the attempt files when a run resumes, so lines a killed
runner never copied are not lost. Steps after the last checkpoint are trained again by a resumed trainer and
appear once per attempt; :func:`dppo_verl.demo.report.latest_per_step` keeps the last.

The checkpoints live in ``runs/<run>/checkpoints`` (verl's ``trainer.default_local_dir``), and verl marks a
complete one by writing its step to ``latest_checkpointed_iteration.txt`` after the actor and data-loader state.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import threading

__all__ = ["ATTEMPTS", "CHECKPOINTS", "TRACKER", "prepare_run_dir", "checkpointed_step", "MetricsMirror",
           "resume_overrides", "RESUME_MARK"]

ATTEMPTS = "attempts"
CHECKPOINTS = "checkpoints"
TRACKER = "latest_checkpointed_iteration.txt"  # verl's name, written last when a checkpoint is complete
_CONFIG = "overrides.json"  # the run's verl overrides, compared on --resume
_RESUME_KEY = "trainer.resume_mode="
RESUME_MARK = "[demo] ==== resumed"  # train.log: the line between a killed attempt's output and the resumed one


def resume_overrides(save_freq: int, resume: bool) -> list[str]:
    """verl's checkpoint keys. A fresh run never loads a checkpoint (``resume_mode=disable``: stale checkpoints of
    an older run with this name are removed anyway); ``--resume`` lets verl find the latest (``auto``)."""
    return [f"trainer.save_freq={save_freq}", _RESUME_KEY + ("auto" if resume else "disable")]


def checkpointed_step(run_dir: str) -> int | None:
    """The step of the last complete checkpoint in ``run_dir`` (None: none yet)."""
    try:
        with open(os.path.join(run_dir, CHECKPOINTS, TRACKER)) as f:
            return int(f.read().strip())
    except (FileNotFoundError, ValueError):
        return None


def _attempt_files(run_dir: str) -> list[str]:
    files = glob.glob(os.path.join(run_dir, ATTEMPTS, "metrics-*.jsonl"))
    return sorted(files, key=lambda p: int(re.search(r"metrics-(\d+)\.jsonl$", p).group(1)))


def _check_same_config(run_dir: str, overrides: list[str]) -> None:
    """A resumed run must train the model it checkpointed: every override but ``resume_mode`` must match."""
    path = os.path.join(run_dir, _CONFIG)
    if not os.path.exists(path):
        raise ValueError(f"--resume: {path} is missing, so {run_dir} was not started by this runner with checkpoints")
    with open(path) as f:
        before = [o for o in json.load(f) if not o.startswith(_RESUME_KEY)]
    now = [o for o in overrides if not o.startswith(_RESUME_KEY)]
    if before != now:
        changed = sorted(set(before) ^ set(now))
        raise ValueError(f"--resume: the overrides differ from the run being resumed ({path}): {changed}; "
                         "resume with the options it was started with")


def prepare_run_dir(run_dir: str, overrides: list[str], resume: bool) -> tuple[str, int | None]:
    """``(metrics file of this attempt, step resumed from)``. A fresh start clears the metrics, attempts and
    checkpoints of an older run with this name; a resume keeps them and rebuilds ``metrics.jsonl``."""
    step = checkpointed_step(run_dir) if resume else None
    if resume and step is not None:
        _check_same_config(run_dir, overrides)
    else:  # a fresh start, or a resume with no complete checkpoint: verl would start from step 1 anyway
        for name in (ATTEMPTS, CHECKPOINTS):
            shutil.rmtree(os.path.join(run_dir, name), ignore_errors=True)
        if os.path.exists(os.path.join(run_dir, "metrics.jsonl")):
            os.remove(os.path.join(run_dir, "metrics.jsonl"))
        with open(os.path.join(run_dir, _CONFIG), "w") as f:
            json.dump(overrides, f, indent=1)
    os.makedirs(os.path.join(run_dir, ATTEMPTS), exist_ok=True)
    previous = _attempt_files(run_dir)
    with open(os.path.join(run_dir, "metrics.jsonl"), "wb") as out:
        for path in previous:
            out.write(_complete_lines(path, 0)[0])
    return os.path.join(run_dir, ATTEMPTS, f"metrics-{len(previous) + 1}.jsonl"), step


def _complete_lines(path: str, pos: int) -> tuple[bytes, int]:
    """Bytes of ``path`` from ``pos`` up to its last newline (a line being written is left for later)."""
    try:
        with open(path, "rb") as f:
            f.seek(pos)
            chunk = f.read()
    except FileNotFoundError:
        return b"", pos
    end = chunk.rfind(b"\n") + 1
    return chunk[:end], pos + end


class MetricsMirror:
    """Appends each complete line of the attempt's metrics file to ``metrics.jsonl`` as the trainer writes it."""

    def __init__(self, attempt_file: str, merged_file: str, poll_s: float = 1.0):
        self.attempt_file, self.merged_file, self.poll_s = attempt_file, merged_file, poll_s
        self.pos, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sync(self) -> None:
        chunk, self.pos = _complete_lines(self.attempt_file, self.pos)
        if chunk:
            with open(self.merged_file, "ab") as out:
                out.write(chunk)

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            self.sync()

    def start(self) -> "MetricsMirror":
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop polling, then copy what the trainer wrote last."""
        self._stop.set()
        self._thread.join(timeout=10)
        self.sync()
