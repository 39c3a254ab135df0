"""The demo runner's checkpoint and resume bookkeeping without a trainer (the real crash is in
``test_crash_resume_on_cpu.py``): overrides, the metrics history across attempts, the same-config check."""

from __future__ import annotations

import json

import pytest

from dppo_verl.demo import report, resume
from dppo_verl.demo.run import demo_overrides
from dppo_verl.launch.cli import compose_config, expand_overrides
from dppo_verl.launch.rules import select

ASSETS = {"train": "/nonexistent/train.parquet", "val": "/nonexistent/val.parquet", "model": "/nonexistent/model"}


def _overrides(run_dir, **kw):
    return demo_overrides(ASSETS, loss="dppo_tv_topk", k=20, steps=4, seed=0, lr=5e-4, batch=4, n=2, minibatches=2,
                          response_length=12, run_dir=str(run_dir), **kw)


def _line(step, reward=0.5):
    return json.dumps({"step": step, "data": {report.REWARD: reward}}) + "\n"


def test_checkpoint_keys_compose_into_verls_config(tmp_path):
    cfg = compose_config(expand_overrides([o for o in _overrides(tmp_path, save_freq=2, resume=True)
                                           if not o.startswith("hydra.")])[0])
    assert select(cfg, "trainer.save_freq") == 2 and select(cfg, "trainer.resume_mode") == "auto"
    assert select(cfg, "trainer.default_local_dir") == str(tmp_path / "checkpoints")  # inside the run directory
    fresh = _overrides(tmp_path)
    assert "trainer.save_freq=-1" in fresh and "trainer.resume_mode=disable" in fresh  # never loads a stale one


def test_metrics_survive_a_restart_and_rebuild_from_attempts(tmp_path):
    overrides = _overrides(tmp_path, save_freq=2)
    first, step = resume.prepare_run_dir(str(tmp_path), overrides, resume=False)
    assert step is None and first.endswith("attempts/metrics-1.jsonl")
    mirror = resume.MetricsMirror(first, str(tmp_path / "metrics.jsonl"), poll_s=60)
    with open(first, "w") as f:
        f.write(_line(1) + _line(2) + _line(3, 0.1)[:10])  # the trainer is writing step 3's line
    mirror.sync()
    assert [r["step"] for r in report.read_records(str(tmp_path / "metrics.jsonl"))] == [1, 2]
    with open(first, "a") as f:
        f.write(_line(3, 0.1)[10:])  # ... and the runner died before copying it: the resume must recover it
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / resume.TRACKER).write_text("2")
    second, step = resume.prepare_run_dir(str(tmp_path), _overrides(tmp_path, save_freq=2, resume=True), resume=True)
    assert step == 2 and second.endswith("attempts/metrics-2.jsonl")
    assert [r["step"] for r in report.read_records(str(tmp_path / "metrics.jsonl"))] == [1, 2, 3]
    mirror = resume.MetricsMirror(second, str(tmp_path / "metrics.jsonl"), poll_s=60)
    with open(second, "w") as f:
        f.write(_line(3, 0.9) + _line(4))
    mirror.sync()
    records = report.read_records(str(tmp_path / "metrics.jsonl"))
    assert [r["step"] for r in records] == [1, 2, 3, 3, 4]  # step 3 ran in both attempts
    latest = report.latest_per_step(records)
    assert [r["step"] for r in latest] == [1, 2, 3, 4] and latest[2]["data"][report.REWARD] == 0.9


def test_resume_refuses_other_options_and_fresh_start_clears(tmp_path):
    resume.prepare_run_dir(str(tmp_path), _overrides(tmp_path, save_freq=2), resume=False)
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / resume.TRACKER).write_text("2")
    changed = [o.replace("optim.lr=0.0005", "optim.lr=0.001") for o in _overrides(tmp_path, save_freq=2, resume=True)]
    with pytest.raises(ValueError, match=r"--resume: the overrides differ .*actor\.optim\.lr=0\.001"):
        resume.prepare_run_dir(str(tmp_path), changed, resume=True)
    attempt, step = resume.prepare_run_dir(str(tmp_path), _overrides(tmp_path, save_freq=2), resume=False)
    assert step is None and attempt.endswith("metrics-1.jsonl") and not (tmp_path / "checkpoints").exists()
    # --resume with no complete checkpoint: verl would start at step 1, so the history starts over too
    with open(attempt, "w") as f:
        f.write(_line(1))
    attempt, step = resume.prepare_run_dir(str(tmp_path), _overrides(tmp_path, save_freq=2, resume=True), resume=True)
    assert step is None and attempt.endswith("metrics-1.jsonl") and (tmp_path / "metrics.jsonl").read_text() == ""
