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
