"""benchmarks/bench_actor_step.py --smoke: verl's real FSDP2 actor step per loss mode, at toy sizes (V = 2048 and
256, 16 response tokens). A plumbing test: the JSON carries every key the issue asks for, stamped with machine,
torch and commit, and each number is finite and positive. No speed target is checked here (never in tests)."""

import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = ("topk_over_binary", "topk_over_binary_small_vocab", "binary_over_vanilla", "peak_mem_topk_over_binary",
        "topk_over_binary_min", "topk_over_binary_small_vocab_min", "topk_floor_over_binary_small_vocab",
        "topk_over_floor_small_vocab")
MODES = ("vanilla", "dppo_tv_binary", "dppo_tv_topk")


@pytest.mark.timeout(900)
def test_bench_actor_step_smoke(tmp_path):
    out = tmp_path / "actor_step.json"
    res = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_actor_step.py"), "--smoke",
                          "--out", str(out)], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    line = json.loads(res.stdout.strip().splitlines()[-1])  # --quick/--smoke print one JSON line last
    for key in KEYS:
        assert math.isfinite(line[key]) and line[key] > 0, (key, line)
    assert math.isfinite(line["host_syncs_per_microbatch"]) and line["host_syncs_per_microbatch"] >= 0
    doc = json.loads(out.read_text())
    assert doc["commit"] and doc["machine"]["torch"] and doc["sizes"]["response_tokens"] == 16
    assert doc["summary"] == {k: v for k, v in line.items() if k in doc["summary"]}
    small = doc["results"][str(doc["sizes"]["vocabs"][1])]["timing"]["median_s"]
    assert small["dppo_tv_topk_free_hook"] > 0  # the floor mode: small vocabulary only
    for vocab, r in doc["results"].items():
        for mode in MODES:
            assert r["timing"]["median_s"][mode] > 0 and len(r["timing"]["times_s"][mode]) == doc["sizes"]["reps"]
    full = doc["results"][str(doc["sizes"]["vocabs"][0])]
    for mode in MODES:
        assert full["memory"][mode]["step_peak_rise_mib"] > 0
    phases = doc["phases_s"]  # where the wall time went, so a slow --quick can be told apart by phase
    assert set(phases) == {"build_s", "timing_s", "memory_s"} and all(v > 0 for v in phases.values())
    assert sum(phases.values()) <= doc["wall_s"] + 0.5  # rounded to 0.1 s each
    est = doc["qwen3_8b_estimate"]
    assert est["gemm_gflops"] > 0 and est["qwen3_8b_step_us_per_token"] > 0
    for stat in ("median", "fastest"):
        assert set(est[stat]["us_per_token"]) == set(MODES)
        assert all(math.isfinite(v) for v in est[stat]["est_overhead_vs_qwen3_8b_step"].values())


def test_paired_ratio_is_the_median_of_per_round_ratios():
    """Rounds where the machine was slow for every mode (round 2) do not tilt the ratio; the medians' ratio would."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from bench_actor_step import paired_ratio

    times = {"a": [1.0, 2.0, 1.2, 1.1, 2.2], "b": [0.9, 1.9, 1.0, 1.0, 2.0]}
    # per round: 1.111, 1.0526, 1.2, 1.1, 1.1 -> median 1.1 (medians 1.2 / 1.0 = 1.2)
    assert paired_ratio(times, "a", "b") == pytest.approx(1.1, abs=1e-12)
