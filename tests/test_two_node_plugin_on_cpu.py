"""Three Ray nodes on this machine (loopback). The second starts from a clean environment (``env -i``, its own temp
dir), so it inherits nothing from the driver: the DPPO modes must still be registered in its workers (verl loads the
plugin through its entry point on ``import verl``). The third runs a second Python environment that really lacks the
plugin (an overlay venv over the same site-packages without the editable install or its metadata): there a DPPO
lookup fails loudly, and with the launcher's ``VERL_USE_EXTERNAL_MODULES=dppo_verl.plugin`` already ``import verl``
does. A worker told another driver version refuses DPPO, naming both versions.

Cleanup uses ``ray stop --force``, which stops every Ray node on this machine: run it in CI or a sandbox, not beside
a Ray job you care about."""

import glob
import json
import os
import site
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
def probe():
    import importlib.util, os
    import verl
    from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY, get_policy_loss_fn
    out = {"node": ray.get_runtime_context().get_node_id(), "env_marker": os.environ.get("DRIVER_ONLY_MARKER"),
           "has_pkg": importlib.util.find_spec("dppo_verl") is not None,
           "modes": sorted(k for k in POLICY_LOSS_REGISTRY if k.startswith("dppo_") and k.count("_") == 2)}
    try:
        get_policy_loss_fn("dppo_tv_topk")
        out["lookup"] = "ok"
    except ValueError as e:
        out["lookup"] = "error: " + str(e)[:80]
    return out


@ray.remote(num_cpus=0.1)
def import_verl():
    try:
        import verl  # noqa: F401
        return "imported"
    except Exception as e:
        return f"{type(e).__name__}: {e}"


@ray.remote(num_cpus=0.1)
def dppo_refusal():
    import verl  # noqa: F401
    from dppo_verl.integrations.patching import PatchDrift, raise_if_drifted
    try:
        raise_if_drifted(("dppo",), "dppo_tv_topk")
        return "no error"
    except PatchDrift as e:
        return str(e)


res = {}
for name in ("head", "second", "bare"):
    res[name] = ray.get(probe.options(resources={name + "_node": 0.01}).remote())
res["bare_with_launcher_env"] = ray.get(import_verl.options(
    resources={"bare_node": 0.01}, runtime_env={"env_vars": {"VERL_USE_EXTERNAL_MODULES": "dppo_verl.plugin"}}).remote())
res["version_mismatch"] = ray.get(dppo_refusal.options(
    resources={"second_node": 0.01}, runtime_env={"env_vars": {"DPPO_VERL_DRIVER_VERSION": "0.0.0"}}).remote())
print("RESULT " + json.dumps(res))
'''


def _overlay_venv(root: str) -> str:
    """A venv whose site-packages links every entry of this one except dppo_verl's (editable finder, .pth, metadata):
    the same verl, torch and Ray, no plugin. Returns its python."""
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", "--without-pip", root], check=True, timeout=120)
    (src,) = [p for p in site.getsitepackages() if p.startswith(sys.prefix)]
    (dst,) = glob.glob(os.path.join(root, "lib", "python3*", "site-packages"))
    for name in os.listdir(src):
        if "dppo_verl" not in name:
            os.symlink(os.path.join(src, name), os.path.join(dst, name))
    return os.path.join(root, "bin", "python")


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node(python_cmd, addr, name, tmp):
    # clean environment: no PATH from the driver beyond the system's, no PYTHONPATH, no VERL_*/marker variables
    return ["env", "-i", f"HOME={os.environ.get('HOME', '/root')}", "PATH=/usr/bin:/bin", "RAY_USAGE_STATS_ENABLED=0",
            "RAY_AUTH_MODE=disabled", *python_cmd, "start", f"--address={addr}", "--node-ip-address=127.0.0.1",
            "--num-cpus=1", "--num-gpus=0", f"--temp-dir={tmp}", f'--resources={{"{name}_node": 1}}',
            "--disable-usage-stats"]


@pytest.mark.timeout(600)
def test_plugin_on_every_node_and_loud_where_missing():
    port = _port()
    addr = f"127.0.0.1:{port}"
    bare_python = _overlay_venv(tempfile.mkdtemp(prefix="venv_bare"))
    ray_cli = [bare_python, "-c", "import sys; from ray.scripts.scripts import main; sys.argv[0] = 'ray'; sys.exit(main())"]
    # Ray >= 2.60 turns token auth on for any cluster once ~/.ray/auth_token exists (a local ray.init(), e.g. the demo
    # smoke test, writes it): pin the mode on every process so the test does not depend on what ran before.
    env = {**os.environ, "DRIVER_ONLY_MARKER": "1", "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    head = [RAY, "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=1", "--num-gpus=0",
            "--include-dashboard=false", f"--temp-dir={tempfile.mkdtemp(prefix='rh')}", '--resources={"head_node": 1}',
            "--disable-usage-stats"]
    try:
        subprocess.run(head, check=True, env=env, capture_output=True, timeout=180)
        for node in (_node([RAY], addr, "second", tempfile.mkdtemp(prefix="rn")),
                     _node(ray_cli, addr, "bare", tempfile.mkdtemp(prefix="rb"))):
            r = subprocess.run(node, capture_output=True, text=True, timeout=180)
            assert r.returncode == 0, r.stdout + r.stderr
        time.sleep(2)
        # cwd="/": Ray must not find dppo_verl through the driver's directory
        d = subprocess.run([sys.executable, "-c", DRIVER, addr], capture_output=True, text=True, env=env, timeout=300,
                           cwd="/")
        assert d.returncode == 0, d.stdout[-2000:] + d.stderr[-4000:]
        res = json.loads(next(line for line in d.stdout.splitlines() if line.startswith("RESULT "))[7:])
    finally:
        subprocess.run([RAY, "stop", "--force"], capture_output=True, timeout=120)
    modes = ["dppo_kl_binary", "dppo_kl_topk", "dppo_tv_binary", "dppo_tv_topk"]
    assert len({res[n]["node"] for n in ("head", "second", "bare")}) == 3  # really three nodes
    assert res["second"]["env_marker"] is None  # the second node did not inherit the driver's environment
    for name in ("head", "second"):
        assert res[name]["modes"] == modes and res[name]["lookup"] == "ok", res[name]
    assert res["bare"]["has_pkg"] is False, res  # the overlay environment really lacks the plugin
    assert res["bare"]["modes"] == [] and res["bare"]["lookup"].startswith("error: Unsupported loss mode: dppo_tv_topk")
    assert res["bare_with_launcher_env"].startswith("ModuleNotFoundError: No module named 'dppo_verl'"), res
    import dppo_verl

    assert f"dppo_verl {dppo_verl.__version__} on this node" in res["version_mismatch"], res["version_mismatch"]
    assert "driver's dppo_verl 0.0.0" in res["version_mismatch"]
