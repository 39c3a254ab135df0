"""Crash and resume (issue #17, item 4), and the CI smoke of ``make demo`` (FSDP, sync, Top-K) on every step: a Top-K DPPO demo run with checkpoints is killed hard after a checkpoint and
resumed with ``trainer.resume_mode=auto``.

The demo runner (``python -m dppo_verl.demo run``, as ``make demo``, smoke-sized) trains 4 steps and checkpoints every
2. Once verl has completed the checkpoint of step 2 and logged step 3, the trainer's process group and every process
it started (Ray's GCS and raylet, its workers, the vLLM server) get SIGKILL, as in a machine or OOM-killer crash.
``--resume`` with the same options must load the step-2 checkpoint and train steps 3 and 4 on the Top-K path; step
3 is trained twice by design, and ``metrics.jsonl`` keeps the killed attempt's lines.
"""

from __future__ import annotations

import collections
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest

from dppo_verl.demo import report, resume
from test_demo_smoke_on_cpu import check_smoke_run, check_smoke_step

psutil = pytest.importorskip("psutil")

STEPS, SAVE_FREQ, KILL_AFTER = 4, 2, 3  # kill once step 3 is logged: the step-2 checkpoint is the latest


def _runner(tmp_path, *extra) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "dppo_verl.demo", "run", "--steps", str(STEPS), "--batch", "4", "--n", "2",
           "--minibatches", "2", "--loss", "dppo_tv_topk", "--runs-dir", str(tmp_path), "--run-name", "crash",
           "--save-freq", str(SAVE_FREQ), "--timeout", "400", *extra]
    out = open(tmp_path / f"runner{len(extra)}.out", "w")
    return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _tail(run_dir, tmp_path) -> str:
    """The ends of both runners' output and of train.log, for a failure message."""
    paths = (tmp_path / "runner0.out", tmp_path / "runner1.out", run_dir / "train.log")
    return "\n".join(p.read_text()[-3000:] for p in paths if p.exists())


def _wait_for_checkpoint_then_step(runner, run_dir, tmp_path, budget_s=420) -> None:
    attempt = run_dir / resume.ATTEMPTS / "metrics-1.jsonl"
    deadline = time.time() + budget_s
    while True:
        steps = [r["step"] for r in report.read_records(str(attempt))]
        if resume.checkpointed_step(str(run_dir)) == SAVE_FREQ and KILL_AFTER in steps:
            return
        assert runner.poll() is None, f"the run ended (rc {runner.returncode}) first\n{_tail(run_dir, tmp_path)}"
        assert time.time() < deadline, f"no checkpoint {SAVE_FREQ} + step {KILL_AFTER}\n{_tail(run_dir, tmp_path)}"
        time.sleep(0.2)


def _crash(runner) -> list:
    """SIGKILL the trainer's process group and every process it started (Ray daemons may sit in other groups);
    returns those still alive 30 s later (none expected: nothing may outlive the crash and hold the machine)."""
    (trainer,) = psutil.Process(runner.pid).children()  # the runner's one child: dppo_verl.train (verl's driver)
    tree = [trainer] + trainer.children(recursive=True)
    os.killpg(os.getpgid(trainer.pid), signal.SIGKILL)
    for proc in tree:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(tree, timeout=30)
    return alive


def _overrides(command_block: str) -> list[str]:
    return [a.strip(" \\") for a in command_block.split("\n") if a.strip(" \\") and "resume_mode" not in a]


@pytest.mark.timeout(900)
def test_killed_topk_run_resumes_after_its_checkpoint(tmp_path):
    t0 = time.time()
    run_dir = tmp_path / "crash"
    runner = _runner(tmp_path)
    try:
        _wait_for_checkpoint_then_step(runner, run_dir, tmp_path)
        t_kill = time.time() - t0
        alive = _crash(runner)
        assert not alive, f"survived SIGKILL: {[(p.pid, p.name()) for p in alive]}"
        assert runner.wait(timeout=120) != 0  # the runner reports the trainer's death
    finally:
        if runner.poll() is None:
            os.killpg(runner.pid, signal.SIGKILL)
    assert resume.checkpointed_step(str(run_dir)) == SAVE_FREQ, "the kill came after a later checkpoint"
    assert (run_dir / "metrics.jsonl").exists()

    resumed = _runner(tmp_path, "--resume")
    try:
        rc = resumed.wait(timeout=480)
    finally:
        if resumed.poll() is None:
            os.killpg(resumed.pid, signal.SIGKILL)
    print(f"kill at {t_kill:.0f} s, resumed run done at {time.time() - t0:.0f} s")
    assert rc == 0, _tail(run_dir, tmp_path)

    records = report.read_records(str(run_dir / "metrics.jsonl"))
    counts = collections.Counter(r["step"] for r in records)
    assert sorted(counts) == list(range(1, STEPS + 1)), counts  # every step, from both attempts
    assert all(counts[s] == 1 for s in range(1, SAVE_FREQ + 1)), counts  # up to the checkpoint: exactly once
    first = [r["step"] for r in report.read_records(str(run_dir / resume.ATTEMPTS / "metrics-1.jsonl"))]
    second = report.read_records(str(run_dir / resume.ATTEMPTS / "metrics-2.jsonl"))
    assert first[:KILL_AFTER] == list(range(1, KILL_AFTER + 1))
    assert [r["step"] for r in second] == list(range(SAVE_FREQ + 1, STEPS + 1))  # continues after the checkpoint
    for r in records:  # every step of both attempts: what the `make demo` smoke checks (Top-K path, pi_old skipped)
        check_smoke_step(r["data"])

    log = (run_dir / "train.log").read_text()
    assert log.count(resume.RESUME_MARK) == 1, "train.log of the killed attempt was not kept"
    after = log.split(resume.RESUME_MARK, 1)[1]
    loaded = os.path.join(str(run_dir), resume.CHECKPOINTS, f"global_step_{SAVE_FREQ}")
    assert f"Resuming from {loaded}, setting global step to {SAVE_FREQ}" in after, after[-3000:]
    blocks = (run_dir / "command.txt").read_text().split(sys.executable)[1:]
    assert len(blocks) == 2 and _overrides(blocks[0]) == _overrides(blocks[1])  # the same config
    assert "trainer.resume_mode=auto" in blocks[1] and "trainer.resume_mode=disable" in blocks[0]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resumed_from_step"] == SAVE_FREQ and summary["steps_logged"] == STEPS
    assert summary["checkpointed_step"] == STEPS  # verl saves at the last step too
    check_smoke_run(summary, (tmp_path / "runner1.out").read_text(), STEPS - SAVE_FREQ)
