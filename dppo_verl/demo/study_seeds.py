"""``make study SEEDS="0 1 2"``: one study per seed (:func:`dppo_verl.demo.study.run_study`), summarised per arm as
the mean and the spread (min-max) across seeds, and drawn as one figure: reward (relative to each run's first 5
steps: every seed has its own data and warm start) and masked/clipped fraction per step, a line for the mean over
seeds (trailing ``smooth``-step mean) and a band for the min-max over seeds."""

from __future__ import annotations

import os

from . import report

__all__ = ["seed_summary", "plot_seeds", "spread", "markdown_table"]

_NUMBERS = ("reward_first5", "reward_last5", "reward_gain", "probs_diff_mean", "masked_or_clipped_frac_mean",
            "masked_at_start_frac_mean")


def spread(values: list) -> dict:
    """``{"mean", "min", "max", "n"}`` of the non-None ``values`` (None fields when there are none)."""
    v = [x for x in values if x is not None]
    if not v:
        return {"mean": None, "min": None, "max": None, "n": 0}
    return {"mean": round(sum(v) / len(v), 4), "min": round(min(v), 4), "max": round(max(v), 4), "n": len(v)}


def seed_summary(per_seed: dict, *, noise: float, steps: int, wall_s: float) -> dict:
    """``per_seed``: seed -> :func:`run_study` summary. Per arm: every number of :func:`study.summarize` as a spread
    over the seeds, plus each seed's value."""
    seeds = sorted(per_seed)
    arms = list(per_seed[seeds[0]]["arms"])
    out = {"noise": noise, "steps": steps, "seeds": seeds, "wall_s": wall_s, "arms": {},
           "title": (f"{len(seeds)} seeds ({', '.join(map(str, seeds))}), {steps} steps, "
                     + ("natural bf16 gap" if noise == 0 else f"natural gap + rollout weight noise sigma={noise:g}")
                     + ": mean over seeds (line), min-max (band)")}
    for arm in arms:
        runs = [dict(per_seed[s]["arms"][arm]) for s in seeds]
        for r in runs:  # each seed has its own data and warm start: compare arms by what each run gained
            first, last = r.get("reward_first5"), r.get("reward_last5")
            r["reward_gain"] = None if first is None or last is None else round(last - first, 4)
        entry = {"label": runs[0]["label"], "wall_s": round(sum(r["wall_s"] for r in runs), 1)}
        for key in _NUMBERS:
            entry[key] = spread([r.get(key) for r in runs])
            entry[key]["per_seed"] = [r.get(key) for r in runs]
        out["arms"][arm] = entry
    return out


def _per_step(path: str, keys: tuple) -> dict:
    found = report._series(report.read_records(path), keys)
    return {} if found is None else dict(zip(found[1], found[2]))


def plot_seeds(per_seed: dict, out_png: str, *, title: str, smooth: int = 5) -> str:
    """Reward and masked/clipped fraction per step: mean over seeds (smoothed) and the min-max band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeds = sorted(per_seed)
    arms = list(per_seed[seeds[0]]["arms"])
    panels = (("reward gained since the run's first 5 steps", (report.REWARD,), 1.0),
              ("masked (DPPO) or clipped (PPO) tokens (%)", (report.MASKED, report.CLIPFRAC), 100.0))
    fig, axes = plt.subplots(1, len(panels), figsize=(12, 4.5))
    for ax, (name, keys, scale) in zip(axes, panels):
        for i, arm in enumerate(arms):
            series = [_per_step(per_seed[s]["arms"][arm]["metrics"], keys) for s in seeds]
            steps = sorted(set.intersection(*(set(x) for x in series))) if all(series) else []
            if not steps:
                continue
            smoothed = [report.rolling_mean([x[t] * scale for t in steps], smooth) for x in series]
            if keys == (report.REWARD,):  # seeds start from different warm starts: each run relative to its start
                smoothed = [[v - sum(x[t] for t in steps[:5]) / len(steps[:5]) for v in row]
                            for row, x in zip(smoothed, series)]
            mean = [sum(col) / len(col) for col in zip(*smoothed)]
            ax.fill_between(steps, [min(col) for col in zip(*smoothed)], [max(col) for col in zip(*smoothed)],
                            color=f"C{i}", alpha=0.15)
            ax.plot(steps, mean, color=f"C{i}", label=per_seed[seeds[0]]["arms"][arm]["label"])
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(out_png), exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def markdown_table(summary: dict) -> str:
    """The README's table of a :func:`seed_summary`: per arm the reward first -> last 5 steps and the gain of each
    seed, the gain's mean and range, the masked/clipped fraction's mean and range (means over steps), the share of
    masked tokens already outside delta before the step's first update per seed, and the mean ``|pi - mu|``."""
    tag = " / ".join(f"s{s}" for s in summary["seeds"])
    rows = [f"| arm | reward {tag} | gain {tag} | gain mean (range) | masked/clipped mean (range) | "
            f"masked at start {tag} | mean abs(pi - mu) |", "|---|---|---|---|---|---|---|"]
    sign = lambda x: "-" if x is None else f"{x:+.3f}"  # noqa: E731
    for a in summary["arms"].values():
        first, last = a["reward_first5"]["per_seed"], a["reward_last5"]["per_seed"]
        reward = " / ".join("-" if f is None or l is None else f"{f:.3f} -> {l:.3f}" for f, l in zip(first, last))
        g, m, diff = a["reward_gain"], a["masked_or_clipped_frac_mean"], a["probs_diff_mean"]
        gain_mean = "-" if g["mean"] is None else f"**{g['mean']:+.3f}** ({g['min']:+.3f}..{g['max']:+.3f})"
        masked = "-" if m["mean"] is None else f"{_pct(m['mean'])} ({_pct(m['min'])}..{_pct(m['max'])})"
        rows.append(f"| {a['label']} | {reward} | {' / '.join(sign(x) for x in g['per_seed'])} | {gain_mean} | "
                    f"{masked} | {' / '.join(_pct(x) for x in a['masked_at_start_frac_mean']['per_seed'])} | "
                    f"{'-' if diff['mean'] is None else format(diff['mean'], '.4f')} |")
    return "\n".join(rows) + "\n"
