"""``make study`` pieces that need no training run: the rollout perturbation, the arms' configs, the summary."""

import ast
import json
import os

import pytest
import torch

from dppo_verl.demo import perturb, report, study


def test_noisy_weights_has_the_requested_relative_scale_and_is_deterministic():
    w = torch.randn(256, 128) * 0.02
    ids = torch.arange(10)
    [(_, a), (_, same), (_, i)] = perturb.noisy_weights([("q.weight", w), ("q.weight", w), ("ids", ids)], 0.05)
    rel = (a - w).std() / w.pow(2).mean().sqrt()
    assert abs(float(rel) - 0.05) < 0.005  # 32k draws: the std estimate is within ~0.4% of sigma
    assert torch.equal(a, same) and torch.equal(i, ids)  # one noise pattern per name; integers untouched
    [(_, b)] = perturb.noisy_weights([("k.weight", w)], 0.05)
    assert not torch.allclose(a, b)  # another name, another draw
    [(_, h)] = perturb.noisy_weights([("q.weight", w.bfloat16())], 0.05)
    assert h.dtype == torch.bfloat16
    [(_, z)] = perturb.noisy_weights([("q.weight", w)], 0.0)
    assert z is w


class _Extension:
    """Stands in for verl's vLLMColocateWorkerExtension (importing it needs a vLLM worker)."""

    def __init__(self):
        self.loaded = []

    def _update_weights(self, weights, peft_config, base_sync_done):
        self.loaded.append((list(weights), peft_config, base_sync_done))


def test_patch_perturbs_base_weights_only_when_asked(monkeypatch):
    mod = type("M", (), {"vLLMColocateWorkerExtension": _Extension})
    original = _Extension._update_weights
    monkeypatch.setattr(_Extension, "_update_weights", original)
    from dppo_verl.integrations.patching import patch_attr

    def patch():
        return patch_attr(mod.vLLMColocateWorkerExtension, "_update_weights", perturb._wrap, name=perturb.PATCH,
                          signature="self, weights, peft_config, base_sync_done")

    assert patch()
    wrapped = _Extension._update_weights
    assert patch()  # idempotent: one wrapper
    assert _Extension._update_weights is wrapped is not original
    w = torch.ones(4, 4)
    ext = _Extension()
    monkeypatch.setenv(perturb.ENV, "0.1")
    ext._update_weights([("w", w)], None, False)
    assert not torch.equal(ext.loaded[-1][0][0][1], w)
    ext._update_weights([("lora_A", w)], {"r": 8}, True)  # LoRA adapters are not the policy's base weights
    assert ext.loaded[-1][0][0][1] is w
    monkeypatch.setenv(perturb.ENV, "0")
    ext._update_weights([("w", w)], None, False)
    assert ext.loaded[-1][0][0][1] is w


def test_verl_pin_still_has_the_method_we_wrap():
    """The patch relies on verl 0.9.1's ``_update_weights(self, weights, peft_config, base_sync_done)``; read the
    source (importing it would start vLLM's platform detection)."""
    import importlib.util

    spec = importlib.util.find_spec("verl.workers.rollout.vllm_rollout")
    path = os.path.join(os.path.dirname(spec.origin), "utils.py")
    tree = ast.parse(open(path).read())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "vLLMColocateWorkerExtension")
    fn = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "_update_weights")
    assert [a.arg for a in fn.args.args] == ["self", "weights", "peft_config", "base_sync_done"]


def test_arm_settings_and_bad_name():
    label, loss, extra = study.arm_settings("pg_is")
    assert loss == "dppo_tv_binary" and "actor.policy_loss.delta_low=1e6" in extra
    assert any("dppo_verl.demo.perturb" in e for e in extra)
    with pytest.raises(ValueError, match=r"unknown study arm 'ppo'; valid: \['pg_is', 'grpo_clip'"):
        study.arm_settings("ppo")


@pytest.mark.parametrize("arm", ["pg_is", "grpo_clip"])
def test_arm_overrides_compose_through_the_launcher(arm, capsys):
    """Hydra must read the quoted module list as one string, and pg_is's delta as a number (no mask)."""
    from dppo_verl.train import main

    _, loss, extra = study.arm_settings(arm)
    head = [f"actor.policy_loss={loss}"] if loss != "vanilla" else [
        "actor_rollout_ref.actor.policy_loss.loss_mode=vanilla"]
    assert main([*head, *extra, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "VERL_USE_EXTERNAL_MODULES: dppo_verl.plugin,dppo_verl.demo.perturb" in out
    if arm == "pg_is":
        assert "delta_low: 1000000.0" in out and "delta_high: 1000000.0" in out


def test_summarize_and_rolling_mean(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with open(path, "w") as f:
        f.write(json.dumps({"step": 0, "data": {"val-core/x/acc/mean@1": 0.3}}) + "\n")  # validation only
        for step in range(1, 11):
            f.write(json.dumps({"step": step, "data": {report.REWARD: step / 10, report.CLIPFRAC: 0.02,
                                                       report.PROBS_DIFF: 0.001 * step}}) + "\n")
    s = study.summarize(str(path))
    assert s["steps"] == 10 and s["reward_first5"] == 0.3 and s["reward_last5"] == 0.8
    assert s["probs_diff_mean"] == 0.0055 and s["probs_diff_max_step"] == 0.01
    assert s["masked_or_clipped_frac_mean"] == 0.02
    assert report.rolling_mean([1, 2, 3, 4], 2) == [1, 1.5, 2.5, 3.5]


def test_run_study_reports_to_the_end(tmp_path, monkeypatch, capsys):
    """run_study's own reporting (figure, summary.json, per-arm lines) runs to the end and returns; the training
    runs are stood in for by metrics files (what run_demo leaves), so this takes seconds."""
    def fake_run_demo(*, loss, run_name, runs_dir, **kw):
        run_dir = os.path.join(runs_dir, run_name)
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
            for step in range(1, 7):
                f.write(json.dumps({"step": step, "data": {report.REWARD: 0.1 * step, report.CLIPFRAC: 0.05,
                                                           report.PROBS_DIFF: 0.003}}) + "\n")
        return {"plot": os.path.join(run_dir, f"{run_name}.png"), "wall_s": 1.0}

    monkeypatch.setattr(study, "run_demo", fake_run_demo)
    monkeypatch.setattr(study, "_ray_stop", lambda: None)
    summary = study.run_study(["pg_is", "grpo_clip"], steps=6, noise=0.0, runs_dir=str(tmp_path))
    out = tmp_path / "study-noise0-s6-seed0"
    assert (out / "study.png").stat().st_size > 10_000 and json.loads((out / "summary.json").read_text())["steps"] == 6
    assert summary["arms"]["pg_is"]["reward_last5"] == pytest.approx(0.4)  # mean of steps 2..6 = 0.2..0.6
    assert "figure " + str(out / "study.png") in capsys.readouterr().out


def test_arms_all_runs_every_arm_in_order(monkeypatch):
    """``--arms all`` (``make study ARMS=all``) is every arm in the study's order; mixed with names it is refused."""
    seen = []
    monkeypatch.setattr(study, "run_seeds", lambda arms, seeds, **kw: seen.append((arms, seeds)))
    study.main(["--arms", "all", "--seeds", "0", "1"])
    assert seen == [(list(study.ARMS), [0, 1])] and len(study.ARMS) == 6
    with pytest.raises(SystemExit):
        study.main(["--arms", "all", "pg_is"])


def test_run_study_under_colocate_async_passes_the_trainer(tmp_path, monkeypatch):
    """TRAINER=colocate_async reaches every arm's run (and WARMUP its warm-up batches); the tag and summary say so."""
    calls = []

    def fake_run_demo(*, loss, run_name, runs_dir, trainer, extra_overrides, **kw):
        calls.append((trainer, extra_overrides))
        run_dir = os.path.join(runs_dir, run_name)
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
            for step in range(1, 4):
                f.write(json.dumps({"step": step, "data": {report.REWARD: 0.1, report.STALENESS: step % 3}}) + "\n")
        return {"plot": os.path.join(run_dir, "p.png"), "wall_s": 1.0, "staleness_max": 2}

    monkeypatch.setattr(study, "run_demo", fake_run_demo)
    monkeypatch.setattr(study, "_ray_stop", lambda: None)
    summary = study.run_study(["dppo_topk", "grpo_clip"], steps=3, noise=0.0, runs_dir=str(tmp_path),
                              trainer="colocate_async", warmup_batches=2)
    assert [c[0] for c in calls] == ["colocate_async"] * 2
    assert all("trainer.v1.colocate_async.num_warmup_batches=2" in c[1] for c in calls)
    assert summary["tag"] == "study-colocate_async-w2-noise0-s3-seed0" and summary["trainer"] == "colocate_async"
    assert summary["arms"]["dppo_topk"]["staleness_max"] == 2
    with pytest.raises(SystemExit):  # warm-up batches without the async trainer: refused
        study.main(["--warmup-batches", "2"])


def test_run_seeds_draws_mean_and_spread(tmp_path, monkeypatch, capsys):
    """``--seeds``: one study per seed; per arm the mean and min-max across seeds of each number, and a figure. Training
    runs are stood in for by metrics files whose reward depends on the seed, so the spread is known."""
    def fake_run_demo(*, loss, run_name, runs_dir, seed, **kw):
        run_dir = os.path.join(runs_dir, run_name)
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
            for step in range(1, 7):
                f.write(json.dumps({"step": step, "data": {report.REWARD: 0.1 * step + 0.01 * seed,
                                                           report.MASKED: 0.05 + 0.01 * seed,
                                                           study.MASKED_AT_START: 0.5}}) + "\n")
        return {"plot": os.path.join(run_dir, f"{run_name}.png"), "wall_s": 1.0}

    monkeypatch.setattr(study, "run_demo", fake_run_demo)
    monkeypatch.setattr(study, "_ray_stop", lambda: None)
    summary = study.run_seeds(["dppo_topk", "dppo_topk_old"], [0, 2], steps=6, noise=0.2, runs_dir=str(tmp_path))
    out = tmp_path / "study-noise0.2-s6-seeds0_2"
    assert (out / "study_seeds.png").stat().st_size > 10_000
    saved = json.loads((out / "summary.json").read_text())
    r = saved["arms"]["dppo_topk_old"]["reward_last5"]
    assert r["per_seed"] == [pytest.approx(0.4), pytest.approx(0.42)]
    assert (r["mean"], r["min"], r["max"], r["n"]) == (pytest.approx(0.41), pytest.approx(0.4), pytest.approx(0.42), 2)
    assert saved["arms"]["dppo_topk"]["masked_at_start_frac_mean"]["mean"] == 0.5
    assert saved["arms"]["dppo_topk"]["reward_gain"]["per_seed"] == [pytest.approx(0.1), pytest.approx(0.1)]  # 0.4 - 0.3
    assert summary["seeds"] == [0, 2] and "dppo_topk_old" in capsys.readouterr().out
    _, loss, extra = study.arm_settings("dppo_topk_old")
    assert loss == "dppo_tv_topk" and "actor.policy_loss.anchor=old" in extra
    # seeds run apart (their own one-seed studies) combine into the same summary
    again = study.combine([str(tmp_path / "study-noise0.2-s6-seed0"), str(tmp_path / "study-noise0.2-s6-seed2")],
                          runs_dir=str(tmp_path / "combined"))
    assert again["arms"]["dppo_topk_old"]["reward_last5"] == summary["arms"]["dppo_topk_old"]["reward_last5"]
    with pytest.raises(ValueError, match="'dppo_topk' of seed 0 is in two studies"):
        study.combine([str(tmp_path / "study-noise0.2-s6-seed0")] * 2)


def test_combine_merges_arms_run_apart_and_writes_the_table(tmp_path, monkeypatch):
    """Arms of one seed run in separate studies merge into that seed (in the study's arm order); the seed summary is
    the one of a single run of every arm; a seed missing an arm is refused; ``summary.md`` holds the README table."""
    def fake_run_demo(*, loss, run_name, runs_dir, seed, **kw):
        run_dir = os.path.join(runs_dir, run_name)
        os.makedirs(run_dir, exist_ok=True)
        offset = {"dppo_topk": 0.0, "dppo_topk_old": 0.05}[run_name]
        with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
            for step in range(1, 7):
                f.write(json.dumps({"step": step, "data": {report.REWARD: 0.1 * step + 0.01 * seed + offset * step,
                                                           report.MASKED: 0.05}}) + "\n")
        return {"plot": os.path.join(run_dir, f"{run_name}.png"), "wall_s": 2.0}

    monkeypatch.setattr(study, "run_demo", fake_run_demo)
    monkeypatch.setattr(study, "_ray_stop", lambda: None)
    both = study.run_seeds(["dppo_topk", "dppo_topk_old"], [0, 1], steps=6, noise=0.0, runs_dir=str(tmp_path / "both"))
    apart = {}
    for arm in ("dppo_topk_old", "dppo_topk"):  # run in the reverse of the study's order
        for seed in (0, 1):
            apart[arm, seed] = study.run_study([arm], steps=6, noise=0.0, seed=seed, runs_dir=str(tmp_path / arm))
    dirs = [str(tmp_path / arm / f"study-noise0-s6-seed{seed}") for arm, seed in apart]
    merged = study.combine(dirs, runs_dir=str(tmp_path / "merged"))
    assert list(merged["arms"]) == ["dppo_topk", "dppo_topk_old"]
    for arm in ("dppo_topk", "dppo_topk_old"):
        for key in ("reward_first5", "reward_last5", "reward_gain"):
            assert merged["arms"][arm][key] == both["arms"][arm][key], (arm, key)
    # reward 0.15 t (+0.01 seed) for the old-anchored arm: first 5 steps 0.45, last 5 (steps 2..6) 0.60
    assert merged["arms"]["dppo_topk_old"]["reward_gain"]["mean"] == pytest.approx(0.15)
    table = (tmp_path / "merged" / "study-noise0-s6-seeds0_1" / "summary.md").read_text().splitlines()
    assert table[0].startswith("| arm | reward s0 / s1 |") and len(table) == 4
    assert table[3].startswith("| DPPO Top-K TV, decoupled (pi_old) | 0.450 -> 0.600 / 0.460 -> 0.610 | +0.150 / +0.150 | **+0.150**")
    with pytest.raises(ValueError, match=r"arms per seed 0: \['dppo_topk', 'dppo_topk_old'\], 1: \['dppo_topk_old'\]"):
        study.combine(dirs[:3], runs_dir=str(tmp_path / "short"))
