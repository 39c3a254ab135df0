"""Do no harm: installing dppo_verl never changes a verl run that does not use DPPO.

- the platform verl picks is the same with and without the plugin unless the CPU platform is asked for;
- a real FSDP ``update_actor`` with verl's own ``vanilla`` and ``dppo_tv`` losses is bitwise identical with the whole
  plugin installed and with only the CPU platform applied (verl cannot run its FSDP engine here without it);
- a drifted verl internal disables DPPO loudly (symbol, signature, verl version) and leaves plain verl running;
- stock ``python -m verl.trainer.main_ppo`` refuses a bad DPPO config before Ray starts, naming the key;
- ``dppo_verl.ops`` imports and computes with verl and megatron unimportable; no 3.11-only API anywhere.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import threading

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"


def _env(**kw):
    env = {k: v for k, v in os.environ.items() if k not in ("VERL_PLATFORM", "VERL_ENGINE_DEVICE")}
    env.update({k: v for k, v in kw.items() if v is not None})
    return env


def _py(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", env=_env(**env),
                          timeout=300)


# ---- platform ---------------------------------------------------------------------------------------------------

PLATFORM_PROBE = (
    "import os, sys, torch\n"
    "if len(sys.argv) > 1: torch.version.cuda = '12.8'  # a CUDA build of torch on a host without nvidia-smi\n"
    "import verl\n"
    "from verl.utils.device import get_device_name\n"
    "print('RESULT', get_device_name(), os.environ.get('VERL_PLATFORM'), 'dppo_verl.plugin' in sys.modules)\n"
)


@pytest.mark.parametrize("torch_build", ["cpu", "cuda-without-nvidia-smi"])
def test_platform_is_verls_choice_unless_asked(torch_build):
    args = [] if torch_build == "cpu" else ["cuda"]

    def probe(**env):
        r = subprocess.run([sys.executable, "-c", PLATFORM_PROBE, *args], capture_output=True, text=True, cwd="/",
                           env=_env(**env), timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        return next(line for line in r.stdout.splitlines() if line.startswith("RESULT")).split()[1:]

    with_plugin, without = probe(), probe(VERL_USE_EXTERNAL_PLUGINS="none")
    assert with_plugin[2] == "True" and without[2] == "False"  # the plugin really was (not) loaded
    assert with_plugin[:2] == without[:2] == ["cuda", "None"]  # verl's own fallback, untouched
    assert probe(VERL_PLATFORM="cpu")[:2] == ["cpu", "cpu"]  # asked for: selected


# ---- the patch helper -------------------------------------------------------------------------------------------


def _fresh_target():
    class Engine:
        def train_batch(self, data, loss_function):
            return ("orig", data)

    return Engine


def _tag(orig):
    def train_batch(self, data, loss_function):
        return ("wrapped", orig(self, data, loss_function))

    return train_batch


def test_patch_attr_checks_signature_and_records_drift(monkeypatch):
    from dppo_verl.integrations import patching

    monkeypatch.setattr(patching, "APPLIED", {})
    ok = _fresh_target()
    assert patching.patch_attr(ok, "train_batch", _tag, name="t.ok", signature="self, data, loss_function")
    assert ok().train_batch(1, None) == ("wrapped", ("orig", 1)) and patching.APPLIED["t.ok"].ok

    resigned = _fresh_target()
    orig = resigned.train_batch
    resigned.train_batch = lambda self, data, loss_function, extra=None: orig(self, data, loss_function)
    before = resigned.train_batch
    assert not patching.patch_attr(resigned, "train_batch", _tag, name="t.resigned", signature="self, data, loss_function",
                                   needed_by="topk")
    assert resigned.train_batch is before  # left alone
    renamed = _fresh_target()
    renamed.train_batch_v2 = renamed.train_batch
    del renamed.train_batch
    assert not patching.patch_attr(renamed, "train_batch", _tag, name="t.renamed", signature="self, data, loss_function")
    assert not hasattr(renamed, "train_batch")
    with pytest.raises(patching.PatchDrift) as e:
        patching.raise_if_drifted(("dppo", "topk"), "dppo_tv_topk")
    msg = str(e.value)
    assert "t.resigned" in msg and "(self, data, loss_function, extra=), expected (self, data, loss_function)" in msg
    assert "t.renamed" in msg and "does not exist" in msg and "verl==0.9.1" in msg
    patching.raise_if_drifted(("cpu",), "something else")  # drift of other kinds does not concern it


def test_patch_attr_is_idempotent_and_thread_safe(monkeypatch):
    from dppo_verl.integrations import patching

    monkeypatch.setattr(patching, "APPLIED", {})
    target = _fresh_target()
    barrier = threading.Barrier(8)

    def patch():
        barrier.wait()
        patching.patch_attr(target, "train_batch", _tag, name="t.race", signature="self, data, loss_function")

    threads = [threading.Thread(target=patch) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert target().train_batch(2, None) == ("wrapped", ("orig", 2))  # wrapped exactly once


def test_import_hook_is_thread_safe(tmp_path, monkeypatch):
    """Eight threads import a module with a pending patch at once: the patch runs once, ``sys.meta_path`` never
    loses the finder (the old hook removed itself while searching), and the module is the patched one."""
    from dppo_verl.integrations import patching

    pkg = tmp_path / "dnh_hookpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "target.py").write_text("import time\ntime.sleep(0.2)\nVALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    calls, seen_meta = [], []
    patching.when_imported("dnh_hookpkg.target", lambda m: calls.append(m.VALUE))
    barrier = threading.Barrier(8)

    def imp():
        barrier.wait()
        seen_meta.append(patching._FINDER in sys.meta_path)
        import dnh_hookpkg.target  # noqa: F401

    threads = [threading.Thread(target=imp) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == [1] and all(seen_meta) and patching._FINDER in sys.meta_path


# ---- verl's FSDP engine, bitwise -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tiny_model import build_tiny_model

    path = str(tmp_path_factory.mktemp("dnh") / "model")
    build_tiny_model(path)
    return path


def _step(model_dir, tmp_path, loss, plugin="full", drift=None):
    out = tmp_path / f"{loss}-{plugin}-{drift}.pt"
    cmd = [sys.executable, str(TESTS / "fsdp_step.py"), "--model", model_dir, "--loss", loss, "--out", str(out),
           "--plugin", plugin] + (["--drift", drift] if drift else [])
    env = _env(VERL_PLATFORM="cpu", VERL_USE_EXTERNAL_PLUGINS="none" if plugin == "cpu-only" else None)
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return torch.load(out, weights_only=False)


@pytest.mark.timeout(900)
@pytest.mark.parametrize("loss", ["vanilla", "dppo_tv"])  # verl's own PPO clip, and verl's own (binary) DPPO TV
def test_non_dppo_losses_are_bitwise_identical_with_the_plugin(model_dir, tmp_path, loss):
    full, bare = _step(model_dir, tmp_path, loss), _step(model_dir, tmp_path, loss, plugin="cpu-only")
    assert full["error"] is None and bare["error"] is None, (full["error"], bare["error"])
    assert full["applied"]["actor.ppo_loss"][0] and full["applied"]["actor.train_batch_topk_flag"][0]
    assert "actor.ppo_loss" not in bare["applied"]  # the bare run really had no plugin patches
    assert full["metrics"] == bare["metrics"], (full["metrics"], bare["metrics"])  # loss, grad norm, every metric
    assert full["metrics"]["grad_norm"][0] > 0
    assert full["params"].keys() == bare["params"].keys()
    for key, value in full["params"].items():
        assert torch.equal(value, bare["params"][key]), key  # the optimizer step, bitwise
    from safetensors.torch import load_file

    init = load_file(os.path.join(model_dir, "model.safetensors"))
    assert any(not torch.equal(full["params"][k], init[k]) for k in init if k in full["params"])  # a real step


@pytest.mark.timeout(900)
def test_drifted_verl_disables_dppo_not_verl(model_dir, tmp_path):
    """verl's ``ppo_loss`` with another signature: the plugin leaves it alone, plain verl trains exactly as without
    the plugin, and a DPPO mode fails naming the symbol, both signatures and the installed verl."""
    drifted = _step(model_dir, tmp_path, "vanilla", plugin="cpu-only", drift="ppo_loss")
    bare = _step(model_dir, tmp_path, "vanilla", plugin="cpu-only")
    assert drifted["error"] is None and drifted["metrics"] == bare["metrics"]
    assert drifted["applied"]["actor.ppo_loss"][0] is False
    dppo = _step(model_dir, tmp_path, "dppo_tv_binary", plugin="cpu-only", drift="ppo_loss")
    assert dppo["error"] is not None and dppo["error"].startswith("PatchDrift: dppo_tv_binary cannot run")
    for part in ("verl.workers.utils.losses.ppo_loss", "(config, model_output, data, dp_group=, new_arg=)",
                 "expected (config, model_output, data, dp_group=)", "installed verl 0.9.1"):
        assert part in dppo["error"], dppo["error"]


# ---- stock main_ppo: refused before Ray ------------------------------------------------------------------------

STOCK = ["algorithm.adv_estimator=grpo", "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
         "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=2",
         "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=2"]


@pytest.mark.parametrize("overrides,key", [
    (["actor_rollout_ref.actor.policy_loss.loss_mode=dppo_tv_topk"], r"+actor_rollout_ref.rollout.custom.dppo_num_topk=20"),
    (["actor_rollout_ref.actor.policy_loss.loss_mode=dppo_tv_binary", "algorithm.rollout_correction.rollout_is=token"],
     "algorithm.rollout_correction.rollout_is=null"),
    (["actor_rollout_ref.actor.policy_loss.loss_mode=dppo_kl_binary", "trainer.use_v1=False",
      "algorithm.rollout_correction.bypass_mode=True"], "algorithm.rollout_correction.bypass_mode=False"),
])
def test_stock_main_ppo_refuses_before_ray(model_dir, overrides, key):
    cmd = [sys.executable, "-m", "verl.trainer.main_ppo", f"actor_rollout_ref.model.path={model_dir}", *STOCK, *overrides]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd="/tmp", env=_env(), timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode != 0 and "dppo_verl: unsupported configuration" in out and key in out, out[-3000:]
    assert "ray init kwargs" not in out  # run_ppo never reached ray.init


# ---- packaging ---------------------------------------------------------------------------------------------------

BLOCK = (
    "import sys, importlib.abc\n"
    "class Block(importlib.abc.MetaPathFinder):\n"
    "    def find_spec(self, name, path=None, target=None):\n"
    "        if name.split('.')[0] in ('verl', 'megatron', 'vllm', 'ray'):\n"
    "            raise ImportError('blocked: ' + name)\n"
    "sys.meta_path.insert(0, Block())\n"
)


def test_ops_import_and_run_without_verl():
    code = BLOCK + (
        "import torch\n"
        "import dppo_verl, dppo_verl.ops\n"
        "from dppo_verl.ops.vocab_parallel import vocab_parallel_logprobs\n"
        "from dppo_verl.ops.divergence import get_divergence\n"
        "from dppo_verl.ops.support import build_support\n"
        "z = torch.randn(5, 33, dtype=torch.float64); ids = torch.randint(0, 33, (5, 3))\n"
        "got = vocab_parallel_logprobs(z.float(), ids, backend='eager').double()\n"
        "want = torch.log_softmax(z, -1).gather(-1, ids)\n"
        "assert (got - want).abs().max() < 1e-5, (got - want).abs().max()\n"
        "print('OK', [m for m in sys.modules if m.split('.')[0] in ('verl', 'megatron')])\n"
    )
    r = _py(code)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == "OK []"
    r = _py(BLOCK + "import dppo_verl.plugin\n")
    assert r.returncode != 0 and "blocked: verl" in r.stderr  # the plugin module is the one that needs verl


def test_no_python_3_11_only_api():
    """``requires-python = ">=3.10"``: vermin finds no construct newer than 3.10 in the package or the benchmarks
    (it does catch ``asyncio.create_task(..., context=)``, the 3.11-only call the vLLM patch used to make)."""
    vermin = pathlib.Path(sys.executable).parent / "vermin"
    r = subprocess.run([str(vermin), "-t=3.10-", "--violations", "--no-tips", "dppo_verl", "benchmarks"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0 and "Target versions not met" not in r.stdout, r.stdout[-3000:]
    bad = pathlib.Path(os.environ.get("TMPDIR", "/tmp")) / "dnh_vermin_canary.py"
    bad.write_text("import asyncio\n\nasync def f(c, x):\n    return asyncio.create_task(c, context=x)\n")
    r = subprocess.run([str(vermin), "-t=3.10-", "--violations", "--no-tips", str(bad)], capture_output=True, text=True)
    assert r.returncode != 0 and "3.11" in r.stdout  # the analyser can fail


def test_node_with_another_plugin_version_refuses_dppo_naming_both():
    code = (
        "import verl, torch\n"
        "from verl.trainer.ppo.core_algos import get_policy_loss_fn\n"
        "import sys; sys.path.insert(0, %r)\n"
        "from conftest import make_actor_config\n"
        "from verl.workers.config import PolicyLossConfig\n"
        "fn = get_policy_loss_fn('dppo_tv_binary')\n"
        "x = torch.zeros(1, 3)\n"
        "cfg = make_actor_config(PolicyLossConfig(loss_mode='dppo_tv_binary'))\n"
        "try:\n    fn(x, x, x, torch.ones(1, 3), 'token-mean', cfg)\n"
        "except Exception as e:\n    print('ERR', type(e).__name__, e)\n"
        "print('vanilla ok', get_policy_loss_fn('vanilla') is not None)\n"
    ) % str(TESTS)
    r = _py(code, DPPO_VERL_DRIVER_VERSION="0.0.1", VERL_PLATFORM="cpu")
    assert r.returncode == 0, r.stderr[-3000:]
    import dppo_verl

    assert f"dppo_verl {dppo_verl.__version__} on this node" in r.stdout and "driver's dppo_verl 0.0.1" in r.stdout
    assert r.stdout.strip().endswith("vanilla ok True")
