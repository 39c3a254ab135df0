"""``make demo`` / ``make compare``: verl 0.9.1's own PPO trainer on a CPU, end to end, with a DPPO loss.

Nothing is mocked: ``dppo-verl-train`` (our launcher) runs verl's ``main_ppo`` driver, which starts Ray, the
vLLM (CPU build) rollout server with top-K logprobs, the agent loop, the FSDP2 actor on gloo and our loss.
This module builds the assets (:mod:`.assets`), writes the overrides a CPU needs, runs the trainer in its own
process group under a hard timeout (a Ray resource shortage hangs silently), prints one progress line per step
from verl's ``file`` logger (:mod:`.report`) and leaves, under ``runs/<run>/``:

* ``metrics.jsonl`` - verl's metrics per step (``{"step": n, "data": {...}}``);
* ``train.log`` - the trainer's full output; ``command.txt`` - the exact command (one per start);
* with ``--save-freq N``: ``checkpoints/`` (verl's), and ``--resume`` continues from the last one; each trainer
  start logs to ``attempts/metrics-<n>.jsonl``, concatenated into ``metrics.jsonl`` (:mod:`.resume`);
* ``<run>.png`` - reward, masked fraction by advantage sign, mean divergence and mean |pi - mu| per step;
* ``summary.json`` - wall time, peak memory (PSS) of the process tree, reward at the first and last step.

  python -m dppo_verl.demo run --steps 50 --loss dppo_tv_topk --k 20 [--engine megatron] [--trainer colocate_async]
  python -m dppo_verl.demo run --steps 50 --save-freq 10 [--resume]   # after a crash: the same options + --resume
  python -m dppo_verl.demo compare --losses dppo_tv_topk vanilla --steps 50
  python -m dppo_verl.demo compare --losses dppo_tv_topk --engines fsdp megatron
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time

from ..contract import CPU_PLATFORM, DEFAULT_NUM_TOPK, ENV_PLATFORM
from . import report
from . import resume as resume_mod
from . import tool_demo
from .assets import AGENTS, build_all
from .resume import resume_overrides

__all__ = ["demo_overrides", "run_demo", "compare", "main", "LOSSES"]

LOSSES = ("dppo_tv_topk", "dppo_kl_topk", "dppo_tv_binary", "dppo_kl_binary", "vanilla")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


ENGINES = ("fsdp", "megatron")
MEGATRON_TP = 2
TRAINERS = ("sync", "colocate_async")
WARMUP_BATCHES = 1  # colocate_async: batches generated ahead of training, so later batches come from older weights


def trainer_overrides(trainer: str) -> list[str]:
    """verl's V1 trainer mode. ``colocate_async`` prefetches ``WARMUP_BATCHES`` rollout batches: each step trains on
    a batch generated under older weights (staleness >= 1, verl's ``training/off_policy/trajectory_staleness/*``),
    and requests still running at a weight update are aborted and resumed under the new weights."""
    if trainer not in TRAINERS:
        raise ValueError(f"TRAINER={trainer!r} is not one of {', '.join(TRAINERS)}")
    if trainer == "sync":
        return []
    return [f"trainer.v1.trainer_mode={trainer}", f"trainer.v1.colocate_async.num_warmup_batches={WARMUP_BATCHES}"]


def engine_overrides(engine: str, *, mini_samples: int) -> tuple[list[str], list[str]]:
    """``(hydra flags, overrides)`` of the actor engine. FSDP2 on one rank; or verl's Megatron engine with tensor
    parallelism 2 (two CPU ranks over gloo, dppo_verl's CPU Megatron support) and two micro-batches per mini-batch,
    so the padded (BSHD) layout path runs every step."""
    A = "actor_rollout_ref.actor"
    if engine == "fsdp":
        return [], [
            "+actor_rollout_ref.model.override_config.attn_implementation=sdpa",  # no flash-attention on CPU
            f"{A}.strategy=fsdp2", "actor_rollout_ref.ref.strategy=fsdp2",  # FSDP1 refuses CPU params
            f"{A}.ppo_micro_batch_size_per_gpu={mini_samples}", f"{A}.use_torch_compile=False",
            "+ray_kwargs.ray_init.num_gpus=1", "trainer.n_gpus_per_node=1",  # verl counts "GPU"s; cpu platform maps
        ]
    if engine != "megatron":
        raise ValueError(f"ENGINE={engine!r} is not one of {', '.join(ENGINES)}")
    from ..integrations.platform.cpu_megatron import cpu_megatron_overrides

    if mini_samples % 2:
        raise ValueError(f"a mini-batch of {mini_samples} samples cannot split into two micro-batches")
    return ["--config-name", "ppo_megatron_trainer"], [
        f"{A}.megatron.tensor_model_parallel_size={MEGATRON_TP}", *cpu_megatron_overrides(A),
        f"{A}.ppo_micro_batch_size_per_gpu={mini_samples // 2}",  # two micro-batches of different longest sequence
        f"+ray_kwargs.ray_init.num_gpus={MEGATRON_TP}", f"trainer.n_gpus_per_node={MEGATRON_TP}",
    ]


def demo_overrides(assets: dict, *, loss: str, k: int, steps: int, seed: int, lr: float, batch: int, n: int,
                   minibatches: int, response_length: int, run_dir: str, engine: str = "fsdp",
                   trainer: str = "sync", save_freq: int = -1, resume: bool = False) -> list[str]:
    """verl overrides for a CPU run. Each CPU-specific line answers a failure found on a 2-core, GPU-less box.
    Hydra's ``--config-name`` (Megatron) comes first in the list."""
    A, R = "actor_rollout_ref.actor", "actor_rollout_ref.rollout"
    if batch % minibatches:
        raise ValueError(f"--batch {batch} must be a multiple of --minibatches {minibatches}")
    # Several optimizer steps per rollout batch: the later mini-batches are off-policy, which is where the
    # trust region (and PPO's clip) has something to do.
    mini = batch // minibatches
    loss_args = (["actor_rollout_ref.actor.policy_loss.loss_mode=vanilla"] if loss == "vanilla"
                 else [f"actor.policy_loss={loss}"] + ([f"actor.policy_loss.num_topk={k}"] if "topk" in loss else []))
    flags, engine_args = engine_overrides(engine, mini_samples=mini * n)
    return flags + loss_args + engine_args + trainer_overrides(trainer) + [
        "algorithm.adv_estimator=grpo", "algorithm.use_kl_in_reward=False",
        f"data.train_files={assets['train']}", f"data.val_files={assets['val']}",
        f"data.train_batch_size={batch}", "data.max_prompt_length=32", f"data.max_response_length={response_length}",
        "data.dataloader_num_workers=0", f"data.seed={seed}",
        f"actor_rollout_ref.model.path={assets['model']}",
        f"{A}.use_kl_loss=False", f"{A}.entropy_coeff=0", f"{A}.optim.lr={lr}",
        f"{A}.ppo_mini_batch_size={mini}", f"{A}.ppo_epochs=1",
        f"{R}.name=vllm", f"{R}.n={n}", f"{R}.temperature=1.0", f"{R}.tensor_model_parallel_size=1",
        f"{R}.log_prob_micro_batch_size_per_gpu={mini * n}", f"{R}.enforce_eager=True",
        f"+{R}.enable_sleep_mode=False", f"{R}.free_cache_engine=False",  # vLLM's sleep mode needs CUDA
        f"{R}.agent.num_workers=1", "reward.num_workers=1",
        f"reward.custom_reward_function.path={os.path.join(os.path.dirname(__file__), 'reward.py')}",
        "reward.custom_reward_function.name=compute_score",
        "ray_kwargs.ray_init.num_cpus=16",  # Ray actors ask for logical CPUs, not cores
        # One TransferQueue storage actor, not 8: each is a process importing torch (~1 min of start-up on 2 cores)
        "transfer_queue.backend.SimpleStorage.num_data_storage_units=1",
        "trainer.nnodes=1", f"trainer.total_training_steps={steps}",
        "trainer.total_epochs=1000", "trainer.logger=[console,file]", "trainer.val_before_train=False",
        "trainer.test_freq=-1", "trainer.project_name=dppo_demo", *resume_overrides(save_freq, resume),
        f"trainer.default_local_dir={os.path.join(run_dir, resume_mod.CHECKPOINTS)}",
        f"hydra.run.dir={os.path.join(run_dir, 'hydra')}",  # not ./outputs/<date> in the repo
    ]


def _tree_memory(pid: int) -> int:
    """Proportional set size (PSS) of the process tree: shared pages (torch, vLLM, Ray's object store) are
    split between the processes that map them, so the sum is what the run costs the machine, not sum(RSS)."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root] + root.children(recursive=True)
    except psutil.Error:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_full_info().pss
        except (psutil.Error, AttributeError):
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
    return total


def _watch_memory(pid: int, stop: threading.Event, peak: list) -> None:
    while not stop.wait(1.0):
        peak[0] = max(peak[0], _tree_memory(pid))


def _launch(cmd: list[str], env: dict, log_path: str, resumed_from: int | None = None) -> subprocess.Popen:
    log = open(log_path, "a" if resumed_from else "w")
    if resumed_from:  # the killed attempt's output stays above this line
        log.write(f"\n{resume_mod.RESUME_MARK} after the checkpoint of step {resumed_from} ====\n")
        log.flush()
    # Own session: on timeout or Ctrl-C the whole tree (Ray, vLLM, workers) is killed together.
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT)


def _kill(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL, to the trainer's process group and to every process it started: some of Ray's
    workers run in process groups of their own (same session), which a group signal alone would leave behind."""
    import psutil

    try:
        tree = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        tree = []
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        for child in tree:
            try:
                child.send_signal(sig)
            except psutil.Error:
                pass
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            continue
        if not psutil.wait_procs(tree, timeout=15)[1]:
            return


def run_demo(*, loss: str = "dppo_tv_topk", k: int = DEFAULT_NUM_TOPK, steps: int = 50, seed: int = 0, lr: float = 5e-4,
             batch: int = 16, n: int = 4, minibatches: int = 4, response_length: int | None = None,
             run_name: str | None = None,
             runs_dir: str = "runs", cache_dir: str = ".cache/demo", timeout_s: float = 1500,
             extra_overrides: tuple[str, ...] = (), extra_env: dict | None = None, engine: str = "fsdp",
             trainer: str = "sync", save_freq: int = -1, resume: bool = False, agent: str = "single") -> dict:
    """One training run; returns the summary (also written to ``runs/<run>/summary.json``).

    ``agent="tool"``: verl's multi-turn ``tool_agent`` loop with the demo's tool (:mod:`.tool_demo`); the
    response length defaults to ``tool_demo.RESPONSE_LENGTH`` there, 12 otherwise.

    ``extra_overrides`` go after the demo's own (the later value wins in Hydra), ``extra_env`` into the trainer's
    environment (inherited by the local Ray cluster's workers). ``save_freq`` > 0 checkpoints every that many steps
    into ``runs/<run>/checkpoints``; ``resume`` continues the run of this name from its last complete checkpoint
    with the same overrides, keeping ``metrics.jsonl`` and ``train.log`` (:mod:`.resume`).
    """
    if loss not in LOSSES:
        raise ValueError(f"LOSS={loss!r} is not one of {', '.join(LOSSES)}")
    if agent not in AGENTS:
        raise ValueError(f"AGENT={agent!r} is not one of {', '.join(AGENTS)}")
    t0 = time.time()
    assets = build_all(os.path.join(ROOT, cache_dir) if not os.path.isabs(cache_dir) else cache_dir, seed=seed,
                       agent=agent)
    if engine not in ENGINES:
        raise ValueError(f"ENGINE={engine!r} is not one of {', '.join(ENGINES)}")
    if response_length is None:
        response_length = tool_demo.RESPONSE_LENGTH if agent == "tool" else 12
    tags = "".join(f"-{t}" for t, default in ((engine, "fsdp"), (trainer, "sync"), (agent, "single")) if t != default)
    name = run_name or f"{loss}{tags}-s{steps}-seed{seed}"
    run_dir = os.path.join(ROOT, runs_dir, name) if not os.path.isabs(runs_dir) else os.path.join(runs_dir, name)
    os.makedirs(run_dir, exist_ok=True)
    overrides = demo_overrides(assets, loss=loss, k=k, steps=steps, seed=seed, lr=lr, batch=batch, n=n,
                               minibatches=minibatches, response_length=response_length, run_dir=run_dir,
                               engine=engine, trainer=trainer, save_freq=save_freq, resume=resume)
    overrides += (tool_demo.tool_overrides(run_dir) if agent == "tool" else []) + list(extra_overrides)
    attempt_metrics, from_step = resume_mod.prepare_run_dir(run_dir, overrides, resume)
    metrics = os.path.join(run_dir, "metrics.jsonl")
    cmd = [sys.executable, "-m", "dppo_verl.train", *overrides, f"trainer.experiment_name={name}"]
    with open(os.path.join(run_dir, "command.txt"), "a" if from_step else "w") as f:
        f.write(" \\\n  ".join(cmd) + "\n")
    # VERL_PLATFORM=cpu: the demo asks for dppo_verl's CPU platform explicitly (nothing selects it otherwise); Ray's
    # local workers inherit this environment.
    env = {**os.environ, ENV_PLATFORM: CPU_PLATFORM, "VERL_FILE_LOGGER_PATH": attempt_metrics,
           "VLLM_CPU_KVCACHE_SPACE": "1", "PYTHONUNBUFFERED": "1", "RAY_DEDUP_LOGS": "1",
           "TOKENIZERS_PARALLELISM": "false", **(extra_env or {})}
    actor = "FSDP actor" if engine == "fsdp" else f"Megatron actor, TP={MEGATRON_TP}"
    warmup = next((o.split("=", 1)[1] for o in reversed(extra_overrides)  # a later override wins, as in Hydra
                   if o.startswith("trainer.v1.colocate_async.num_warmup_batches=")), WARMUP_BATCHES)
    actor += "" if trainer == "sync" else f", {trainer} trainer ({warmup} warm-up batches ahead)"
    actor += "" if agent == "single" else ", verl's tool_agent loop (reverse tool)"
    print(f"[demo] {loss}, {actor}, {steps} steps, K={k}, batch {batch} prompts x {n} samples -> {run_dir}", flush=True)
    if resume and not from_step:
        print(f"[demo] --resume: no complete checkpoint in {run_dir}/checkpoints yet: starting from step 1", flush=True)
    if from_step:
        print(f"[demo] resuming after the checkpoint of step {from_step}: steps {from_step + 1}..{steps} "
              f"(metrics.jsonl keeps the earlier attempts)", flush=True)
    print(f"[demo] starting verl (Ray, vLLM CPU server, {actor}): the first step takes ~1 min; "
          f"full log: {os.path.join(run_dir, 'train.log')}", flush=True)
    proc = _launch(cmd, env, os.path.join(run_dir, "train.log"), resumed_from=from_step)
    rc, peak = _supervise(proc, attempt_metrics, metrics, steps, t0, timeout_s)
    return _finish(run_dir, name, loss, steps, rc, t0, peak, timeout_s, trainer, from_step, agent)


def _supervise(proc, attempt_metrics: str, metrics: str, steps: int, t0: float, timeout_s: float) -> tuple:
    """Wait for the trainer under the run's budget, printing its steps, mirroring its metrics into
    ``metrics.jsonl`` and sampling memory; ``(exit code or None on timeout, peak PSS bytes)``."""
    stop, peak = threading.Event(), [0]
    mem = threading.Thread(target=_watch_memory, args=(proc.pid, stop, peak), daemon=True)
    mem.start()
    mirror = resume_mod.MetricsMirror(attempt_metrics, metrics).start()
    reader = threading.Thread(target=report.follow, args=(attempt_metrics, steps, t0, stop),
                              kwargs={"out": lambda s: print("[demo] " + s, flush=True)}, daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=max(1.0, timeout_s - (time.time() - t0)))
    except subprocess.TimeoutExpired:
        rc = None
    except KeyboardInterrupt:
        _kill(proc)
        raise
    finally:
        if proc.poll() is None:
            _kill(proc)
        stop.set()
        mirror.stop()
        reader.join(timeout=10)
        mem.join(timeout=5)
    return rc, peak[0]


def _finish(run_dir, name, loss, steps, rc, t0, peak_bytes, timeout_s, trainer="sync", from_step=None,
            agent="single") -> dict:
    records = report.latest_per_step(report.read_records(os.path.join(run_dir, "metrics.jsonl")))
    records = [r for r in records if report.REWARD in r["data"]]
    rewards = [r["data"][report.REWARD] for r in records]
    stale = [r["data"][report.STALENESS] for r in records if report.STALENESS in r["data"]]
    png = os.path.join(run_dir, f"{name}.png")
    tool_stats = tool_demo.tool_call_stats(run_dir) if agent == "tool" else []
    if records:
        where = "the CPU demo" + ("" if trainer == "sync" else f", verl's {trainer} trainer")
        where += "" if agent == "single" else ", verl's tool_agent"
        extra = {"tool-call rate": ([s["step"] for s in tool_stats], [s["tool_call_rate"] for s in tool_stats])}
        report.plot_run(os.path.join(run_dir, "metrics.jsonl"), png, title=f"{loss} on {where}",
                        extra_reward_series=extra if tool_stats else None)
    summary = {"run": name, "loss": loss, "trainer": trainer, "steps_requested": steps, "steps_logged": len(records),
               "exit_code": rc, "timed_out": rc is None, "wall_s": round(time.time() - t0, 1),
               "resumed_from_step": from_step, "checkpointed_step": resume_mod.checkpointed_step(run_dir),
               "peak_pss_gb": round(peak_bytes / 2**30, 2), "reward_first": rewards[0] if rewards else None,
               "reward_last": rewards[-1] if rewards else None,
               "reward_first5_mean": sum(rewards[:5]) / len(rewards[:5]) if rewards else None,
               "reward_last5_mean": sum(rewards[-5:]) / len(rewards[-5:]) if rewards else None,
               "staleness_max": max(stale) if stale else None,  # async trainers: verl's trajectory staleness
               "agent": agent, "plot": png if records else None}
    if agent == "tool":
        turns = [r["data"].get(report.NUM_TURNS_MAX) for r in records]
        summary.update(tool_demo.summarize(tool_stats), num_turns_max=max((t for t in turns if t is not None),
                                                                           default=None))
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print("[demo] " + json.dumps(summary), flush=True)
    if rc is None:
        raise RuntimeError(f"the run exceeded its {timeout_s:.0f} s budget and was killed; see {run_dir}/train.log")
    if rc != 0 or len(records) < steps:
        raise RuntimeError(f"verl exited with code {rc} after {len(records)}/{steps} steps; see {run_dir}/train.log")
    return summary


def compare(losses: list[str], engines: tuple[str, ...] = ("fsdp",), **kwargs) -> str:
    """Run every loss x engine with the same seed and data, then draw them on one plot (``runs/compare-....png``);
    e.g. ``--losses dppo_tv_topk --engines fsdp megatron`` puts the two actor engines side by side."""
    runs = {}
    for engine in engines:
        for loss in losses:
            summary = run_demo(loss=loss, engine=engine, **kwargs)
            label = loss if len(engines) == 1 else f"{loss} ({engine})"
            runs[label] = os.path.join(os.path.dirname(summary["plot"]), "metrics.jsonl")
    runs_dir = kwargs.get("runs_dir", "runs")
    tag = "-".join(losses) + ("" if tuple(engines) == ("fsdp",) else "-" + "-".join(engines))
    out = os.path.join(ROOT, runs_dir, f"compare-{tag}.png")
    report.plot_compare(runs, out, title=f"same seed, {kwargs.get('steps', 50)} steps")
    print(f"[demo] comparison plot: {out}", flush=True)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m dppo_verl.demo", description=__doc__.split("\n")[0])
    ap.add_argument("command", choices=("run", "compare"), nargs="?", default="run")
    ap.add_argument("--loss", default="dppo_tv_topk", choices=LOSSES)
    ap.add_argument("--losses", nargs="+", default=["dppo_tv_topk", "vanilla"], choices=LOSSES)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--k", type=int, default=DEFAULT_NUM_TOPK)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--minibatches", type=int, default=4, help="optimizer steps per rollout batch")
    ap.add_argument("--batch", type=int, default=16, help="prompts per step")
    ap.add_argument("--n", type=int, default=4, help="samples per prompt (GRPO group)")
    ap.add_argument("--engine", default="fsdp", choices=ENGINES, help="the actor's verl engine (megatron: TP=2)")
    ap.add_argument("--engines", nargs="+", default=None, choices=ENGINES, help="compare: engines to run (default: --engine)")
    ap.add_argument("--trainer", default="sync", choices=TRAINERS,
                    help="verl's V1 trainer mode (colocate_async: rollouts one policy version stale, partial rollouts)")
    ap.add_argument("--agent", default="single", choices=AGENTS,
                    help="verl's agent loop: single (one turn) or tool (tool_agent, multi-turn, with the demo's tool)")
    ap.add_argument("--run-name", default=None)
    ap.add_argument("--runs-dir", default="runs")
    ap.add_argument("--timeout", type=float, default=1500, help="hard limit for the whole run, seconds")
    ap.add_argument("--save-freq", type=int, default=-1, help="checkpoint every N steps into runs/<run>/checkpoints")
    ap.add_argument("--resume", action="store_true",
                    help="continue the run of this name from its last checkpoint (same options; keeps metrics.jsonl)")
    a = ap.parse_args(argv)
    common = dict(k=a.k, steps=a.steps, seed=a.seed, lr=a.lr, batch=a.batch, n=a.n, minibatches=a.minibatches,
                  runs_dir=a.runs_dir, timeout_s=a.timeout, trainer=a.trainer, save_freq=a.save_freq, agent=a.agent)
    if a.command == "compare":
        compare(a.losses, engines=tuple(a.engines or [a.engine]), **common)
    else:
        run_demo(loss=a.loss, run_name=a.run_name, engine=a.engine, resume=a.resume, **common)


if __name__ == "__main__":
    main()
