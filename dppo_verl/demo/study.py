"""``make study``: the paper's sanity test (its Fig. 3) in miniature, on the CPU demo task.

The same seed, data, warm start and rollout settings under four ways of treating the training-inference
mismatch (each arm is one real verl ``main_ppo`` run of :func:`dppo_verl.demo.run.run_demo`):

======================  ==============================================================================
arm                     loss
======================  ==============================================================================
``pg_is``               policy gradient with truncated importance sampling against mu, no trust region:
                        ``dppo_tv_binary`` with ``delta_low = delta_high = 1e6`` (Eq. 12 never masks;
                        Eq. 11's stop-gradient ratio min(pi/mu, C) stays)
``grpo_clip``           verl's ``vanilla`` PPO/GRPO ratio clip (eps 0.2) against the recomputed pi_old
``dppo_binary``         ``dppo_tv_binary`` (delta 0.15)
``dppo_topk``           ``dppo_tv_topk`` (delta 0.15, K = 20)
``dppo_binary_old``     ``dppo_tv_binary``, ``anchor=old``: weight and mask against verl's pi_old (verl's dppo_tv)
``dppo_topk_old``       ``dppo_tv_topk``, ``anchor=old``: Eq. 12 around pi_old over the rollout's support, Eq. 11
                        still min(pi/mu, C) (decoupled)
======================  ==============================================================================

``--seeds 0 1 2`` runs the study once per seed and draws the mean and the spread (min-max) across seeds per arm
(``runs/study-noise<sigma>-s<steps>-seeds<list>/{study_seeds.png,summary.json}``).

The mismatch is the natural one (vLLM's bf16 CPU kernels sample; the FSDP trainer recomputes) plus, with
``--noise sigma``, an injected one: vLLM runs ``w + sigma * rms(w) * eps`` (:mod:`dppo_verl.demo.perturb`).
Leaves ``runs/study-<tag>/study.png`` (reward, trust-region activity, divergence, mean |pi - mu| per step, one
line per arm) and ``summary.json`` (per arm: reward at the start and the end, mean and max |pi - mu|, wall time).

  python -m dppo_verl.demo.study --steps 24 --noise 0.0
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time

from . import report
from .run import ROOT, run_demo

__all__ = ["ARMS", "DEFAULT_ARMS", "arm_settings", "run_study", "run_seeds", "combine", "summarize", "plot_study",
           "replot", "main"]

ARMS = {  # name -> (legend label, loss, extra overrides)
    "pg_is": ("PG + IS, no trust region", "dppo_tv_binary",
              ("actor.policy_loss.delta_low=1e6", "actor.policy_loss.delta_high=1e6")),
    "grpo_clip": ("GRPO ratio clip vs pi_old", "vanilla", ()),
    "dppo_binary": ("DPPO binary TV", "dppo_tv_binary", ()),
    "dppo_topk": ("DPPO Top-K TV (K=20)", "dppo_tv_topk", ()),
    # issue #21: the trust region around verl's recomputed pi_old instead of mu (README "What verl's pi_old pass adds")
    "dppo_binary_old": ("DPPO binary TV, anchor pi_old", "dppo_tv_binary", ("actor.policy_loss.anchor=old",)),
    "dppo_topk_old": ("DPPO Top-K TV, decoupled (pi_old)", "dppo_tv_topk", ("actor.policy_loss.anchor=old",)),
}
DEFAULT_ARMS = ("pg_is", "grpo_clip", "dppo_binary", "dppo_topk")  # make study without ARMS= (the first four)
# Every arm loads the perturbation module in every verl process (quoted: Hydra would read the comma as a sweep);
# it does nothing unless DPPO_ROLLOUT_WEIGHT_NOISE > 0.
# verl's pi_old pass stays on in every arm (dppo-verl-train would skip it for the DPPO arms): the study compares the
# arms on verl's own |pi_old - mu| (``training/rollout_probs_diff_mean``), measured the same way for all of them.
COMMON = ("+ray_kwargs.ray_init.runtime_env.env_vars.VERL_USE_EXTERNAL_MODULES='dppo_verl.plugin,dppo_verl.demo.perturb'",
          "algorithm.rollout_correction.bypass_mode=False")


def arm_settings(arm: str) -> tuple[str, str, tuple[str, ...]]:
    """``(label, loss, extra overrides)`` of an arm; ``ValueError`` listing the arms on a bad name."""
    if arm not in ARMS:
        raise ValueError(f"unknown study arm {arm!r}; valid: {list(ARMS)}")
    label, loss, extra = ARMS[arm]
    return label, loss, tuple(extra) + COMMON


MASKED_AT_START = "actor/dppo/masked_at_start_frac"


def summarize(metrics_jsonl: str) -> dict:
    """Per-arm numbers from verl's metrics: reward (first/last 5 steps), |pi_old - mu| and trust-region activity."""
    records = [r for r in report.read_records(metrics_jsonl) if report.REWARD in r["data"]]

    def col(*keys):  # values of the first of ``keys`` that was logged (the plots' own lookup)
        found = report._series(records, keys)
        return found[2] if found else []

    reward, diff, active = col(report.REWARD), col(report.PROBS_DIFF, report.MISMATCH), col(report.MASKED, report.CLIPFRAC)
    at_start = col(MASKED_AT_START)
    mean = lambda v: round(sum(v) / len(v), 4) if v else None  # noqa: E731
    return {"steps": len(records), "reward_first5": mean(reward[:5]), "reward_last5": mean(reward[-5:]),
            "reward_max": round(max(reward), 4) if reward else None,
            "probs_diff_mean": mean(diff), "probs_diff_max_step": round(max(diff), 4) if diff else None,
            "masked_or_clipped_frac_mean": mean(active), "masked_at_start_frac_mean": mean(at_start)}


def plot_study(summary: dict, paths: dict[str, str], png: str, smooth: int = 5) -> str:
    """One figure, one colour per arm (``paths``: legend label -> metrics jsonl)."""
    noise = summary["noise"]
    mismatch = "natural bf16 gap" if noise == 0 else f"natural gap + rollout weight noise sigma={noise:g}"
    if summary.get("trainer", "sync") != "sync":  # stale rollouts: say how stale
        ahead = summary.get("warmup_batches") or 1
        mismatch += f", {summary['trainer']} ({ahead} batch{'es' if ahead > 1 else ''} ahead: stale rollouts)"
    report.plot_compare(paths, png, smooth=smooth,
                        title=f"seed {summary.get('seed', 0)}, {summary['steps']} steps, {mismatch} (lines: {smooth}-step mean)")
    return png


def replot(out_dir: str, smooth: int = 5) -> str:
    """Redraw ``<out_dir>/study.png`` from a finished study's ``summary.json`` and metrics (no training)."""
    with open(os.path.join(out_dir, "summary.json")) as f:
        summary = json.load(f)
    paths = {a["label"]: os.path.join(out_dir, arm, "metrics.jsonl") for arm, a in summary["arms"].items()}
    return plot_study(summary, paths, os.path.join(out_dir, "study.png"), smooth)


def _ray_stop() -> None:
    """A killed run can leave a Ray head behind; the next arm must start a fresh one."""
    import sys

    ray = os.path.join(os.path.dirname(sys.executable), "ray")
    subprocess.run([ray, "stop", "--force"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)


def run_study(arms: list[str], *, steps: int, noise: float, seed: int = 0, runs_dir: str = "runs",
              smooth: int = 5, timeout_s: float = 900, trainer: str = "sync", warmup_batches: int | None = None,
              **demo_kwargs) -> dict:
    """Run each arm with the same seed, then draw them on one figure. Returns the study summary.

    ``trainer="colocate_async"``: every arm under verl's V1 asynchronous trainer (stale rollouts; ``warmup_batches``
    overrides the demo's number of batches generated ahead)."""
    t0 = time.time()
    stale = "" if trainer == "sync" else f"-{trainer}" + ("" if warmup_batches is None else f"-w{warmup_batches}")
    tag = f"study{stale}-noise{noise:g}-s{steps}-seed{seed}"
    out_dir = os.path.join(ROOT, runs_dir, tag) if not os.path.isabs(runs_dir) else os.path.join(runs_dir, tag)
    os.makedirs(out_dir, exist_ok=True)
    summary = {"tag": tag, "steps": steps, "noise": noise, "seed": seed, "trainer": trainer,
               "warmup_batches": warmup_batches, "arms": {}}
    more = () if warmup_batches is None else (f"trainer.v1.colocate_async.num_warmup_batches={warmup_batches}",)
    paths = {}
    for i, arm in enumerate(arms):
        label, loss, extra = arm_settings(arm)
        print(f"[study] arm {i + 1}/{len(arms)}: {arm} ({label}); {time.time() - t0:.0f} s elapsed", flush=True)
        _ray_stop()
        run = run_demo(loss=loss, steps=steps, seed=seed, run_name=arm, runs_dir=out_dir,
                       extra_overrides=extra + more, extra_env={"DPPO_ROLLOUT_WEIGHT_NOISE": f"{noise:g}"},
                       timeout_s=timeout_s, trainer=trainer, **demo_kwargs)
        paths[label] = os.path.join(os.path.dirname(run["plot"]), "metrics.jsonl")
        summary["arms"][arm] = {"label": label, "loss": loss, "overrides": list(extra + more), "wall_s": run["wall_s"],
                                "metrics": paths[label],
                                "staleness_max": run.get("staleness_max"), **summarize(paths[label])}
    summary["wall_s"] = round(time.time() - t0, 1)
    summary["plot"] = plot_study(summary, paths, os.path.join(out_dir, "study.png"), smooth)
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(f"[study] {len(arms)} arms in {summary['wall_s'] / 60:.1f} min; figure {summary['plot']}", flush=True)
    for arm, s in summary["arms"].items():
        print(f"[study] {arm:12s} reward {s['reward_first5']} -> {s['reward_last5']} | mean |pi-mu| "
              f"{s['probs_diff_mean']} | masked/clipped {s['masked_or_clipped_frac_mean']}", flush=True)
    return summary


def run_seeds(arms: list[str], seeds: list[int], *, steps: int, noise: float, runs_dir: str = "runs",
              **study_kwargs) -> dict:
    """:func:`run_study` once per seed, then each arm's mean and spread (min-max) across the seeds: numbers in
    ``summary.json`` and reward / masked fraction per step in ``study_seeds.png``."""
    t0 = time.time()
    per_seed = {}
    for i, seed in enumerate(seeds):
        print(f"[study] seed {seed} ({i + 1}/{len(seeds)}); {time.time() - t0:.0f} s elapsed", flush=True)
        per_seed[seed] = run_study(arms, steps=steps, noise=noise, seed=seed, runs_dir=runs_dir, **study_kwargs)
    return _report_seeds(per_seed, runs_dir, wall_s=round(time.time() - t0, 1))


def combine(study_dirs: list[str], runs_dir: str = "runs") -> dict:
    """The seed summary and figure of finished one-seed studies (their ``summary.json``), e.g. seeds run apart.
    Studies of the same seed (arms run apart) are merged into one; every seed must end with the same arms, and an arm
    twice in one seed is refused (which run would count?)."""
    per_seed, steps, noise = {}, set(), set()
    for d in study_dirs:
        with open(os.path.join(d, "summary.json")) as f:
            s = json.load(f)
        for arm in s["arms"].values():  # the metrics next to the summary (the study may have moved)
            arm["metrics"] = os.path.join(d, os.path.basename(os.path.dirname(arm["metrics"])), "metrics.jsonl")
        steps.add(s["steps"])
        noise.add(s["noise"])
        if s["seed"] in per_seed:
            _merge_arms(per_seed[s["seed"]], s)
        else:
            per_seed[s["seed"]] = s
    arm_sets = {seed: set(s["arms"]) for seed, s in per_seed.items()}
    if len(steps) != 1 or len(noise) != 1 or len({frozenset(a) for a in arm_sets.values()}) != 1:
        raise ValueError(f"combine wants one study per seed at the same steps and noise, with the same arms: seeds "
                         f"{sorted(per_seed)}, steps {sorted(steps)}, noise {sorted(noise)}, arms per seed "
                         + ", ".join(f"{seed}: {sorted(a)}" for seed, a in sorted(arm_sets.items())))
    for s in per_seed.values():  # the study's own arm order, whichever run came first
        s["arms"] = {arm: s["arms"][arm] for arm in ARMS if arm in s["arms"]}
    return _report_seeds(per_seed, runs_dir, wall_s=round(sum(s["wall_s"] for s in per_seed.values()), 1))


def _merge_arms(into: dict, other: dict) -> None:
    """Arms of ``other`` (a study of the same seed) into ``into``; an arm in both is refused, naming both studies
    (each arm's metrics path lies in its study's directory)."""
    study_of = lambda entry: os.path.dirname(os.path.dirname(entry["metrics"]))  # noqa: E731
    for arm, entry in other["arms"].items():
        if arm in into["arms"]:
            raise ValueError(f"combine: arm {arm!r} of seed {into['seed']} is in two studies "
                             f"({study_of(into['arms'][arm])} and {study_of(entry)}): keep one")
        into["arms"][arm] = entry
    into["wall_s"] += other["wall_s"]


def _report_seeds(per_seed: dict, runs_dir: str, *, wall_s: float) -> dict:
    from .study_seeds import markdown_table, plot_seeds, seed_summary

    first = per_seed[min(per_seed)]
    noise, steps = first["noise"], first["steps"]
    tag = f"study-noise{noise:g}-s{steps}-seeds{'_'.join(str(x) for x in sorted(per_seed))}"
    out_dir = os.path.join(ROOT, runs_dir, tag) if not os.path.isabs(runs_dir) else os.path.join(runs_dir, tag)
    summary = seed_summary(per_seed, noise=noise, steps=steps, wall_s=wall_s)
    summary["plot"] = plot_seeds(per_seed, os.path.join(out_dir, "study_seeds.png"), title=summary["title"])
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    with open(os.path.join(out_dir, "summary.md"), "w") as f:
        f.write(markdown_table(summary))
    for arm, a in summary["arms"].items():
        print(f"[study] {arm:16s} reward last 5: mean {a['reward_last5']['mean']} (min {a['reward_last5']['min']}, "
              f"max {a['reward_last5']['max']}) | masked/clipped {a['masked_or_clipped_frac_mean']['mean']}", flush=True)
    return summary


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m dppo_verl.demo.study", description=__doc__.split("\n")[0])
    ap.add_argument("--arms", nargs="+", default=list(DEFAULT_ARMS), choices=list(ARMS) + ["all"],
                    help=f"default: {' '.join(DEFAULT_ARMS)}; all: every arm ({' '.join(ARMS)})")
    ap.add_argument("--seeds", nargs="+", type=int, default=None,
                    help="run the study once per seed and draw the mean and spread across them (overrides --seed)")
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--noise", type=float, default=0.0, help="relative rollout weight noise sigma (0: natural gap)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--runs-dir", default="runs")
    ap.add_argument("--timeout", type=float, default=900, help="hard limit per arm, seconds")
    ap.add_argument("--replot", metavar="DIR", help="only redraw DIR/study.png from a finished study")
    ap.add_argument("--combine", nargs="+", metavar="DIR",
                    help="only the seed summary (summary.json, summary.md, study_seeds.png) of finished one-seed "
                    "studies; studies of the same seed (arms run apart) are merged")
    ap.add_argument("--trainer", default="sync", choices=["sync", "colocate_async"],
                    help="colocate_async: every arm trains on stale rollouts (verl's V1 asynchronous trainer)")
    ap.add_argument("--warmup-batches", type=int, default=None,
                    help="colocate_async: rollout batches generated ahead of training (more = staler rollouts)")
    a = ap.parse_args(argv)
    if "all" in a.arms:
        if len(a.arms) > 1:
            ap.error("--arms all stands alone")
        a.arms = list(ARMS)
    if a.replot:
        print(replot(a.replot))
        return
    if a.combine:
        print(combine(a.combine, runs_dir=a.runs_dir)["plot"])
        return
    if a.noise < 0:
        ap.error("--noise must be >= 0")
    if a.warmup_batches is not None and (a.trainer != "colocate_async" or a.warmup_batches < 1):
        ap.error("--warmup-batches needs --trainer colocate_async and a value >= 1")
    if a.seeds:
        run_seeds(a.arms, a.seeds, steps=a.steps, noise=a.noise, lr=a.lr, runs_dir=a.runs_dir, timeout_s=a.timeout,
                  trainer=a.trainer, warmup_batches=a.warmup_batches)
        return
    run_study(a.arms, steps=a.steps, noise=a.noise, seed=a.seed, lr=a.lr, runs_dir=a.runs_dir, timeout_s=a.timeout,
              trainer=a.trainer, warmup_batches=a.warmup_batches)


if __name__ == "__main__":
    main()
