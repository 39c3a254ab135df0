"""Plugin loading: entry point, idempotence, loud version check, and the ops layer's purity."""

import ast
import pathlib
import subprocess
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODES = ["dppo_tv_binary", "dppo_kl_binary", "dppo_tv_topk", "dppo_kl_topk"]


def _py(code, **env):
    import os

    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", env={**os.environ, **env})


def test_import_verl_alone_registers_modes_through_entry_point():
    """What every Ray worker does: `import verl`, nothing of ours, and the modes must be there."""
    r = _py("import sys, verl\nfrom verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY as R\n"
            "print(sorted(k for k in R if k.startswith('dppo_') and k.count('_') == 2), 'dppo_verl' in sys.modules)")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"{sorted(MODES)} True"
    r = _py("import verl\nfrom verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY as R\nprint('dppo_tv_topk' in R)",
            VERL_USE_EXTERNAL_PLUGINS="none")
    assert r.stdout.strip() == "False"  # proves the entry point (not something else) did it


def test_done_when_command():
    r = _py("import dppo_verl.plugin\nfrom verl.trainer.ppo.core_algos import get_policy_loss_fn\n"
            "print(get_policy_loss_fn('dppo_tv_topk').dppo_loss_mode)")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "dppo_tv_topk"


def test_install_is_idempotent():
    import dppo_verl.plugin
    from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY

    before = {m: POLICY_LOSS_REGISTRY[m] for m in MODES}
    dppo_verl.plugin.install()
    dppo_verl.plugin.install()
    assert all(POLICY_LOSS_REGISTRY[m] is before[m] for m in MODES)


def test_foreign_registration_is_refused():
    from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY

    from dppo_verl.losses import _register_modes_for
    from dppo_verl.ops.divergence import get_divergence

    saved = POLICY_LOSS_REGISTRY["dppo_tv_binary"]
    POLICY_LOSS_REGISTRY["dppo_tv_binary"] = lambda *a, **k: None
    try:
        with pytest.raises(ValueError, match="already registered.*refusing to overwrite"):
            _register_modes_for(get_divergence("tv"))
    finally:
        POLICY_LOSS_REGISTRY["dppo_tv_binary"] = saved


def test_wrong_verl_version_is_loud(monkeypatch):
    """The exact version (not major.minor): 0.9.2 is refused too, with the way out named."""
    import verl

    from dppo_verl._compat import verl_version_problem

    assert verl_version_problem() is None
    for other in ("0.10.0", "0.9.2"):
        monkeypatch.setattr(verl, "__version__", other)
        assert f"dppo_verl supports verl==0.9.1; the installed verl is {other}" in verl_version_problem()
    monkeypatch.setenv("DPPO_VERL_ALLOW_ANY_VERL", "1")
    assert verl_version_problem() is None


def test_wrong_verl_version_disables_dppo_only():
    """In a fresh process whose verl reports another version: plain verl losses still resolve, DPPO modes refuse at
    first use naming both versions (verl hides plugin import errors at DEBUG, so install must not raise)."""
    r = _py("import verl\nverl.__version__ = '0.9.9'\nimport dppo_verl.plugin, torch\n"
            "from verl.trainer.ppo.core_algos import get_policy_loss_fn\n"
            "from dppo_verl.integrations.patching import raise_if_drifted\n"
            "print(get_policy_loss_fn('vanilla').__name__)\n"
            "try:\n    raise_if_drifted(('dppo',), 'dppo_tv_binary')\nexcept Exception as e:\n    print('ERR', e)\n",
            VERL_USE_EXTERNAL_PLUGINS="none")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "dppo_tv_binary cannot run" in r.stdout and "the installed verl is 0.9.9" in r.stdout


def test_ops_layer_imports_neither_verl_nor_megatron():
    for path in (ROOT / "dppo_verl" / "ops").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            for n in names:
                assert n.split(".")[0] not in ("verl", "megatron"), f"{path.name} imports {n}"


def test_missing_private_symbol_is_named(monkeypatch):
    import verl.workers.utils.padding as padding

    from dppo_verl._compat import missing_symbols

    assert missing_symbols() == []
    monkeypatch.delattr(padding, "no_padding_2_padding")
    assert missing_symbols() == ["verl.workers.utils.padding.no_padding_2_padding"]


def test_first_use_engine_checks():
    """The worker-side twins of the launch rules, on verl's real BaseEngine.train_batch (wrapped)."""
    import functools

    from tensordict import TensorDict
    from verl.utils import tensordict_utils as tu
    from verl.workers.engine.base import BaseEngine
    from verl.workers.utils.losses import ppo_loss

    from conftest import make_actor_config
    from dppo_verl.config import DPPOPolicyLossConfig

    from types import SimpleNamespace

    class Stub:
        pad_to_length = False
        # a padded head: 320 rows, 261 tokenizer ids (the demo model)
        model_config = SimpleNamespace(tokenizer=[0] * 261, processor=None, hf_config=SimpleNamespace(vocab_size=320))

    loss_fn = functools.partial(ppo_loss, config=make_actor_config(DPPOPolicyLossConfig(loss_mode="dppo_tv_topk")))
    data = TensorDict({"x": torch.zeros(2)}, batch_size=[2])
    with pytest.raises(ValueError, match=r"lacks \['rollout_topk_ids', 'rollout_topk_logprobs'\].*No silent binary"):
        BaseEngine.train_batch(Stub(), data, loss_fn)
    data["rollout_topk_ids"] = torch.zeros(2, 1, dtype=torch.int32)
    data["rollout_topk_logprobs"] = torch.zeros(2, 1)
    tu.assign_non_tensor(data, use_fused_kernels=True)
    with pytest.raises(ValueError, match="actor_rollout_ref.model.use_fused_kernels=False"):
        BaseEngine.train_batch(Stub(), data, loss_fn)
    tu.assign_non_tensor(data, use_fused_kernels=False)
    Stub.pad_to_length = True
    with pytest.raises(ValueError, match="pad_to_length=False"):
        BaseEngine.train_batch(Stub(), data, loss_fn)
    # binary modes read the logits too when the rollout samples from fewer ids than the head has (issue #17)
    Stub.pad_to_length = False
    tu.assign_non_tensor(data, use_fused_kernels=True)
    binary = functools.partial(ppo_loss, config=make_actor_config(DPPOPolicyLossConfig(loss_mode="dppo_tv_binary")))
    with pytest.raises(ValueError, match=r"needs the logits \(the mass on ids the rollout never samples, "
                                         r"actor_rollout_ref.actor.policy_loss.sampled_ids\).*use_fused_kernels=False"):
        BaseEngine.train_batch(Stub(), data, binary)
    Stub.model_config = SimpleNamespace(tokenizer=None, processor=None, hf_config=SimpleNamespace(vocab_size=320))
    with pytest.raises(ValueError, match=r"sampled_ids=vllm needs the actor's tokenizer"):
        BaseEngine.train_batch(Stub(), data, binary)
