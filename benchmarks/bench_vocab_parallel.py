"""Benchmark: log pi at K + 1 ids from a vocabulary shard. Providers share one setup factory.

Providers:
  reference   torch.log_softmax(logits.float(), -1).gather(-1, ids)  (eager; tests/reference.py)
  dppo        dppo_verl.ops.vocab_parallel_logprobs, compiled backend (the default)
  dppo_eager  the same op, eager row-chunked backend
  read_floor  logits.amax(-1): one read of the logits, the lower bound for any exact method
  authors     the DPPO paper authors' approach, written here independently from its description (not their code):
              torch.compile of a full fp32 log_softmax over [N, V], a gather at the K + 1 ids, and the top-K
              probability sum with its rest bucket (1 - the support's mass)
  triton      the same op, backend="triton" (fused Triton kernel, dppo_verl.ops.kernels); GPU only
  dppo_sq     vocab_parallel_stats with the predictive statistic (sq_exclude = the K + 1 ids), compiled backend
  triton_sq   the same with backend="triton" (the statistic fused into the kernel's single read)
  fused_fwbw  issue #10 stage 2, forward + backward: dppo_verl.ops.fused_logprob.fused_logprobs (one Triton read
              for the K + 1 ids and log pi(label), then the Triton gradient kernel); GPU only
  verl_fwbw   what it replaces (policy_loss.fused_logprobs=False): our stage-1 stats (compiled backend) plus verl's
              logprobs_from_logits forward + backward (flash-attn's cross-entropy when installed; here with
              inplace_backward=False, so both providers allocate the gradient: the engine passes True when
              no entropy is computed, which saves that N x V allocation, and so its memory is understated here); GPU only
  eager_fwbw  the same without verl: our stage-1 stats (compiled) plus an eager fp32 log_softmax, gather of the label
              and its backward (verl's path when flash-attn is not installed); runs anywhere, default on CUDA only

Speed and memory come from different processes, and the JSON and the README say which: the speed (median_ms) from
a normal process (glibc's default malloc, as a user runs), the memory (extra_mib) from a second process with glibc's
mmap threshold pinned (below); the pinned process's own median (median_ms_pinned) and the normal process's memory
(extra_mib_unpinned, which freed temporaries kept in the heap can hide) are recorded too. On CUDA both come from
one normal process (the caching allocator's max_memory_allocated needs no pin).

The triton and *_fwbw providers are skipped on CPU with a message: Triton's CPU interpreter is a correctness tool
(tests/test_triton_kernel_on_cpu.py), not a speed measurement. The *_sq providers run by default on CUDA only.

Each (provider, N, dtype) runs in fresh subprocesses: warm-up (includes torch.compile), then the timed
repetitions. On CPU the peak extra memory is measured in a second fresh subprocess with glibc's mmap
threshold pinned at 64 KiB (so freed temporaries go back to the OS and cannot hide in the heap): the rise
of the process's peak RSS (VmHWM, reset through /proc/self/clear_refs) above its RSS once the inputs exist
and the warm-up ran. On CUDA it is torch.cuda.max_memory_allocated above the allocated baseline.
Results go to JSON stamped with machine, torch version, commit and sizes.

  python benchmarks/bench_vocab_parallel.py                      # CPU: N in {512, 2048, 8192}
  python benchmarks/bench_vocab_parallel.py --device cuda        # GPU: N in {4096, 16384, 32768}, all providers
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "tests"))

V_QWEN3 = 151936  # Qwen3 vocabulary
K = 20
PROVIDERS = ("reference", "dppo", "dppo_eager", "read_floor", "authors", "triton", "dppo_sq", "triton_sq", "fused_fwbw",
             "verl_fwbw", "eager_fwbw")
CPU_PROVIDERS = ("reference", "dppo", "dppo_eager", "read_floor", "authors", "triton")  # triton: skipped, with a message
GPU_ONLY = ("triton", "triton_sq", "fused_fwbw", "verl_fwbw")


def _setup_vocab_parallel(n: int, v: int, k: int, dtype: torch.dtype, device: str, seed: int = 0):
    """Logits ``[N, V]`` and ``[N, K + 1]`` ids (top-K of the logits plus a random 'sampled' id)."""
    g = torch.Generator(device=device).manual_seed(seed)  # on the device: N = 32768 rows would take minutes on a CPU
    logits = torch.empty(n, v, dtype=dtype, device=device)
    for s in range(0, n, 256):  # fill in slices: no N x V fp32 temporary before the measurement
        logits[s : s + 256] = (torch.randn(min(256, n - s), v, generator=g, device=device) * 3.0).to(dtype)
    sampled = torch.randint(0, v, (n, 1), generator=g, device=device)
    ids = torch.cat([logits[:, :4096].float().topk(k, dim=-1).indices, sampled], 1)
    return logits, ids


def _provider(name: str):
    import reference as ref
    from dppo_verl.ops.vocab_parallel import vocab_parallel_logprobs, vocab_parallel_stats

    def with_rest_sq(backend):  # every support slot excluded, as the predictive direction asks
        return lambda x, i: vocab_parallel_stats(x, i, sq_exclude=torch.ones_like(i, dtype=torch.bool),
                                                 backend=backend).logp

    return {
        "reference": ref.dense_logprobs_fp32,
        "dppo": lambda x, i: vocab_parallel_logprobs(x, i, backend="compile"),
        "dppo_eager": lambda x, i: vocab_parallel_logprobs(x, i, backend="eager"),
        "read_floor": lambda x, i: x.amax(-1),
        "authors": lambda x, i: _authors_compiled()(x, i)[0],
        "triton": lambda x, i: vocab_parallel_logprobs(x, i, backend="triton"),
        "dppo_sq": with_rest_sq("compile"),
        "triton_sq": with_rest_sq("triton"),
        "fused_fwbw": _fused_fwbw,
        "verl_fwbw": _verl_fwbw,
        "eager_fwbw": _eager_fwbw,
    }[name]


def _authors_style(logits, ids):
    """Baseline: materialise log pi over the whole vocabulary in fp32, then read the K + 1 ids from it.

    The last id is the sampled token, the first K the rollout's top-K; the rest bucket is what the support leaves
    (the sampled token counted once when it is also in the top-K). Returns (log pi at the ids, rest mass)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    at = logp.gather(-1, ids)
    p = at.exp()
    sampled_in_topk = (ids[:, -1:] == ids[:, :-1]).any(-1)
    support_mass = p[:, :-1].sum(-1) + torch.where(sampled_in_topk, 0.0, p[:, -1])
    return at, (1.0 - support_mass).clamp_min(0.0)


_AUTHORS = []


def _authors_compiled():
    if not _AUTHORS:  # one compiled function per process (each configuration runs in its own process)
        _AUTHORS.append(torch.compile(_authors_style, dynamic=False))
    return _AUTHORS[0]


def _fused_fwbw(logits, ids):
    """Stage 2: log pi at the K + 1 ids and log pi(label) (label = the last, 'sampled' id) with its backward."""
    from dppo_verl.ops.fused_logprob import fused_logprobs

    x = logits.detach().requires_grad_(True)
    out = fused_logprobs(x, ids[:, -1], ids)
    out.label_logp.sum().backward()
    return out.support_logp  # [N, K + 1], checked against fp64 like the other providers


def _verl_fwbw(logits, ids):
    """The option-off path: our stage-1 read for the K + 1 ids, then verl's own sampled-token pass and backward."""
    from verl.utils.torch_functional import logprobs_from_logits

    from dppo_verl.ops.vocab_parallel import vocab_parallel_logprobs

    x = logits.detach().requires_grad_(True)
    support = vocab_parallel_logprobs(x.detach(), ids, backend="compile")
    logprobs_from_logits(x, ids[:, -1], inplace_backward=False).sum().backward()
    return support


def _eager_fwbw(logits, ids):
    """verl's option-off path without verl (no flash-attn): stage-1 stats, then an eager fp32 label pass + backward."""
    from dppo_verl.ops.vocab_parallel import vocab_parallel_logprobs

    x = logits.detach().requires_grad_(True)
    support = vocab_parallel_logprobs(x.detach(), ids, backend="compile")
    torch.log_softmax(x.float(), dim=-1).gather(-1, ids[:, -1:]).sum().backward()
    return support


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def run_one(provider: str, n: int, dtype_name: str, device: str, reps: int) -> dict:
    """Measure one configuration in this process (called in a fresh subprocess)."""
    import gc

    import reference as ref

    dtype = getattr(torch, dtype_name)
    logits, ids = _setup_vocab_parallel(n, V_QWEN3, K, dtype, device)
    fn = _provider(provider)
    out = fn(logits, ids)  # warm-up, compile
    err = None
    if provider not in ("reference", "read_floor"):  # the authors' baseline is checked like ours
        rows = slice(0, min(n, 64))
        err = float((out[rows].double().cpu() - ref.logprobs_at(logits[rows].cpu(), ids[rows].cpu())).abs().max())
    del out
    gc.collect()
    _sync(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        base = _rss_kib("VmRSS") * 1024
    times = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        out = fn(logits, ids)
        _sync(device)
        times.append(time.perf_counter() - t0)
        del out
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else _rss_kib("VmHWM") * 1024
    return dict(provider=provider, N=n, dtype=dtype_name, median_ms=1e3 * statistics.median(times),
                reps=reps, extra_mib=max(0, peak - base) / 2**20, max_abs_err_vs_fp64=err)


def _machine(device: str) -> dict:
    info = dict(platform=platform.platform(), python=platform.python_version(), torch=torch.__version__,
                threads=torch.get_num_threads(), cpus=os.cpu_count())
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _commit() -> str:
    try:
        sha = subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=ROOT, text=True).strip()
        dirty = subprocess.check_output(["git", "status", "--porcelain", "--", "dppo_verl"], cwd=ROOT, text=True).strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--sizes", type=int, nargs="+")
    p.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    p.add_argument("--providers", nargs="+", choices=PROVIDERS, help="default: all on cuda, CPU_PROVIDERS on cpu")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--rounds", type=int, default=1, help="measure every provider this many times in turn (median)")
    p.add_argument("--no-pinned", action="store_true", help="CPU: skip the pinned memory process (memory then from "
                   "the normal process, which can hide freed temporaries; for dry runs)")
    p.add_argument("--out", help="JSON path (default benchmarks/results/vocab_parallel_<device>.json)")
    p.add_argument("--one", nargs=3, metavar=("PROVIDER", "N", "DTYPE"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.one:
        print(json.dumps(run_one(a.one[0], int(a.one[1]), a.one[2], a.device, a.reps)))
        return 0
    sizes = a.sizes or ([512, 2048, 8192] if a.device == "cpu" else [4096, 16384, 32768])
    providers = a.providers or list(CPU_PROVIDERS if a.device == "cpu" else PROVIDERS)
    if a.device == "cpu" and any(p in GPU_ONLY for p in providers):
        print(f"skipping {[p for p in providers if p in GPU_ONLY]} on CPU: Triton runs there only through its "
              "interpreter, a correctness tool (tests/test_triton_kernel_on_cpu.py), not a speed measurement")
        providers = [p for p in providers if p not in GPU_ONLY]
    results = []
    for dtype in a.dtypes:
        for n in sizes:
            results += _measure_size(a, providers, n, dtype)
    summary = _ratios(results)
    for line in summary:
        print(line)
    doc = dict(benchmark="vocab_parallel_logprobs", date=datetime.datetime.now(datetime.timezone.utc).isoformat(),
               device=a.device, machine=_machine(a.device), commit=_commit(), V=V_QWEN3, K=K, M=K + 1,
               method=_method(a.device), results=results, summary=summary)
    out = a.out or os.path.join(HERE, "results", f"vocab_parallel_{a.device}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(doc, f, indent=1)
    print("wrote", out)
    return 0


_HONEST_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
_PIN = "MALLOC_MMAP_THRESHOLD_=65536 MALLOC_TRIM_THRESHOLD_=0"


def _measure_size(a, providers, n: int, dtype: str) -> list:
    """Every provider at one (N, dtype), ``--rounds`` times in turn: a fresh process per measurement, and the median
    over rounds of each process's median (on shared cores, the rounds spread other load over the providers)."""
    runs = {p: [] for p in providers}
    for _ in range(a.rounds):
        for prov in providers:
            reps = a.reps if n <= 2048 or prov != "reference" else max(3, a.reps // 2)
            r = _subprocess(a.device, reps, prov, n, dtype, {})
            r["speed_from"] = r["memory_from"] = "normal process"
            if a.device == "cpu" and not a.no_pinned:  # memory from the pinned process; its speed kept for comparison
                pinned = _subprocess(a.device, reps, prov, n, dtype, _HONEST_MALLOC)
                r.update(extra_mib_unpinned=r["extra_mib"], extra_mib=pinned["extra_mib"],
                         median_ms_pinned=pinned["median_ms"], memory_from="pinned process (" + _PIN + ")")
            runs[prov].append(r)
    out = []
    for prov, rs in runs.items():
        r = dict(rs[0], rounds=len(rs))
        for key in ("median_ms", "median_ms_pinned", "extra_mib", "extra_mib_unpinned"):
            if key in r:
                r[key] = statistics.median(x[key] for x in rs)
                r[key + "_per_round"] = [x[key] for x in rs]
        out.append(r)
        pin = f" (pinned {r['median_ms_pinned']:.1f} ms)" if "median_ms_pinned" in r else ""
        print(f"{dtype:9s} N={n:6d} {prov:11s} {r['median_ms']:10.1f} ms{pin}  extra {r['extra_mib']:9.1f} MiB"
              + (f"  err {r['max_abs_err_vs_fp64']:.1e}" if r["max_abs_err_vs_fp64"] is not None else ""), flush=True)
    return out


def _method(device: str) -> dict:
    if device == "cuda":
        return dict(speed="median_ms: a normal process", memory="extra_mib: torch.cuda.max_memory_allocated above the "
                    "allocated baseline, same process (torch.cuda.empty_cache is never called, and its cost is not measured)")
    return dict(speed="median_ms: a normal process (default glibc malloc); median_ms_pinned: the pinned process",
                memory=f"extra_mib: rise of VmHWM in a fresh process with {_PIN}; extra_mib_unpinned: the same in the "
                       "normal process (freed temporaries kept in glibc's heap can hide there)")


def _subprocess(device, reps, prov, n, dtype, env) -> dict:
    cmd = [sys.executable, __file__, "--device", device, "--reps", str(reps), "--one", prov, str(n), dtype]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, **env})
    if res.returncode != 0:
        print(res.stderr[-2000:], file=sys.stderr)
        raise SystemExit(f"benchmark subprocess failed: {' '.join(cmd)}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _ratios(results) -> list[str]:
    by = {(r["provider"], r["N"], r["dtype"]): r for r in results}
    lines = []
    for (prov, n, dt), r in sorted(by.items()):
        ref = by.get(("reference", n, dt))
        floor = by.get(("read_floor", n, dt))
        if prov not in ("dppo", "triton") or ref is None:
            continue
        line = (f"{dt} N={n}: {prov} is {ref['median_ms'] / r['median_ms']:.2f}x faster than reference, "
                f"extra memory {r['extra_mib']:.1f} MiB = 1/{ref['extra_mib'] / max(r['extra_mib'], 1e-3):.0f} of reference's")
        if floor is not None:
            line += f", {r['median_ms'] / floor['median_ms']:.2f}x the one-read floor"
        lines.append(line)
    for base, fused in (("authors", "dppo"), ("authors", "triton"), ("dppo", "triton"), ("dppo_sq", "triton_sq"), ("verl_fwbw", "fused_fwbw"),
                        ("eager_fwbw", "fused_fwbw")):  # measured, not assumed
        for (prov, n, dt), r in sorted(by.items()):
            b = by.get((base, n, dt))
            if prov == fused and b is not None:
                lines.append(f"{dt} N={n}: {fused} takes {r['median_ms'] / b['median_ms']:.2f}x the time of {base}, "
                             f"extra memory {r['extra_mib']:.1f} vs {b['extra_mib']:.1f} MiB")
    return lines


if __name__ == "__main__":
    raise SystemExit(main())
