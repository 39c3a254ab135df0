"""Two Ray nodes on this machine (loopback); the second started from a clean environment (``env -i``, its own
temp dir), so it inherits nothing from the driver. The DPPO modes must be registered in worker processes on
both nodes (verl loads the plugin through its entry point on ``import verl``), and a worker where the plugin is
not loaded must fail loudly at the first DPPO lookup.

Cleanup uses ``ray stop --force``, which stops every Ray node on this machine: run it in CI or a sandbox, not beside
a Ray job you care about."""

import json
import os
import socket
import subprocess
import sys
import tempfile
import time

import pytest

VENV_BIN = os.path.dirname(sys.executable)
RAY = os.path.join(VENV_BIN, "ray")

DRIVER = r'''
import json, sys, ray
ray.init(address=sys.argv[1], log_to_driver=False)

@ray.remote(num_cpus=0.1)
def probe(disable_plugin):
    import os, socket
    if disable_plugin:
        os.environ["VERL_USE_EXTERNAL_PLUGINS"] = "none"
    import verl
    from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY, get_policy_loss_fn
    out = {"node": ray.get_runtime_context().get_node_id(), "env_marker": os.environ.get("DRIVER_ONLY_MARKER"),
           "modes": sorted(k for k in POLICY_LOSS_REGISTRY if k.startswith("dppo_") and k.count("_") == 2)}
    try:
        get_policy_loss_fn("dppo_tv_topk")
        out["lookup"] = "ok"
    except ValueError as e:
        out["lookup"] = "error: " + str(e)[:80]
    return out

res = {}
for name, res_name in (("head", "head_node"), ("second", "second_node")):
    res[name] = ray.get(probe.options(resources={res_name: 0.01}).remote(False))
# a fresh worker process with the plugin switched off (what a node without dppo_verl looks like)
res["disabled"] = ray.get(probe.options(resources={"second_node": 0.01},
                                        runtime_env={"env_vars": {"VERL_USE_EXTERNAL_PLUGINS": "none"}}).remote(True))
print("RESULT " + json.dumps(res))
'''


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(600)
def test_plugin_active_on_both_nodes():
    port = _port()
    head_tmp, node_tmp = tempfile.mkdtemp(prefix="rh"), tempfile.mkdtemp(prefix="rn")
    addr = f"127.0.0.1:{port}"
    # Ray >= 2.60 turns token auth on for any cluster once ~/.ray/auth_token exists (a local ray.init(), e.g. the demo
    # smoke test, writes it): pin the mode on all three processes so the test does not depend on what ran before.
    env = {**os.environ, "DRIVER_ONLY_MARKER": "1", "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    head = [RAY, "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=1", "--num-gpus=0",
            "--include-dashboard=false", f"--temp-dir={head_tmp}", '--resources={"head_node": 1}', "--disable-usage-stats"]
    # clean environment: no PATH from the driver beyond the system's, no PYTHONPATH, no VERL_*/marker variables
    second = ["env", "-i", f"HOME={os.environ.get('HOME', '/root')}", "PATH=/usr/bin:/bin", "RAY_USAGE_STATS_ENABLED=0",
              "RAY_AUTH_MODE=disabled",
              RAY, "start", f"--address={addr}", "--node-ip-address=127.0.0.1", "--num-cpus=1", "--num-gpus=0",
              f"--temp-dir={node_tmp}", '--resources={"second_node": 1}', "--disable-usage-stats"]
    try:
        subprocess.run(head, check=True, env=env, capture_output=True, timeout=180)
        r = subprocess.run(second, capture_output=True, text=True, timeout=180)
        assert r.returncode == 0, r.stdout + r.stderr
        time.sleep(2)
        d = subprocess.run([sys.executable, "-c", DRIVER, addr], capture_output=True, text=True, env=env, timeout=300)
        assert d.returncode == 0, d.stdout[-2000:] + d.stderr[-4000:]
        res = json.loads(next(line for line in d.stdout.splitlines() if line.startswith("RESULT "))[7:])
    finally:
        subprocess.run([RAY, "stop", "--force"], capture_output=True, timeout=120)
    modes = ["dppo_kl_binary", "dppo_kl_topk", "dppo_tv_binary", "dppo_tv_topk"]
    assert res["head"]["node"] != res["second"]["node"]  # really two nodes
    assert res["second"]["env_marker"] is None  # the second node did not inherit the driver's environment
    for name in ("head", "second"):
        assert res[name]["modes"] == modes and res[name]["lookup"] == "ok", res[name]
    assert res["disabled"]["modes"] == [] and res["disabled"]["lookup"].startswith("error: Unsupported loss mode: dppo_tv_topk")
