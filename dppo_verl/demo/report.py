"""Progress lines and plots from verl's ``file`` logger (``trainer.logger=['console','file']``).

verl 0.9.1's ``FileLogger`` (``verl/utils/tracking.py``) writes one JSON object per line to
``$VERL_FILE_LOGGER_PATH``: ``{"step": <int>, "data": {<metric name>: <number>, ...}}``. It opens the file
with ``"wb"`` (a rerun truncates it) and writes unbuffered, so a reader can tail it while training runs.
The validation before training is its own line (only ``val-core/...`` / ``val-aux/...`` keys, at step 0);
later validations are merged into the training line of their step.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass

__all__ = ["follow", "format_step", "plot_compare", "plot_run", "read_records", "rolling_mean"]

REWARD = "critic/score/mean"  # verl's compute_data_metrics: mean sequence score of the batch
MASKED = "actor/dppo/masked_frac"
CLIPFRAC = "actor/pg_clipfrac"  # verl's own name; DPPO sets it to masked_frac, PPO to its clip fraction
MASKED_POS, MASKED_NEG = "actor/dppo/masked_frac_pos", "actor/dppo/masked_frac_neg"
DIVERGENCE = "actor/dppo/divergence_mean"
SUPPORT = "actor/dppo/support_size"  # 1 for binary divergences, up to K + 1 for Top-K
TOPK_VALID = "actor/dppo/topk_valid_frac"  # Top-K modes: fraction of response tokens with their own top-K row
STALENESS = "training/off_policy/trajectory_staleness/max"  # verl, async trainers: policy versions behind, worst
MISMATCH = "actor/dppo/mismatch_abs_mean"  # mean |pi - mu| of the sampled token, in the loss
PROBS_DIFF = "training/rollout_probs_diff_mean"  # verl's mean |pi_old - mu| (any loss; calculate_log_probs)
STEP_TIME = "timing_s/step"
NUM_TURNS_MEAN, NUM_TURNS_MAX = "num_turns/mean", "num_turns/max"  # verl: user + assistant + tool turns + 1
VAL_CORE = "val-core/"


def read_records(path: str) -> list[dict]:
    """Every complete, parseable line of a FileLogger jsonl (a half-written last line is skipped)."""
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        return _parse_lines(f.read().split(b"\n"))


def _parse_lines(lines) -> list[dict]:
    """JSON objects with a ``step`` and a ``data`` dict; anything else is ignored."""
    out = []
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("data"), dict) and "step" in rec:
            out.append(rec)
    return out


def latest_per_step(records: list[dict]) -> list[dict]:
    """One record per step and kind (training: has the reward; validation-only), the last one logged: a step trained
    again by a resumed run (:mod:`.resume`) supersedes the killed attempt's. In step order."""
    last = {}
    for rec in records:
        last[(int(rec["step"]), REWARD in rec["data"])] = rec
    return [last[key] for key in sorted(last)]


class _Tail:
    """Incremental reader of a jsonl that grows, and may not exist yet or be truncated by a new run."""

    def __init__(self, path: str):
        """Nothing is opened yet: the trainer may create the file later."""
        self.path, self.pos, self.partial, self.inode = path, 0, b"", None

    def read(self) -> list[dict]:
        """Records completed since the last call."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return []
        if st.st_ino != self.inode or st.st_size < self.pos:  # new file, or truncated in place
            self.pos, self.partial, self.inode = 0, b"", st.st_ino
        with open(self.path, "rb") as f:
            f.seek(self.pos)
            chunk = f.read()
        self.pos += len(chunk)
        lines = (self.partial + chunk).split(b"\n")
        self.partial = lines.pop()  # no newline yet: the writer may be mid-line
        return _parse_lines(lines)


def _number(data: dict, *keys: str) -> float | None:
    """The first of ``keys`` present in ``data`` as a finite number, else None."""
    for key in keys:
        value = data.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
    return None


def _val_reward(data: dict) -> float | None:
    """The core validation score (``val-core/<source>/<acc|reward>/mean@N``), if this line has one."""
    keys = sorted(k for k in data if k.startswith(VAL_CORE) and "/mean@" in k)
    return _number(data, *keys) if keys else None


def _duration(seconds: float) -> str:
    """``1m20s`` / ``45s`` / ``1h02m``."""
    seconds = max(0, int(round(seconds)))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def _fmt(value: float | None, spec: str, scale: float = 1.0, suffix: str = "") -> str:
    """``value`` formatted (scaled, with a suffix), or ``n/a`` when the metric was not logged."""
    return "n/a" if value is None else f"{value * scale:{spec}}{suffix}"


def format_step(step: int, total: int, data: dict, sec_per_step: float | None) -> str:
    """One progress line, e.g. ``step 3/40 | reward 0.412 | masked 1.2% (A>0 0.8%, A<0 1.6%) | D_topk 0.0120
    | |pi-mu| 0.0031 | 2.3 s/step | ETA 1m20s``; a metric that was not logged shows ``n/a``."""
    masked = _fmt(_number(data, MASKED, CLIPFRAC), ".1f", 100, "%")
    pos, neg = _number(data, MASKED_POS), _number(data, MASKED_NEG)
    if pos is not None or neg is not None:
        masked += f" (A>0 {_fmt(pos, '.1f', 100, '%')}, A<0 {_fmt(neg, '.1f', 100, '%')})"
    support = _number(data, SUPPORT)
    d_name = "D" if support is None else ("D_binary" if support <= 1 else "D_topk")
    parts = [f"step {step}/{total}", f"reward {_fmt(_number(data, REWARD), '.3f')}", f"masked {masked}",
             f"{d_name} {_fmt(_number(data, DIVERGENCE), '.4f')}",
             f"|pi-mu| {_fmt(_number(data, MISMATCH, PROBS_DIFF), '.4f')}"]
    turns = _number(data, NUM_TURNS_MEAN)
    if turns is not None and _number(data, NUM_TURNS_MAX, NUM_TURNS_MEAN) > 2:  # multi-turn: tool calls happened
        parts.append(f"turns {turns:.2f} (max {_number(data, NUM_TURNS_MAX):.0f})")
    stale = _number(data, STALENESS)
    if stale is not None:  # async trainers: how many policy versions behind the oldest trajectory was
        parts.append(f"stale {stale:.0f}")
    val = _val_reward(data)
    if val is not None:
        parts.append(f"val {val:.3f}")
    if sec_per_step is not None:
        parts += [f"{sec_per_step:.1f} s/step", f"ETA {_duration(sec_per_step * max(0, total - step))}"]
    return " | ".join(parts)


@dataclass
class _Pace:
    """Seconds per step: verl's own ``timing_s/step`` when logged, else the time between lines."""

    times: list
    last_seen: float | None = None

    def update(self, data: dict, now: float) -> float | None:
        """Record one training line (arrived at ``now``); returns the mean of the last 5 step times."""
        measured = _number(data, STEP_TIME)
        if measured is None and self.last_seen is not None:
            measured = now - self.last_seen
        self.last_seen = now
        if measured is not None:
            self.times = (self.times + [measured])[-5:]  # recent steps: the first one includes warm-up
        return sum(self.times) / len(self.times) if self.times else None


def follow(path: str, total_steps: int, start_time: float | None = None, stop_event=None,
           poll_s: float = 1.0, out=print) -> list[dict]:
    """Tail ``path`` while training runs and ``out`` one line per logged step; returns the records read.

    Returns once a training step ``>= total_steps`` was read, or once ``stop_event`` (a ``threading.Event``)
    is set (after a last read). ``start_time`` (``time.time()`` at launch) adds the elapsed time to each line.
    """
    tail, pace, seen = _Tail(path), _Pace([]), []
    while True:
        stopping = stop_event is not None and stop_event.is_set()
        for rec in tail.read():
            seen.append(rec)
            step, data = int(rec["step"]), rec["data"]
            if _number(data, REWARD) is None:  # validation-only line (before training)
                val = _val_reward(data)
                out(f"validation at step {step} | reward {_fmt(val, '.3f')}")
                continue
            line = format_step(step, total_steps, data, pace.update(data, time.time()))
            if start_time is not None:
                line += f" | elapsed {_duration(time.time() - start_time)}"
            out(line)
            if step >= total_steps:
                return seen
        if stopping:
            return seen
        time.sleep(poll_s)


# ---------------------------------------------------------------------------------------------- plots


@dataclass(frozen=True)
class _Panel:
    """One of the four plot panels: what to draw for a single run and for a comparison."""

    title: str
    series: tuple  # ((label, (key, fallback keys...)), ...) drawn for a single run
    compare: tuple  # (key, fallback keys...) drawn once per run in a comparison
    percent: bool = False


_PANELS = (
    _Panel("reward (mean partial-credit score)", (("train batch", (REWARD,)),), (REWARD,)),
    _Panel("masked (DPPO) or clipped (PPO) fraction of tokens (%)", (("A > 0", (MASKED_POS,)), ("A < 0", (MASKED_NEG,)),
                                            ("all", (MASKED, CLIPFRAC))), (MASKED, CLIPFRAC), percent=True),
    _Panel("mean divergence D (Top-K or binary)", (("D", (DIVERGENCE,)),), (DIVERGENCE,)),
    # In a comparison every run draws verl's own |pi_old - mu| (logged for any loss): the loss-side MISMATCH is
    # measured during the updates (pi drifts across mini-batches), so mixing the two would compare unlike things.
    _Panel("mean |pi - mu| (sampled token)", (("|pi - mu|", (MISMATCH, PROBS_DIFF)),), (PROBS_DIFF, MISMATCH)),
)


def _series(records: list[dict], keys: tuple) -> tuple[str, list, list] | None:
    """(key used, steps, values) for the first of ``keys`` logged anywhere in ``records``, else None."""
    for key in keys:
        points = [(r["step"], _number(r["data"], key)) for r in records]
        points = [(s, v) for s, v in points if v is not None]
        if points:
            return key, [s for s, _ in points], [v for _, v in points]
    return None


def _new_figure(title: str | None):
    """A 2 x 2 figure on the Agg backend; returns (pyplot, figure, flat list of axes)."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a CPU box / in CI
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    if title:
        fig.suptitle(title)
    return plt, fig, axes.ravel()


def _finish_panel(ax, panel: _Panel, drawn: bool) -> None:
    """Title, axis label, grid, and a legend, or a "not logged" note on an empty panel."""
    ax.set_title(panel.title, fontsize=10)
    ax.set_xlabel("training step")
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=8)
    else:  # an honest empty panel instead of a crash or a misleading flat line
        ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="gray")


def _save(plt, fig, out_png: str) -> None:
    """Write the PNG (creating its folder) and free the figure."""
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def plot_run(metrics_jsonl: str, out_png: str, title: str | None = None,
             extra_reward_series: dict | None = None) -> dict[str, list[str]]:
    """Four panels of one run (reward, masked fraction by advantage sign, mean divergence, mean |pi - mu|).
    ``extra_reward_series`` (``{label: (steps, values)}``, values in [0, 1]) is drawn on the reward panel too,
    e.g. the tool agent's tool-call rate.

    Returns ``{panel title: [metric keys drawn]}`` (empty list: the panel says "not logged").
    """
    records = latest_per_step(read_records(metrics_jsonl))
    plt, fig, axes = _new_figure(title)
    drawn = {}
    for ax, panel in zip(axes, _PANELS):
        drawn[panel.title] = []
        for label, keys in panel.series:
            found = _series(records, keys)
            if found is None:
                continue
            key, steps, values = found
            scale = 100.0 if panel.percent else 1.0
            ax.plot(steps, [v * scale for v in values], marker=".", label=label if key == keys[0] else key)
            drawn[panel.title].append(key)
        if panel.compare == (REWARD,):
            _draw_validation(ax, records, drawn[panel.title])
            for label, (steps, values) in (extra_reward_series or {}).items():
                ax.plot(steps, values, "^:", label=label)
                drawn[panel.title].append(label)
        _finish_panel(ax, panel, bool(drawn[panel.title]))
    _save(plt, fig, out_png)
    return drawn


def _draw_validation(ax, records: list[dict], drawn: list[str]) -> None:
    """Validation scores (greedy or sampled per verl's val_kwargs) as markers on the reward panel."""
    points = [(r["step"], _val_reward(r["data"])) for r in records]
    points = [(s, v) for s, v in points if v is not None]
    if points:
        ax.plot([s for s, _ in points], [v for _, v in points], "s--", label="validation")
        drawn.append(VAL_CORE + "*")


def rolling_mean(values: list[float], window: int) -> list[float]:
    """Trailing mean over up to ``window`` points (the first points average what exists so far)."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot_compare(runs: dict[str, str], out_png: str, title: str | None = None,
                 smooth: int = 1) -> dict[str, list[str]]:
    """The same four panels with one line per run (``{label: metrics jsonl}``), e.g. DPPO vs PPO clipping.

    The masked panel shows each run's overall fraction (``pg_clipfrac`` for a run without DPPO metrics).
    ``smooth > 1`` draws the trailing ``smooth``-step mean as the line and the raw values as faint dots (a
    64-sample batch's reward is noisy). Returns ``{panel title: [labels drawn]}``.
    """
    loaded = {label: read_records(path) for label, path in runs.items()}
    plt, fig, axes = _new_figure(title)
    drawn = {}
    for ax, panel in zip(axes, _PANELS):
        drawn[panel.title] = []
        for i, (label, records) in enumerate(loaded.items()):
            color = f"C{i % 10}"  # one colour per run in every panel, even where a run has nothing to draw
            found = _series(records, panel.compare)
            if found is None:
                continue
            key, steps, values = found
            scale = 100.0 if panel.percent else 1.0
            values = [v * scale for v in values]
            name = label if key == panel.compare[0] else f"{label} ({key})"
            if smooth > 1:
                ax.plot(steps, rolling_mean(values, smooth), color=color, label=name)
                ax.plot(steps, values, ".", color=color, alpha=0.3)
            else:
                ax.plot(steps, values, marker=".", color=color, label=name)
            drawn[panel.title].append(label)
        _finish_panel(ax, panel, bool(drawn[panel.title]))
    _save(plt, fig, out_png)
    return drawn


def main(argv=None) -> None:
    """CLI: ``follow PATH --total-steps N``, ``plot PATH OUT.png``, ``compare OUT.png LABEL=PATH ...``."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m dppo_verl.demo.report", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("follow", help="print one line per logged step until the last one")
    f.add_argument("path")
    f.add_argument("--total-steps", type=int, required=True)
    g = sub.add_parser("plot", help="four-panel PNG of one run")
    g.add_argument("path")
    g.add_argument("out_png")
    g.add_argument("--title")
    c = sub.add_parser("compare", help="four-panel PNG with one line per run")
    c.add_argument("out_png")
    c.add_argument("runs", nargs="+", metavar="LABEL=PATH")
    c.add_argument("--title")
    args = p.parse_args(argv)
    if args.cmd == "follow":
        follow(args.path, args.total_steps, start_time=time.time())
    elif args.cmd == "plot":
        print(plot_run(args.path, args.out_png, args.title))
    else:
        print(plot_compare(dict(run.split("=", 1) for run in args.runs), args.out_png, args.title))


if __name__ == "__main__":
    main()
