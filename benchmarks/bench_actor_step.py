"""Benchmark: one verl 0.9.1 FSDP2 actor update (``update_actor`` -> ``train_batch``) on CPU, per loss mode.

What is timed is the whole step verl runs for a mini-batch (forward, loss, backward, optimizer step) of a tiny
Qwen2 body (hidden 64, 1 layer) under a full-size vocabulary (V = 151936, Qwen2/3) and a small one (V = 512). The
body is kept tiny on purpose so the vocabulary-sized work (LM head, log-softmax, our Top-K op) dominates, as it
does per token in a real model; at V = 512 that work is negligible and any difference between modes is pure
overhead of the plugin's code path. The tokenizer covers the head as a real one does (V = 151936: 151665 tokens,
Qwen2.5/3's 271 padding rows, which verl's vLLM server never samples and the DPPO modes renormalise away,
``ops.sampled_vocab``; V = 512: the 400-token test tokenizer), and the rollout samples only covered ids.

Modes: ``vanilla`` (verl's PPO loss), ``dppo_tv_binary``, ``dppo_tv_topk`` (K = 20, synthetic rollout top-K rows
built from the model's own initial logits plus noise, so the divergences are realistic and every row is valid); at
the small vocabulary also ``dppo_tv_topk_free_hook``, the Top-K step with a hook that computes nothing: its ratio to
binary (``topk_floor_over_binary_small_vocab``) is the part of the Top-K overhead that is not the hook's work.

Speed: one process per vocabulary builds one verl worker per mode (same seed, same weights), warms each up (the
first step compiles our op), then runs the modes interleaved, ``--reps`` rounds; the ratios are medians over rounds
of the ratio within a round (:func:`paired_ratio`), the medians per mode and their ratio are reported beside.
Host syncs: one more Top-K step under ``tests/sync_counter.py``'s ``SyncCounter`` (dppo_verl's own syncs only),
divided by the number of micro-batches; not timed (the dispatch mode slows every op down).
Memory: a fresh process per mode with glibc's mmap threshold pinned at 64 KiB (freed temporaries go back to the
OS), a warm-up step, then the rise of peak RSS (VmHWM, reset through /proc/self/clear_refs) over one more step.

    python benchmarks/bench_actor_step.py            # V = 151936 and 512, 12 x 240 response tokens, 5 rounds
    python benchmarks/bench_actor_step.py --quick    # <= 3 min on 2 cores; prints one JSON line last
    python benchmarks/bench_actor_step.py --smoke    # seconds; for tests/test_bench_actor_step_on_cpu.py
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, HERE)
os.environ.setdefault("VERL_PLATFORM", "cpu")  # verl's FSDP engine runs on this CPU only through our platform

import torch  # noqa: E402

from bench_vocab_parallel import _HONEST_MALLOC, _commit, _machine, _rss_kib  # noqa: E402

MODES = ("vanilla", "dppo_tv_binary", "dppo_tv_topk")
# At the small vocabulary only: dppo_tv_topk with a stand-in hook that computes nothing (:func:`_free_hook`). Its
# ratio to binary is the floor no hook work can remove: verl's own handling of the Top-K inputs and outputs (two more
# nested batch keys split per micro-batch, more hook outputs packed into nested tensors), our loss's Top-K metrics.
FREE_HOOK = "dppo_tv_topk_free_hook"
K = 20
V_FULL, V_SMALL = 151936, 512
# name -> (samples, prompt length, response length, samples per micro-batch, timed rounds at the full and at the
# small vocabulary, vocabularies[, modes whose peak memory is measured]). A small-vocabulary round costs ~0.5 s: many
# of them, so that a 5% difference of pure overhead is resolved on shared cores (3 rounds there swung binary/vanilla
# between 0.95 and 1.47; 21 rounds gave Top-K/binary 1.08 and 1.20 in two runs). --quick fits in 3 minutes on 2 cores:
# 179.5 s with 4 and 61 rounds (phases_s build 8, timing 139, memory 32), hence 3 and 55 and one sync count.
PRESETS = {
    "full": dict(samples=12, prompt=16, response=240, micro=3, reps=5, reps_small=31, vocabs=(V_FULL, V_SMALL)),
    "quick": dict(samples=4, prompt=16, response=128, micro=2, reps=3, reps_small=55, vocabs=(V_FULL, V_SMALL),
                  mem_modes=MODES[1:]),
    "smoke": dict(samples=2, prompt=4, response=8, micro=1, reps=1, reps_small=1, vocabs=(2048, 256)),
}
# Head rows the tokenizer does not cover (never sampled by verl's vLLM server: ops.sampled_vocab): Qwen2.5/Qwen3 pad
# a 151665-token tokenizer to a 151936-row head (271 rows); the small vocabulary keeps a few such rows too.
HEAD_PADDING = {V_FULL: 271}


def build_inputs(workdir: str, vocab: int, p: dict, seed: int = 0) -> str:
    """A tiny Qwen2 model and a batch with rollout top-K rows, saved under ``workdir``; returns the model dir."""
    from transformers import AutoModelForCausalLM

    from tiny_model import build_tiny_model

    model_dir = os.path.join(workdir, f"qwen2_v{vocab}")
    padded = HEAD_PADDING.get(vocab)
    build_tiny_model(model_dir, vocab=vocab, hidden=64, layers=1, seed=seed,
                     tokenizer_size=None if padded is None else vocab - padded)
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32, attn_implementation="sdpa")
    from transformers import AutoTokenizer

    samplable = len(AutoTokenizer.from_pretrained(model_dir))  # verl's vLLM server samples ids below it only
    g = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(p["samples"]):
        prompt = torch.randint(3, samplable, (p["prompt"],), generator=g)
        resp = torch.randint(3, samplable, (p["response"],), generator=g)
        ids = torch.cat([prompt, resp])
        with torch.no_grad():  # fp32 [S, V]: one sample at a time, no batch-sized V-wide temporary
            rows = model(ids[None]).logits[0, p["prompt"] - 1 : -1].float()
        z_mu = rows + 0.7 * torch.randn(rows.shape, generator=g)  # the sampler's logits: close to, not equal to, pi
        z_mu[torch.arange(len(resp))[::2], resp[::2]] += 8.0  # every other sampled token inside the top-K
        z_mu[:, samplable:] = float("-inf")  # the server's mask on the head rows the tokenizer does not cover
        lq = torch.log_softmax(z_mu, -1)
        top_lq, top_ids = lq.topk(K, -1)
        r = len(resp)
        samples.append(dict(prompts=prompt, responses=resp, input_ids=ids, position_ids=torch.arange(len(ids)),
                            response_mask=torch.ones(r, dtype=torch.long), rollout_topk_ids=top_ids.int(),
                            rollout_topk_logprobs=top_lq, rollout_log_probs=lq.gather(-1, resp[:, None])[:, 0],
                            old_log_probs=lq.gather(-1, resp[:, None])[:, 0],
                            advantages=torch.randn(1, generator=g).expand(r).clone()))
        del rows, z_mu, lq
    torch.save(samples, os.path.join(model_dir, "samples.pt"))
    return model_dir


def _init_dist() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))


def make_worker(model_dir: str, mode: str, n: int, micro: int):
    """verl's own ActorRolloutRefWorker from verl's Hydra config, as verl's trainer builds it."""
    overrides = [
        f"actor_rollout_ref.model.path={model_dir}", "+actor_rollout_ref.model.override_config.attn_implementation=sdpa",
        "actor_rollout_ref.actor.strategy=fsdp2", "actor_rollout_ref.ref.strategy=fsdp2",
        f"actor_rollout_ref.actor.ppo_mini_batch_size={n}", f"actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu={micro}",
        f"actor_rollout_ref.actor.policy_loss.loss_mode={mode}",
        "actor_rollout_ref.actor.use_torch_compile=False", "actor_rollout_ref.actor.fsdp_config.use_torch_compile=False",
        "actor_rollout_ref.rollout.n=1", f"actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu={micro}",
        "actor_rollout_ref.actor.optim.lr=1e-5",
        # fp32 compute: this CPU has no bf16 matmul units (no AVX512-BF16/AMX), where bf16 would be emulated and
        # slower than fp32; a GPU step computes in bf16, which halves the logits' bytes for every mode alike
        "+actor_rollout_ref.actor.fsdp_config.mixed_precision={param_dtype:fp32,reduce_dtype:fp32,buffer_dtype:fp32}",
    ]
    if mode != "vanilla":
        overrides.append("actor_rollout_ref.actor.policy_loss._target_=dppo_verl.config.DPPOPolicyLossConfig")
    if mode.endswith("topk"):
        overrides.append(f"+actor_rollout_ref.actor.policy_loss.num_topk={K}")
    from fsdp_step import actor_worker  # tests/ is on sys.path

    return actor_worker(overrides)


def _loss_mode(mode: str) -> str:
    """The verl loss mode a benchmark mode runs (the free-hook mode is dppo_tv_topk with a stand-in hook)."""
    return "dppo_tv_topk" if mode == FREE_HOOK else mode


@contextlib.contextmanager
def _free_hook():
    """While active, the Top-K logits hook returns the outputs the loss reads (support of K + 1 slots, divergence 0,
    every row valid, no excluded mass) without computing anything: what is left of the Top-K step's extra time is not
    the hook's."""
    from dppo_verl.contract import OUT_DIVERGENCE, OUT_EXCLUDED, OUT_SUPPORT_SIZE, OUT_TOPK_VALID
    from dppo_verl.integrations.actor import topk_hook

    def free(student_logits, data, knobs, *, sampled_ids=None, **_):
        zeros = torch.zeros(student_logits.shape[:-1], dtype=torch.float32, device=student_logits.device)
        out = {OUT_DIVERGENCE: zeros, OUT_SUPPORT_SIZE: zeros + (K + 1), OUT_TOPK_VALID: zeros + 1.0}
        if sampled_ids is not None:
            out[OUT_EXCLUDED] = zeros - 1e4  # log m = g + log pi(a): m = 0
        return out

    real = topk_hook.topk_outputs
    topk_hook.topk_outputs = free
    try:
        yield
    finally:
        topk_hook.topk_outputs = real


def step(worker, samples: list, mode: str) -> float:
    """One update_actor call on a fresh TensorDict (verl pops keys from it); returns wall seconds."""
    from verl.utils import tensordict_utils as tu

    free, mode = mode == FREE_HOOK, _loss_mode(mode)
    keys = [k for k in samples[0] if mode.endswith("topk") or not k.startswith("rollout_topk")]
    fields = {k: torch.nested.as_nested_tensor([s[k] for s in samples], layout=torch.jagged) for k in keys}
    fields["loss_mask"] = fields["response_mask"]
    n = len(samples)
    extra = dict(calculate_entropy=False, distillation_use_topk=False, distillation_only=False, global_batch_size=n,
                 mini_batch_size=n, epochs=1, seed=42, dataloader_kwargs={"shuffle": False}, temperature=1.0)
    td = tu.get_tensordict(tensor_dict=fields, non_tensor_dict=extra)
    with _free_hook() if free else contextlib.nullcontext():
        t0 = time.perf_counter()
        out = worker.update_actor(td)
        dt = time.perf_counter() - t0
    if mode.endswith("topk"):  # the Top-K path really ran (support > 1), not a silent binary fallback
        sizes = tu.get(out, "metrics")["actor/dppo/support_size"]
        assert min(sizes if isinstance(sizes, list) else [sizes]) > 1, sizes
    return dt


def run_timing(model_dirs: list, p: dict, threads: int) -> dict:
    """In this process, per vocabulary: one worker per mode, warm-up, interleaved rounds, then the sync count of a
    Top-K step. Both vocabularies share the process: one verl import, same conditions."""
    _init_dist()
    torch.set_num_threads(threads)
    out = {str(vocab_of(d)): _time_one(d, p) for d in model_dirs}
    out["gemm_flops_per_s"] = gemm_rate()
    return out


def gemm_rate(m: int = 512, k: int = 4096, reps: int = 3) -> float:
    """fp32 matmul throughput of this process (threads as set): what a Qwen3-8B-sized layer stack would run at."""
    a, b = torch.randn(m, k), torch.randn(k, k)
    times = []
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - t0)
    return 2 * m * k * k / statistics.median(times[1:])


def vocab_of(model_dir: str) -> int:
    return int(model_dir.rsplit("_v", 1)[1])


def _time_one(model_dir: str, p: dict) -> dict:
    from sync_counter import SyncCounter

    t0, v = time.time(), vocab_of(model_dir)
    samples = torch.load(os.path.join(model_dir, "samples.pt"))
    modes = MODES if v == max(p["vocabs"]) else MODES + (FREE_HOOK,)
    workers = {m: make_worker(model_dir, _loss_mode(m), len(samples), p["micro"]) for m in modes}
    _progress(t0, f"V = {v}: {len(modes)} verl workers built; warm-up step per mode (compiles our op)")
    warmup = {m: step(workers[m], samples, m) for m in modes}  # includes torch.compile of our op
    # Every object alive now (verl, torch, inductor, the workers) leaves the collector's view: the gc.collect()
    # before each timed step (so that no collection pause lands inside one) then costs ms, not ~0.6 s per call.
    gc.collect()
    gc.freeze()
    times = {m: [] for m in modes}
    reps = p["reps"] if v == max(p["vocabs"]) else p["reps_small"]
    _progress(t0, f"V = {v}: {reps} timed rounds")
    for r in range(reps):
        order = modes if r % 2 == 0 else modes[::-1]  # alternate the order: no mode always runs after another
        for m in order:
            gc.collect()
            times[m].append(step(workers[m], samples, m))
    out = dict(median_s={m: statistics.median(t) for m, t in times.items()}, min_s={m: min(t) for m, t in times.items()},
               times_s=times, warmup_s=warmup)
    if v == max(p["vocabs"]):  # the count does not depend on V (no data-dependent read sizes anything by it): once
        _progress(t0, f"V = {v}: one more Top-K step counting host syncs (slow: every op is intercepted)")
        with SyncCounter() as counter:
            step(workers["dppo_tv_topk"], samples, "dppo_tv_topk")
        micro_batches = len(samples) // p["micro"]
        out.update(host_syncs=counter.total, host_syncs_where=dict(counter.where), micro_batches=micro_batches,
                   host_syncs_per_microbatch=counter.total / micro_batches)
    del workers
    gc.unfreeze()
    gc.collect()
    return out


def run_memory(model_dir: str, mode: str, p: dict, threads: int) -> dict:
    """In a fresh process (pinned malloc): warm-up step, then the peak-RSS rise over one more step."""
    _init_dist()
    torch.set_num_threads(threads)
    samples = torch.load(os.path.join(model_dir, "samples.pt"))
    worker = make_worker(model_dir, mode, len(samples), p["micro"])
    step(worker, samples, mode)
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := current RSS
    base = _rss_kib("VmRSS")
    step(worker, samples, mode)
    return dict(mode=mode, step_peak_rise_mib=(_rss_kib("VmHWM") - base) / 1024, rss_before_mib=base / 1024)


def _cmd(args: list) -> list:
    return [sys.executable, os.path.abspath(__file__), *args]


def _parse(cmd: list, res: subprocess.CompletedProcess) -> dict:
    if res.returncode != 0:
        print(res.stdout[-3000:], res.stderr[-6000:], sep="\n", file=sys.stderr)
        raise SystemExit(f"benchmark subprocess failed: {' '.join(cmd)}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _child(args: list) -> dict:
    """Run one measuring process; its progress lines (``_PROGRESS`` on stderr) are passed on live, the rest of its
    stderr (verl's and transformers' logs) is kept for the error report only."""
    cmd = _cmd(args)
    pr = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    err = []

    def forward() -> None:
        for line in pr.stderr:
            err.append(line)
            if line.startswith(_PROGRESS):
                print(line, end="", file=sys.stderr, flush=True)

    reader = threading.Thread(target=forward, daemon=True)
    reader.start()
    out = pr.stdout.read()
    pr.wait()
    reader.join()
    return _parse(cmd, subprocess.CompletedProcess(cmd, pr.returncode, out, "".join(err)))


def _children_concurrently(arg_lists: list, env: dict) -> list:
    """Peak RSS is per process, so the memory processes may share the cores (their times are not used)."""
    cmds = [_cmd(a) for a in arg_lists]
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                              env={**os.environ, **env}) for c in cmds]
    results = []
    for c, pr in zip(cmds, procs):
        out, err = pr.communicate()
        results.append(_parse(c, subprocess.CompletedProcess(c, pr.returncode, out, err)))
    return results


def bench(workdir: str, preset: str, p: dict, threads: int, memory: bool) -> dict:
    """Timing of both vocabularies in one process first (alone on the cores), then memory per mode at full V."""
    t0 = time.time()
    _progress(t0, f"building the tiny models and batches (V = {', '.join(map(str, p['vocabs']))})")
    dirs = [build_inputs(workdir, v, p) for v in p["vocabs"]]
    phases = {"build_s": time.time() - t0}  # where --quick's 3 minutes go
    common = ["--preset", preset, "--threads", str(threads)]
    _progress(t0, f"timing {', '.join(MODES)} interleaved ({p['reps']} rounds at V = {p['vocabs'][0]}, "
                  f"{p['reps_small']} at V = {p['vocabs'][1]}) in one process")
    timing = _child(["--time-in", *dirs, *common])
    per_vocab = {v: dict(V=v, timing=timing[str(v)]) for v in p["vocabs"]}
    per_vocab["gemm_flops_per_s"] = timing["gemm_flops_per_s"]
    phases["timing_s"] = time.time() - t0 - sum(phases.values())
    if memory:
        _progress(t0, f"peak memory per mode at V = {p['vocabs'][0]} (one fresh process each)")
        modes = p.get("mem_modes", MODES)  # --quick: the two DPPO modes only (one process per core)
        mems = _children_concurrently([["--mem-in", dirs[0], "--mode", m, *common] for m in modes], _HONEST_MALLOC)
        per_vocab[p["vocabs"][0]]["memory"] = dict(zip(modes, mems))
        phases["memory_s"] = time.time() - t0 - sum(phases.values())
    per_vocab["phases_s"] = {k: round(v, 1) for k, v in phases.items()}
    _progress(t0, "done")
    return per_vocab


_PROGRESS = "[bench_actor_step"


def _progress(t0: float, msg: str) -> None:
    print(f"{_PROGRESS} +{time.time() - t0:.0f}s] {msg}", file=sys.stderr, flush=True)


def paired_ratio(times: dict, mode: str, base: str) -> float:
    """Median over rounds of ``t[mode] / t[base]`` within each round. The modes of one round run back to back, so a
    phase of other load on the shared cores slows both alike; per-mode times are bimodal here (fast and slow phases
    of the machine, up to 1.6x apart), and their medians' ratio swung between 1.09 and 1.23 over three runs of the
    same code at V = 512."""
    return statistics.median(a / b for a, b in zip(times[mode], times[base]))


def summarize(per_vocab: dict, v_full: int, v_small: int) -> dict:
    full, small = per_vocab[v_full], per_vocab[v_small]
    t, t_s = full["timing"]["times_s"], small["timing"]["times_s"]
    line = dict(topk_over_binary=paired_ratio(t, "dppo_tv_topk", "dppo_tv_binary"),
                topk_over_binary_small_vocab=paired_ratio(t_s, "dppo_tv_topk", "dppo_tv_binary"),
                binary_over_vanilla=paired_ratio(t, "dppo_tv_binary", "vanilla"),
                binary_over_vanilla_small_vocab=paired_ratio(t_s, "dppo_tv_binary", "vanilla"),
                host_syncs_per_microbatch=full["timing"]["host_syncs_per_microbatch"])
    if FREE_HOOK in t_s:  # what no hook work can remove, and the hook's own share (module docstring, FREE_HOOK)
        line.update(topk_floor_over_binary_small_vocab=paired_ratio(t_s, FREE_HOOK, "dppo_tv_binary"),
                    topk_over_floor_small_vocab=paired_ratio(t_s, "dppo_tv_topk", FREE_HOOK))
    med, med_s = full["timing"]["median_s"], small["timing"]["median_s"]  # reported beside, as a check
    line.update(topk_over_binary_ratio_of_medians=med["dppo_tv_topk"] / med["dppo_tv_binary"],
                topk_over_binary_small_vocab_ratio_of_medians=med_s["dppo_tv_topk"] / med_s["dppo_tv_binary"])
    # the fastest round per mode: less sensitive to other processes on shared cores (a check on the medians)
    lo, lo_s = full["timing"]["min_s"], small["timing"]["min_s"]
    line.update(topk_over_binary_min=lo["dppo_tv_topk"] / lo["dppo_tv_binary"],
                topk_over_binary_small_vocab_min=lo_s["dppo_tv_topk"] / lo_s["dppo_tv_binary"])
    if "memory" in full:
        mem = {m: r["step_peak_rise_mib"] for m, r in full["memory"].items()}
        line["peak_mem_topk_over_binary"] = mem["dppo_tv_topk"] / max(mem["dppo_tv_binary"], 1e-3)
        if "vanilla" in mem:
            line["peak_mem_binary_over_vanilla"] = mem["dppo_tv_binary"] / max(mem["vanilla"], 1e-3)
    return {k: round(v, 4) for k, v in line.items()}


QWEN3_8B_PARAMS = 8.19e9  # Qwen3-8B, embeddings included (hidden 4096, 36 layers, V = 151936, untied head)


def scaled_estimate(per_vocab: dict, v_full: int, tokens: int) -> dict:
    """What each mode's extra cost per token would add to a Qwen3-8B-sized step on this CPU (an estimate).

    Assumptions (README): the extra cost of a DPPO mode over vanilla is per response token and vocabulary-bound
    (V = 151936 here and in Qwen3), so it transfers per token unchanged from the tiny body; a Qwen3-8B step costs
    6 * 8.19e9 FLOPs per token (forward + backward, attention's extra FLOPs ignored) at this process's measured fp32
    GEMM rate. Both make the real step cheaper than it is, so the share is an upper bound; on a GPU the ratio
    differs (the op is bandwidth-bound there, the step compute-bound)."""
    rate = per_vocab["gemm_flops_per_s"]
    step_us = 1e6 * 6 * QWEN3_8B_PARAMS / rate
    out = dict(gemm_gflops=rate / 1e9, qwen3_8b_step_us_per_token=step_us)
    # medians (the statistic) and fastest rounds (less exposed to other load on shared cores)
    for stat, pick in (("median", statistics.median), ("fastest", min)):
        us = {m: 1e6 * pick(per_vocab[v_full]["timing"]["times_s"][m]) / tokens for m in MODES}
        extra = {m: us[m] - us["vanilla"] for m in MODES[1:]}
        out[stat] = dict(us_per_token=us, extra_us_per_token=extra,
                         est_overhead_vs_qwen3_8b_step={m: x / step_us for m, x in extra.items()},
                         est_topk_over_binary_qwen3_8b=(step_us + extra["dppo_tv_topk"])
                         / (step_us + extra["dppo_tv_binary"]))
    return out


def reanalyze(path: str) -> None:
    with open(path) as f:
        doc = json.load(f)
    per_vocab = {int(v): r for v, r in doc["results"].items()}
    for r in per_vocab.values():
        r["timing"]["min_s"] = {m: min(t) for m, t in r["timing"]["times_s"].items()}
    per_vocab["gemm_flops_per_s"] = doc["gemm_flops_per_s"]
    v_full, v_small = doc["sizes"]["vocabs"]
    doc.update(summary=summarize(per_vocab, v_full, v_small), reanalyzed_at=_commit(),
               qwen3_8b_estimate=scaled_estimate(per_vocab, v_full, doc["sizes"]["response_tokens"]))
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
    print(json.dumps(doc["summary"]))


def markdown(doc: dict) -> str:
    """The README table from a results JSON (``--markdown PATH``), so the README quotes the file, not a transcription."""
    rows = ["| V | mode | median step (s) | fastest round (s) | us / token | peak RSS rise of a step (MiB) |",
            "|---|---|---|---|---|---|"]
    tokens = doc["sizes"]["response_tokens"]
    for v, r in doc["results"].items():
        t, mem = r["timing"], r.get("memory", {})
        for m in (m for m in MODES + (FREE_HOOK,) if m in t["median_s"]):
            peak = f"{mem[m]['step_peak_rise_mib']:.0f}" if m in mem else "-"
            rows.append(f"| {v} | {m} | {t['median_s'][m]:.2f} | {min(t['times_s'][m]):.2f} | "
                        f"{1e6 * t['median_s'][m] / tokens:.0f} | {peak} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="<= 3 min on 2 cores, one JSON line last")
    ap.add_argument("--smoke", action="store_true", help="tiny vocabularies and batch (a test, not a measurement)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process (1: stable on shared cores)")
    ap.add_argument("--no-memory", action="store_true", help="skip the per-mode memory processes")
    ap.add_argument("--out", help="JSON path (default benchmarks/results/actor_step_cpu.json; quick/smoke: none)")
    ap.add_argument("--reanalyze", metavar="JSON", help="recompute summary and estimate of a results file from its "
                    "raw per-round times (after a change to the statistics; the measurements are not rerun)")
    ap.add_argument("--markdown", metavar="JSON", help="print the README table of a results file and exit")
    ap.add_argument("--preset", choices=tuple(PRESETS), help=argparse.SUPPRESS)
    ap.add_argument("--time-in", nargs="+", help=argparse.SUPPRESS)
    ap.add_argument("--mem-in", help=argparse.SUPPRESS)
    ap.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    preset = a.preset or ("smoke" if a.smoke else "quick" if a.quick else "full")
    p = PRESETS[preset]
    if a.reanalyze:
        reanalyze(a.reanalyze)
        return 0
    if a.markdown:
        print(markdown(json.load(open(a.markdown))))
        return 0
    if a.time_in:
        print(json.dumps(run_timing(a.time_in, p, a.threads)))
        return 0
    if a.mem_in:
        print(json.dumps(run_memory(a.mem_in, a.mode, p, a.threads)))
        return 0
    t0 = time.time()
    v_full, v_small = p["vocabs"]
    with tempfile.TemporaryDirectory(prefix="bench_actor_step_") as workdir:
        per_vocab = bench(workdir, preset, p, a.threads, memory=not a.no_memory)
    tokens = p["samples"] * p["response"]
    doc = dict(benchmark="actor_step", date=datetime.datetime.now(datetime.timezone.utc).isoformat(),
               preset=preset, machine=_machine("cpu"), commit=_commit(), torch_threads=a.threads,
               sizes=dict(p, response_tokens=tokens, K=K, hidden=64, layers=1, modes=MODES),
               results={str(v): r for v, r in per_vocab.items() if isinstance(v, int)},
               gemm_flops_per_s=per_vocab["gemm_flops_per_s"], summary=summarize(per_vocab, v_full, v_small),
               qwen3_8b_estimate=scaled_estimate(per_vocab, v_full, tokens), phases_s=per_vocab["phases_s"],
               wall_s=time.time() - t0)
    out = a.out or (None if preset != "full" else os.path.join(HERE, "results", "actor_step_cpu.json"))
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            json.dump(doc, f, indent=1)
        print("wrote", out)
    for v, r in doc["results"].items():
        med = r["timing"]["median_s"]
        mem = r.get("memory", {})
        print(f"V={v:>6s} " + "  ".join(f"{m} {1e3 * med[m]:.0f} ms" + (f" / {mem[m]['step_peak_rise_mib']:.0f} MiB"
                                                                       if m in mem else "") for m in MODES))
    print(json.dumps(dict(doc["summary"], preset=preset, response_tokens=tokens, wall_s=round(doc["wall_s"], 1))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
