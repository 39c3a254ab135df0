"""Demo progress lines and plots, from jsonl files written by verl's own FileLogger."""

import os
import threading
import time

import pytest

from dppo_verl.demo import report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _dppo_metrics(step: int) -> dict:
    """A training step's metrics under the names verl 0.9.1 and our loss log."""
    return {
        "critic/score/mean": 0.40 + 0.01 * step,
        "actor/dppo/masked_frac": 0.012, "actor/pg_clipfrac": 0.012,
        "actor/dppo/masked_frac_pos": 0.008, "actor/dppo/masked_frac_neg": 0.016,
        "actor/dppo/divergence_mean": 0.012, "actor/dppo/support_size": 21.0,
        "actor/dppo/mismatch_abs_mean": 0.0031, "training/rollout_probs_diff_mean": 0.0030,
        "timing_s/step": 2.0, "training/global_step": step,
    }


@pytest.fixture
def file_logger(tmp_path, monkeypatch):
    """verl's FileLogger writing to a temp path (it reads VERL_FILE_LOGGER_PATH at construction)."""
    from verl.utils.tracking import FileLogger

    path = str(tmp_path / "metrics.jsonl")
    monkeypatch.setenv("VERL_FILE_LOGGER_PATH", path)
    return path, lambda: FileLogger(project_name="demo", experiment_name="test")


def _write_run(make_logger, steps, metrics=_dppo_metrics, val=0.38):
    logger = make_logger()
    logger.log({"val-core/dppo_demo/reverse/acc/mean@1": val}, step=0)  # validation before training
    for step in steps:
        logger.log(metrics(step), step=step)
    logger.finish()


def test_follow_prints_one_line_per_step_in_the_expected_format(file_logger):
    path, make_logger = file_logger
    _write_run(make_logger, [1, 2, 3])
    lines, stop = [], threading.Event()
    stop.set()  # read what is there, then return
    records = report.follow(path, total_steps=40, stop_event=stop, poll_s=0.01, out=lines.append)
    assert len(records) == 4
    assert lines[0] == "validation at step 0 | reward 0.380"
    assert lines[3] == ("step 3/40 | reward 0.430 | masked 1.2% (A>0 0.8%, A<0 1.6%) | D_topk 0.0120 "
                        "| |pi-mu| 0.0031 | 2.0 s/step | ETA 1m14s")  # 37 steps left x 2 s
    assert len(lines) == 4


def test_follow_tails_a_file_that_appears_and_grows_while_it_runs(file_logger):
    path, make_logger = file_logger
    lines, done = [], threading.Event()

    def trainer():
        time.sleep(0.2)  # the follower starts before verl has created the file
        logger = make_logger()
        for step in range(1, 6):
            data = _dppo_metrics(step)
            del data["timing_s/step"]  # pace then comes from the time between lines
            logger.log(data, step=step)
            time.sleep(0.05)
        logger.finish()

    writer = threading.Thread(target=trainer)
    writer.start()
    follower = threading.Thread(target=lambda: (report.follow(path, 5, time.time(), poll_s=0.02, out=lines.append),
                                                done.set()))
    follower.start()
    writer.join()
    assert done.wait(10), "follow() did not return after the last step"
    assert [line.split(" | ")[0] for line in lines] == [f"step {s}/5" for s in range(1, 6)]
    assert "ETA" in lines[-1] and "elapsed" in lines[-1]


def test_tail_waits_for_a_complete_line_and_restarts_on_truncation(tmp_path):
    path = str(tmp_path / "m.jsonl")
    tail = report._Tail(path)
    assert tail.read() == []  # not there yet
    with open(path, "wb") as f:
        f.write(b'{"step": 1, "data": {"critic/score/mean": 0.5}}\n{"step": 2, "da')
    assert [r["step"] for r in tail.read()] == [1]
    with open(path, "ab") as f:
        f.write(b'ta": {"critic/score/mean": 0.6}}\n')
    assert [r["step"] for r in tail.read()] == [2]
    with open(path, "wb") as f:  # a rerun: FileLogger opens with "wb"
        f.write(b'{"step": 1, "data": {"critic/score/mean": 0.1}}\n')
    assert [r["data"]["critic/score/mean"] for r in tail.read()] == [0.1]


def test_missing_metrics_show_na_and_not_logged(file_logger, tmp_path):
    path, make_logger = file_logger
    _write_run(make_logger, [1, 2], metrics=lambda s: {"critic/score/mean": 0.5, "actor/pg_loss": float("nan")})
    line = report.format_step(2, 10, report.read_records(path)[-1]["data"], None)
    assert line == "step 2/10 | reward 0.500 | masked n/a | D n/a | |pi-mu| n/a"
    async_line = report.format_step(2, 10, {"critic/score/mean": 0.5, report.STALENESS: 1.0}, None)
    assert async_line == "step 2/10 | reward 0.500 | masked n/a | D n/a | |pi-mu| n/a | stale 1"  # async trainers
    out = str(tmp_path / "run.png")
    drawn = report.plot_run(path, out, title="reward only")
    assert list(drawn.values()) == [["critic/score/mean", "val-core/*"], [], [], []]
    with open(out, "rb") as f:
        assert f.read(8) == PNG_MAGIC


def test_plot_run_draws_every_panel(file_logger, tmp_path):
    import matplotlib.image

    path, make_logger = file_logger
    _write_run(make_logger, range(1, 9))
    out = str(tmp_path / "sub" / "run.png")
    drawn = report.plot_run(path, out, title="dppo_tv_topk")
    assert list(drawn.values()) == [
        ["critic/score/mean", "val-core/*"],
        ["actor/dppo/masked_frac_pos", "actor/dppo/masked_frac_neg", "actor/dppo/masked_frac"],
        ["actor/dppo/divergence_mean"], ["actor/dppo/mismatch_abs_mean"]]
    image = matplotlib.image.imread(out)
    assert image.shape[0] > 500 and image.shape[1] > 800 and image.std() > 0.05  # a real picture, not blank
    assert os.path.getsize(out) > 20_000


def test_plot_compare_uses_verls_fallback_metrics_for_a_run_without_dppo(tmp_path):
    dppo, ppo = str(tmp_path / "dppo.jsonl"), str(tmp_path / "ppo.jsonl")
    import json

    with open(dppo, "w") as f:
        for step in range(1, 5):
            f.write(json.dumps({"step": step, "data": _dppo_metrics(step)}) + "\n")
    with open(ppo, "w") as f:  # PPO clipping: no actor/dppo/* metrics
        for step in range(1, 5):
            f.write(json.dumps({"step": step, "data": {"critic/score/mean": 0.4, "actor/pg_clipfrac": 0.03,
                                                       "training/rollout_probs_diff_mean": 0.004}}) + "\n")
    out = str(tmp_path / "compare.png")
    drawn = report.plot_compare({"DPPO": dppo, "PPO clip": ppo}, out, title="DPPO vs PPO")
    assert list(drawn.values()) == [["DPPO", "PPO clip"], ["DPPO", "PPO clip"], ["DPPO"], ["DPPO", "PPO clip"]]
    with open(out, "rb") as f:
        assert f.read(8) == PNG_MAGIC
