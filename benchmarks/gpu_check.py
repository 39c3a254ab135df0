"""The GPU check in one call (benchmarks/gpu_check.sh wraps it): needs only torch and triton, no verl, no downloads.

Stages, each recorded in ``<out>/gpu_check.json`` and summarised in ``<out>/gpu_check.txt``:

1. tests: the GPU-marked tests that need no verl (tests/test_vocab_parallel_gpu.py, tests/test_triton_kernel_gpu.py)
   through pytest when it is installed, else through a minimal runner here (a bare CUDA image has no pytest): it
   knows the few pytest features those files use (marks, parametrize, skipif, skip, importorskip).
2. syncs: the Top-K op path (build_support, the vocab-parallel gather with the compiled and the Triton backends, the
   divergence and the row status) under ``torch.cuda.set_sync_debug_mode("warn")``; every CUDA synchronisation is
   caught and counted per stage, after a warm-up call (compilation syncs are not the op's). build_support's one
   deliberate read (its deferred validity checks) is expected; the gather itself should make none. The same stages
   also run under tests/sync_counter.py's dispatch-level counter (on CPU only that one, there is no stream).
3. bench: benchmarks/bench_vocab_parallel.py at N = 4096, 16384, 32768 (bf16; V = 151936, K + 1 = 21): compiled,
   Triton, the one-read floor, the paper authors'-style baseline, fused forward+backward vs the eager one.
   Memory is torch.cuda.max_memory_allocated; ``torch.cuda.empty_cache`` is never called and its cost (what a
   caching-allocator release would add between steps) is not measured.

``--dry-run``: the same stages on the CPU at tiny sizes, skipping what needs a GPU with a message (the GPU tests
skip themselves; the Triton and fused providers are skipped by the benchmark; the CUDA sync mode is not available),
so that the script itself is tested on CPU (tests/test_gpu_check_on_cpu.py). Nothing measured in a dry run means
anything.

    bash benchmarks/gpu_check.sh "$OUT"             # on the GPU machine, <= 8 min on one H100/H200
    bash benchmarks/gpu_check.sh /tmp/x --dry-run   # on a CPU
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.util
import itertools
import json
import os
import subprocess
import sys
import time
import traceback
import types
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests"), HERE]

import torch  # noqa: E402

GPU_TESTS = ("tests/test_vocab_parallel_gpu.py", "tests/test_triton_kernel_gpu.py")
BENCH_PROVIDERS = ("dppo", "triton", "read_floor", "authors", "fused_fwbw", "eager_fwbw")
DRY_PROVIDERS = ("dppo", "triton", "read_floor", "fused_fwbw")  # the plumbing, both kinds of skip; fewer processes
SIZES, DRY_SIZES = (4096, 16384, 32768), (64,)
V, K = 151936, 20


# --- 1. tests -------------------------------------------------------------------------------------------------

class _Skipped(Exception):
    pass


class _Mark:
    """``pytest.mark.<name>`` and ``pytest.mark.<name>(*args)``: a value for ``pytestmark`` or a decorator."""

    def __init__(self, name, args=(), kwargs=None):
        self.name, self.args, self.kwargs = name, args, kwargs or {}

    def __call__(self, *args, **kwargs):
        configured = bool(self.args or self.kwargs)  # mark.x(...)(fn): the second call decorates
        if configured or (len(args) == 1 and callable(args[0]) and not kwargs):  # or a bare @mark.x
            fn = args[0]
            fn.__dict__.setdefault("pytestmark", []).append(self)
            return fn
        return _Mark(self.name, args, kwargs)


def _minimal_pytest() -> types.ModuleType:
    mod = types.ModuleType("pytest")
    mod.mark = type("MarkFactory", (), {"__getattr__": lambda self, name: _Mark(name)})()

    def skip(reason=""):
        raise _Skipped(reason)

    def importorskip(name):
        try:
            return importlib.import_module(name)
        except ImportError as e:
            raise _Skipped(f"{name}: {e}") from None

    mod.skip, mod.importorskip = skip, importorskip
    return mod


def _cases(fn, module_marks):
    """(id, kwargs, skip reason) for each parametrization of one test function."""
    marks = list(module_marks) + list(getattr(fn, "pytestmark", []))
    skip = next((m.kwargs.get("reason", "skipif") for m in marks if m.name == "skipif" and m.args and m.args[0]), None)
    axes = []
    for m in marks:
        if m.name == "parametrize":
            names = [n.strip() for n in m.args[0].split(",")]
            axes.append([dict(zip(names, v if len(names) > 1 else (v,))) for v in m.args[1]])
    for combo in itertools.product(*axes):
        kwargs = {k: v for d in combo for k, v in d.items()}
        yield fn.__name__ + (f"[{'-'.join(str(v) for v in kwargs.values())}]" if kwargs else ""), kwargs, skip


def mini_runner(paths) -> dict:
    """Run the test files' ``test_*`` functions (no fixtures: the GPU tests take none) and count the outcomes."""
    if "pytest" not in sys.modules:
        sys.modules["pytest"] = _minimal_pytest()
    outcomes = {}
    for path in paths:
        name = os.path.splitext(os.path.basename(path))[0]
        module = importlib.import_module(name)
        module_marks = getattr(module, "pytestmark", [])
        module_marks = module_marks if isinstance(module_marks, list) else [module_marks]
        for attr in sorted(a for a in vars(module) if a.startswith("test_")):
            for case, kwargs, skip in _cases(getattr(module, attr), module_marks):
                key = f"{path}::{case}"
                if skip:
                    outcomes[key] = f"skipped: {skip}"
                    continue
                torch.manual_seed(0)  # what tests/conftest.py's autouse fixture does
                try:
                    getattr(module, attr)(**kwargs)
                    outcomes[key] = "passed"
                except _Skipped as e:
                    outcomes[key] = f"skipped: {e}"
                except Exception:  # noqa: BLE001  (recorded, the run goes on)
                    outcomes[key] = "failed: " + traceback.format_exc(limit=3)[-1500:]
    return outcomes


def run_tests(runner: str, out_dir: str, timeout_s: float) -> dict:
    try:
        return _run_tests(runner, out_dir, timeout_s)
    except subprocess.TimeoutExpired as e:  # reported, and the other stages still run
        return dict(runner=runner, ok=False, counts={}, output_tail=f"timed out after {e.timeout:.0f} s")


def _run_tests(runner: str, out_dir: str, timeout_s: float) -> dict:
    if runner == "auto":
        runner = "pytest" if importlib.util.find_spec("pytest") else "mini"
    t0 = time.time()
    if runner == "pytest":
        xml = os.path.join(out_dir, "gpu_tests.xml")
        cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-m", "gpu", *GPU_TESTS,
               f"--junitxml={xml}"]
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=timeout_s, env=_env())
        counts = _junit_counts(xml)
        ok = res.returncode in (0, 5) and counts.get("failed", 0) == 0  # 5: nothing collected
        return dict(runner="pytest", ok=ok, counts=counts, output_tail=res.stdout[-3000:], wall_s=time.time() - t0)
    cmd = [sys.executable, os.path.abspath(__file__), "--mini-runner"]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=timeout_s, env=_env())
    if res.returncode != 0:
        return dict(runner="mini", ok=False, counts={}, output_tail=res.stderr[-3000:], wall_s=time.time() - t0)
    outcomes = json.loads(res.stdout.strip().splitlines()[-1])
    counts = {k: sum(v.startswith(k) for v in outcomes.values()) for k in ("passed", "failed", "skipped")}
    return dict(runner="mini", ok=counts["failed"] == 0, counts=counts, outcomes=outcomes, wall_s=time.time() - t0)


def _junit_counts(xml: str) -> dict:
    import xml.etree.ElementTree as ET

    if not os.path.exists(xml):
        return {}
    suite = ET.parse(xml).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    tests, fails = int(suite.get("tests", 0)), int(suite.get("failures", 0)) + int(suite.get("errors", 0))
    skipped = int(suite.get("skipped", 0))
    return dict(passed=tests - fails - skipped, failed=fails, skipped=skipped)


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)}


# --- 2. syncs on the Top-K op path ------------------------------------------------------------------------------

def _topk_inputs(n: int, device: str, seed: int = 0) -> dict:
    """Logits [n, V] bf16 and a rollout with top-K rows drawn from a nearby distribution (every row valid)."""
    g = torch.Generator(device=device).manual_seed(seed)
    logits = (torch.randn(n, V, generator=g, device=device) * 3.0).to(torch.bfloat16)
    lq = torch.log_softmax(logits.float() + 0.5 * torch.randn(n, V, generator=g, device=device), -1)
    top_lq, top_ids = lq.topk(K, -1)
    sampled = torch.randint(0, V, (n,), generator=g, device=device)
    sampled[::2] = top_ids[::2, 0]  # half the sampled tokens inside the top-K
    return dict(logits=logits, sampled=sampled, mu=lq.gather(-1, sampled[:, None])[:, 0], topk_ids=top_ids.int(),
                topk_logp=top_lq, row_valid=torch.ones(n, dtype=torch.bool, device=device))


def _stages(x: dict, backends) -> dict:
    """The Top-K hook's op sequence (dppo_verl.integrations.actor.topk_hook), one callable per stage."""
    from dppo_verl.ops.consistency import topk_row_status
    from dppo_verl.ops.divergence import get_divergence
    from dppo_verl.ops.support import build_support
    from dppo_verl.ops.vocab_parallel import vocab_parallel_logprobs

    state = {}

    def support():
        state["sup"] = build_support(x["sampled"], x["mu"], x["topk_ids"], x["topk_logp"], vocab_size=V, num_topk=K,
                                     row_valid=x["row_valid"])

    def gather(backend):
        def run():
            state["logp"] = vocab_parallel_logprobs(x["logits"], state["sup"].ids, backend=backend)
        return run

    def divergence():
        sup = state["sup"]
        state["div"] = get_divergence("tv").fn(state["logp"], sup.mu_logp, sup.valid)
        state["status"] = topk_row_status(sup, x["mu"], x["row_valid"])

    return {"build_support": support, **{f"gather_{b}": gather(b) for b in backends}, "divergence+status": divergence}


def sync_check(device: str, n: int) -> dict:
    from sync_counter import SyncCounter

    backends = ["compile"] + (["triton"] if device == "cuda" and importlib.util.find_spec("triton") else [])
    stages = _stages(_topk_inputs(n, device), backends)
    for fn in stages.values():  # warm-up: compilation and autotuning may sync; they are not the op's
        fn()
    out = dict(N=n, V=V, K=K, backends=backends, dispatch_counter={}, cuda_sync_debug=None)
    for name, fn in stages.items():
        with SyncCounter() as c:
            fn()
        out["dispatch_counter"][name] = dict(total=c.total, where=dict(c.where))
    if device != "cuda":
        out["cuda_sync_debug_skipped"] = "no CUDA device: torch.cuda.set_sync_debug_mode needs a stream"
        return out
    out["cuda_sync_debug"] = {}
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        for name, fn in stages.items():
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                fn()
            hits = [w for w in caught if "synchroniz" in str(w.message)]
            out["cuda_sync_debug"][name] = dict(syncs=len(hits), where=sorted({f"{os.path.relpath(w.filename, ROOT)}:"
                                                                               f"{w.lineno}" for w in hits}))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return out


# --- 3. benchmark ---------------------------------------------------------------------------------------------

def run_bench(device: str, sizes, providers, out_dir: str, reps: int, deadline: float) -> dict:
    """bench_vocab_parallel.py one size at a time, so that a size that would not fit the time left is skipped."""
    results, summary, skipped, t_last = [], [], [], 0.0
    for n in sizes:
        if time.time() + 1.5 * t_last > deadline:
            skipped.append(f"N={n}: skipped, the time limit would be exceeded (the last size took {t_last:.0f} s)")
            continue
        t0 = time.time()
        path = os.path.join(out_dir, f"bench_N{n}.json")
        cmd = [sys.executable, os.path.join(HERE, "bench_vocab_parallel.py"), "--device", device, "--sizes", str(n),
               "--dtypes", "bfloat16", "--providers", *providers, "--reps", str(reps), "--out", path]
        if device == "cpu":
            cmd.append("--no-pinned")  # a dry run checks the plumbing; the pinned memory process would double it
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=_env(),
                                 timeout=max(10.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            skipped.append(f"N={n}: stopped at the time limit")
            break
        t_last = time.time() - t0
        if res.returncode != 0:
            skipped.append(f"N={n}: failed: {res.stderr[-1500:]}")
            continue
        doc = json.load(open(path))
        results += doc["results"]
        summary += doc["summary"]
        skipped += [line for line in res.stdout.splitlines() if line.startswith("skipping")]
    return dict(sizes=list(sizes), providers=list(providers), results=results, summary=summary, notes=skipped)


# --- report ---------------------------------------------------------------------------------------------------

def environment(device: str) -> dict:
    from bench_vocab_parallel import _commit, _machine

    info = dict(machine=_machine(device), commit=_commit(), torch=torch.__version__, cuda=torch.version.cuda,
                triton=None, verl_importable=importlib.util.find_spec("verl") is not None)
    if importlib.util.find_spec("triton"):
        import triton

        info["triton"] = triton.__version__
    return info


def summary_text(doc: dict) -> str:
    t = doc["tests"]
    lines = [f"gpu_check {'(DRY RUN on CPU: nothing here is a measurement) ' if doc['dry_run'] else ''}"
             f"device={doc['device']} torch={doc['environment']['torch']} triton={doc['environment']['triton']} "
             f"commit={doc['environment']['commit'][:12]} wall={doc['wall_s']:.0f}s {doc['stage_wall_s']}",
             f"tests ({t['runner']}): {t['counts']} ok={t['ok']}"]
    s = doc["syncs"]
    for name, c in s["dispatch_counter"].items():
        cuda = (s["cuda_sync_debug"] or {}).get(name)
        lines.append(f"syncs {name}: dispatch-counted {c['total']}"
                     + (f", CUDA sync-debug {cuda['syncs']} {cuda['where']}" if cuda else ""))
    if s.get("cuda_sync_debug_skipped"):
        lines.append("syncs: CUDA sync-debug skipped: " + s["cuda_sync_debug_skipped"])
    for r in doc["bench"]["results"]:
        lines.append(f"bench {r['dtype']} N={r['N']} {r['provider']}: {r['median_ms']:.2f} ms, extra {r['extra_mib']:.1f} MiB")
    lines += doc["bench"]["summary"] + doc["bench"]["notes"] + doc["notes"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", nargs="?", default=os.environ.get("OUT", os.path.join(ROOT, "gpu_check_out")))
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, GPU-only parts skipped with a message")
    ap.add_argument("--runner", choices=("auto", "pytest", "mini"), default="auto")
    ap.add_argument("--budget-s", type=float, default=450.0, help="stop starting benchmark sizes past this")
    ap.add_argument("--mini-runner", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.mini_runner:
        print(json.dumps(mini_runner(GPU_TESTS)))
        return 0
    t0 = time.time()
    device = "cpu" if a.dry_run else "cuda"
    notes = []
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device visible to torch; use --dry-run on a CPU")
    if a.dry_run:
        notes.append("dry run: GPU tests skip themselves, Triton/fused providers and the CUDA sync mode are skipped")
    os.makedirs(a.out, exist_ok=True)
    doc = dict(check="gpu_check", date=datetime.datetime.now(datetime.timezone.utc).isoformat(), device=device,
               dry_run=a.dry_run, environment=environment(device))
    stage_s = {}
    for stage, run in (("tests", lambda: run_tests(a.runner, a.out, timeout_s=max(60.0, a.budget_s / 3))),
                       ("syncs", lambda: sync_check(device, n=64 if a.dry_run else 4096)),
                       ("bench", lambda: run_bench(device, DRY_SIZES if a.dry_run else SIZES,
                                                   DRY_PROVIDERS if a.dry_run else BENCH_PROVIDERS, a.out,
                                                   reps=1 if a.dry_run else 5, deadline=t0 + a.budget_s))):
        t_stage = time.time()
        doc[stage] = run()
        stage_s[stage] = round(time.time() - t_stage, 1)
    doc["stage_wall_s"] = stage_s
    doc["notes"] = notes + ["torch.cuda.empty_cache is never called: its cost is not measured here"]
    doc["wall_s"] = time.time() - t0
    with open(os.path.join(a.out, "gpu_check.json"), "w") as f:
        json.dump(doc, f, indent=1)
    text = summary_text(doc)
    with open(os.path.join(a.out, "gpu_check.txt"), "w") as f:
        f.write(text)
    print(text, end="")
    return 0 if doc["tests"]["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
