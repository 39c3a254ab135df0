"""One real verl 0.9.1 FSDP2 ``update_actor`` step on CPU, run as its own process (the do-no-harm tests compare two).

    python tests/fsdp_step.py --model DIR --loss vanilla --out OUT.pt [--plugin full|cpu-only] [--drift ppo_loss]

``--plugin full``: the whole plugin, loaded by verl's entry point (what a user's environment does).
``--plugin cpu-only``: verl's plugin loading off (``VERL_USE_EXTERNAL_PLUGINS=none`` must be set by the caller), and
only the CPU platform applied by hand: verl cannot run its FSDP engine on this machine without it.
``--drift ppo_loss``: before the plugin installs, verl's ``ppo_loss`` gets another signature (what a verl upgrade
might do); the plugin must leave it alone and the step must still run (``cpu-only`` loading, then the plugin imported).

Writes ``{"metrics": {...}, "params": {...}, "error": str | None, "applied": {...}}`` with ``torch.save``.
"""

from __future__ import annotations

import argparse
import functools
import os
import socket
import sys

import torch


def _batch(n: int = 4, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(n):
        p, r = int(torch.randint(3, 9, (1,), generator=g)), int(torch.randint(3, 11, (1,), generator=g))
        prompt, resp = torch.randint(3, 400, (p,), generator=g), torch.randint(3, 400, (r,), generator=g)
        samples.append(dict(prompts=prompt, responses=resp, input_ids=torch.cat([prompt, resp]),
                            position_ids=torch.arange(p + r), response_mask=torch.ones(r, dtype=torch.long),
                            rollout_log_probs=-torch.rand(r, generator=g) * 3 - 2.0,
                            old_log_probs=-torch.rand(r, generator=g) * 3 - 2.0,
                            advantages=torch.randn(r, generator=g)))
    return samples


def _resign_ppo_loss() -> None:
    """verl's ``ppo_loss`` with one more parameter: the patch must refuse it (signature drift)."""
    import verl.workers.utils.losses as L

    orig = L.ppo_loss

    @functools.wraps(orig)
    def ppo_loss(config, model_output, data, dp_group=None, new_arg=None):
        return orig(config, model_output, data, dp_group)

    del ppo_loss.__wrapped__  # inspect.signature must see the new signature, not the wrapped one
    L.ppo_loss = ppo_loss


def actor_worker(overrides: list[str]):
    """verl's own ``ActorRolloutRefWorker`` (role actor) from verl's Hydra config with ``overrides``, initialised with
    seed 0, as verl's trainer builds it (shared with ``benchmarks/bench_actor_step.py``)."""
    import verl
    from hydra import compose, initialize_config_dir
    from verl.workers.engine_workers import ActorRolloutRefWorker

    with initialize_config_dir(config_dir=os.path.join(os.path.dirname(verl.__file__), "trainer", "config"),
                               version_base=None):
        cfg = compose(config_name="ppo_trainer", overrides=overrides)
    torch.manual_seed(0)
    worker = ActorRolloutRefWorker(config=cfg.actor_rollout_ref, role="actor")
    worker.init_model()
    return worker


def run(args) -> dict:
    port = socket.socket()
    port.bind(("127.0.0.1", 0))
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port.getsockname()[1]))
    port.close()
    torch.set_num_threads(1)
    import verl  # noqa: F401  (verl's plugin loading runs here: the plugin is installed, or not, from now on)

    if args.plugin == "cpu-only":
        assert "dppo_verl.plugin" not in sys.modules, "plugin loading was supposed to be off"
        if args.drift == "ppo_loss":
            _resign_ppo_loss()
            import dppo_verl.plugin  # noqa: F401  (installs now, over the drifted verl)
        else:
            from dppo_verl.integrations.platform.cpu_platform import apply_cpu_support

            assert apply_cpu_support(), "VERL_PLATFORM=cpu must be set"
    else:
        assert "dppo_verl.plugin" in sys.modules, "verl's entry point did not load the plugin"
    from verl.utils import tensordict_utils as tu

    samples = _batch()
    n = len(samples)
    overrides = [
        f"actor_rollout_ref.model.path={args.model}", "+actor_rollout_ref.model.override_config.attn_implementation=sdpa",
        "actor_rollout_ref.actor.strategy=fsdp2", "actor_rollout_ref.ref.strategy=fsdp2",
        f"actor_rollout_ref.actor.ppo_mini_batch_size={n}", "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
        f"actor_rollout_ref.actor.policy_loss.loss_mode={args.loss}",
        "actor_rollout_ref.actor.use_torch_compile=False", "actor_rollout_ref.actor.fsdp_config.use_torch_compile=False",
        "actor_rollout_ref.rollout.n=1", "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=2",
        "actor_rollout_ref.actor.optim.lr=1e-3",
    ]
    worker = actor_worker(overrides)
    fields = {k: torch.nested.as_nested_tensor([s[k] for s in samples], layout=torch.jagged) for k in samples[0]}
    fields["loss_mask"] = fields["response_mask"]
    extra = dict(calculate_entropy=False, distillation_use_topk=False, distillation_only=False, global_batch_size=n,
                 mini_batch_size=n, epochs=1, seed=42, dataloader_kwargs={"shuffle": False}, temperature=1.0)
    result = {"metrics": None, "params": None, "error": None}
    try:
        out = worker.update_actor(tu.get_tensordict(tensor_dict=fields, non_tensor_dict=extra))
        metrics = tu.get(out, "metrics")
        result["metrics"] = {k: v for k, v in metrics.items() if not k.startswith(("perf/", "timing"))}
        module = worker.actor.engine.module
        result["params"] = {k: v.detach().full_tensor().clone() if hasattr(v, "full_tensor") else v.detach().clone()
                            for k, v in module.state_dict().items()}
    except Exception as e:  # noqa: BLE001  (the caller asserts on the message)
        result["error"] = f"{type(e).__name__}: {e}"
    from dppo_verl.integrations.patching import APPLIED

    result["applied"] = {k: (r.ok, r.detail) for k, r in APPLIED.items()}
    return result


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--loss", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--plugin", choices=("full", "cpu-only"), default="full")
    ap.add_argument("--drift", choices=("ppo_loss",), default=None)
    a = ap.parse_args()
    torch.save(run(a), a.out)
