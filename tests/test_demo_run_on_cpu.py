"""``make demo TRAINER=...``: the demo's trainer option composes into a verl config our launch rules accept (no Ray)."""

from __future__ import annotations

import pytest

from dppo_verl.demo.run import demo_overrides, trainer_overrides
from dppo_verl.launch.cli import compose_config, expand_overrides
from dppo_verl.launch.rules import check_config, select

ASSETS = {"train": "/nonexistent/train.parquet", "val": "/nonexistent/val.parquet", "model": "/nonexistent/model"}


def _config(trainer, loss="dppo_tv_topk"):
    overrides = demo_overrides(ASSETS, loss=loss, k=20, steps=2, seed=0, lr=5e-4, batch=4, n=2, minibatches=2,
                               response_length=12, run_dir="/tmp/unused", trainer=trainer)
    verl_overrides, _ = expand_overrides([o for o in overrides if not o.startswith("hydra.")])
    return compose_config(verl_overrides)


@pytest.mark.parametrize("trainer", ["sync", "colocate_async"])
def test_demo_trainer_composes_and_passes_the_launch_rules(trainer):
    cfg = _config(trainer)
    assert select(cfg, "trainer.v1.trainer_mode") == trainer
    check_config(cfg)  # Top-K under this trainer is accepted (before this issue colocate_async was refused)
    if trainer == "colocate_async":
        assert select(cfg, "trainer.v1.colocate_async.num_warmup_batches") >= 1  # stale rollouts from step 2 on


def test_unknown_trainer_is_refused_by_name():
    assert trainer_overrides("sync") == []
    with pytest.raises(ValueError, match="TRAINER='separate_async' is not one of sync, colocate_async"):
        trainer_overrides("separate_async")


def test_kill_reaches_a_child_in_its_own_process_group():
    """Some of Ray's workers leave the trainer's process group: the runner's kill (timeout, Ctrl-C) must reach them
    too, or they outlive the run and hold the machine's cores."""
    import os
    import subprocess
    import sys
    import time

    import psutil

    from dppo_verl.demo.run import _kill

    grandchild = "import os, time; os.setpgid(0, 0); time.sleep(600)"
    code = (f"import subprocess, sys, time; c = subprocess.Popen([sys.executable, '-c', {grandchild!r}]); "
            "print(c.pid, flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, start_new_session=True)
    child = int(proc.stdout.readline())
    deadline = time.time() + 30
    while os.getpgid(child) != child:  # the grandchild has left the group
        assert time.time() < deadline
        time.sleep(0.05)
    _kill(proc)
    assert proc.poll() is not None
    try:
        assert psutil.Process(child).status() == psutil.STATUS_ZOMBIE  # dead, waiting for init to reap it
    except psutil.NoSuchProcess:
        pass
