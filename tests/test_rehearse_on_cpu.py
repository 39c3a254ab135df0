"""``make rehearse``: every example's own override list, with only the allowed substitutions, through the launcher.

Every example is checked in dry-run (capture from the real script, substitutions, Hydra composition, launch rules);
the single-GPU binary example also runs its one real training step (verl's main_ppo on this CPU). The other two ran
by hand (README, "Every example rehearsed"); each takes ~1.5-2.5 minutes.
"""

from __future__ import annotations

import json
import math

import pytest

from dppo_verl.demo import rehearse as rh

ALLOWED = {"model", "data", "batch size", "GPU and node counts", "padding layout (THD -> BSHD)",
           "expert parallelism (dense demo model)", "Ulysses SP (sdpa on CPU)", "fusions and Transformer Engine options",
           "step count", "CPU platform"}


@pytest.mark.parametrize("script", ["run_qwen3_8b_fsdp_dppo_tv_topk.sh", "run_qwen3_30b_a3b_megatron_dppo_kl_topk_multinode.sh",
                                    "run_single_gpu_dppo_tv_binary.sh"])
def test_only_allowed_substitutions_and_the_config_validates(script, tmp_path):
    original = rh.capture_args(script)
    assets = {"model": "/m", "train": "/t.parquet", "val": "/v.parquet"}
    args, subs = rh.rehearsal_args(original, assets, str(tmp_path))
    assert {s.category for s in subs} <= ALLOWED
    changed = {s.key for s in subs}
    kept = {rh._key(a): a for a in args}
    for arg in original:  # everything the example sets and no rule names is passed on verbatim
        if rh._key(arg) not in changed:
            assert kept.get(rh._key(arg)) == arg or "=" not in arg, arg
    for key in ("actor.policy_loss", "algorithm.adv_estimator", "actor_rollout_ref.actor.loss_agg_mode"):
        assert key not in changed
    summary = rh.rehearse(script, runs_dir=str(tmp_path), dry_run=True)
    assert summary["substitutions"] == len(subs)
    saved = json.loads((tmp_path / f"rehearse-{script[:-3]}" / "rehearsal.json").read_text())
    assert [s["key"] for s in saved["substitutions"]] == [s.key for s in subs]


@pytest.mark.timeout(900)
def test_single_gpu_example_trains_one_step(tmp_path):
    from dppo_verl.demo import report

    summary = rh.rehearse("run_single_gpu_dppo_tv_binary.sh", runs_dir=str(tmp_path))
    assert summary["exit_code"] == 0 and summary["steps_logged"] == 1
    (record,) = report.read_records(str(tmp_path / "rehearse-run_single_gpu_dppo_tv_binary" / "metrics.jsonl"))
    data = record["data"]
    assert data[report.SUPPORT] == 1.0 and math.isfinite(data["actor/pg_loss"])  # binary: the one-slot support
