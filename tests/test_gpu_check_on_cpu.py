"""benchmarks/gpu_check.sh --dry-run on the CPU: the one-call GPU check runs end to end and leaves a well-formed
JSON and text summary (its GPU-only parts skipped with a message). A plumbing test: no number here is checked
against a target, only that each stage reported. The minimal test runner is the one used (a bare CUDA image has
no pytest), so its collection of the GPU test files (marks, parametrize, skipif) is what is checked."""

import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.timeout(900)
def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "gpu_check"
    env = {**os.environ, "PYTHON": sys.executable}
    res = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh"), str(out), "--dry-run",
                          "--runner", "mini"], capture_output=True, text=True, cwd=ROOT, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    doc = json.loads((out / "gpu_check.json").read_text())
    text = (out / "gpu_check.txt").read_text()
    assert doc["dry_run"] is True and doc["device"] == "cpu" and doc["environment"]["commit"]
    # every GPU test was collected (11 cases in the two files) and skipped itself on the CPU, none failed
    counts = doc["tests"]["counts"]
    assert doc["tests"]["ok"] and counts["failed"] == 0 and counts["skipped"] >= 11 and counts["passed"] == 0
    assert all(v.startswith("skipped: needs a CUDA GPU") for v in doc["tests"]["outcomes"].values())
    syncs = doc["syncs"]
    assert set(syncs["dispatch_counter"]) == {"build_support", "gather_compile", "divergence+status"}
    assert syncs["cuda_sync_debug"] is None and "no CUDA device" in syncs["cuda_sync_debug_skipped"]
    bench = doc["bench"]
    got = {r["provider"] for r in bench["results"]}
    assert got == {"dppo", "read_floor"}, bench
    assert any("skipping ['triton', 'fused_fwbw']" in n for n in bench["notes"]), bench["notes"]
    for r in bench["results"]:
        assert r["median_ms"] > 0 and math.isfinite(r["median_ms"]) and r["extra_mib"] >= 0 and r["N"] == 64
    assert "DRY RUN" in text and "empty_cache" in text and "syncs gather_compile" in text and "bench bfloat16 N=64" in text
