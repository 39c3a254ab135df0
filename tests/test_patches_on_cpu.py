"""patches/*.diff against the installed verl 0.9.1: they apply (``patch -p1`` from site-packages), are detected as
applied afterwards, compile, and the SGLang one runs (verl's patched ``generate`` against the ``sglang_stubs``
stand-ins; the vLLM one runs on real vLLM classes in ``test_patch_vllm_generate_on_cpu.py``).
"""

import asyncio
import py_compile
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import sglang_stubs as st

from dppo_verl.integrations.rollout import sglang_server as sg

PATCHES = Path(__file__).resolve().parents[1] / "patches"
TARGETS = {
    "verl-0.9.1-vllm-rollout-topk.diff": Path("verl/workers/rollout/vllm_rollout/vllm_async_server.py"),
    "verl-0.9.1-sglang-rollout-topk.diff": st.SERVER_REL,
}
MARKER = "DPPO_TOPK_PATCHED"


def _patch(root: Path, diff: str, *flags: str) -> subprocess.CompletedProcess:
    with open(PATCHES / diff) as f:
        return subprocess.run(["patch", "-p1", "-d", str(root), *flags], stdin=f, capture_output=True, text=True)


def patched_copy(tmp_path: Path, diff: str) -> Path:
    """Copy the installed file into ``tmp_path`` (same relative path), apply ``diff`` there; returns the file."""
    rel = TARGETS[diff]
    (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(st.site_packages() / rel, tmp_path / rel)
    res = _patch(tmp_path, diff, "--dry-run")
    assert res.returncode == 0, res.stdout + res.stderr
    res = _patch(tmp_path, diff)
    assert res.returncode == 0, res.stdout + res.stderr
    return tmp_path / rel


@pytest.fixture(scope="module", autouse=True)
def _has_patch():
    if shutil.which("patch") is None:
        pytest.skip("the `patch` tool is not installed")


def test_diffs_target_the_listed_files():
    assert sorted(p.name for p in PATCHES.glob("*.diff")) == sorted(TARGETS)
    for diff, rel in TARGETS.items():
        head = (PATCHES / diff).read_text().splitlines()[:2]
        assert head == [f"--- a/{rel}", f"+++ b/{rel}"]


@pytest.mark.parametrize("diff", sorted(TARGETS))
def test_diff_applies_once_compiles_and_carries_the_marker(tmp_path, diff):
    path = patched_copy(tmp_path, diff)
    assert _patch(tmp_path, diff, "-R", "--dry-run").returncode == 0  # an applied diff reverses cleanly ...
    again = _patch(tmp_path, diff, "-N", "--dry-run")  # ... and a second application is refused
    assert again.returncode != 0 and "previously applied" in again.stdout
    py_compile.compile(str(path), cfile=str(tmp_path / "out.pyc"), doraise=True)
    source = path.read_text()
    assert MARKER not in (st.site_packages() / TARGETS[diff]).read_text()
    assert MARKER in source
    # The marker sits inside generate, where the runtime patches look for it (inspect.getsource).
    generate = source.split("    async def generate(", 1)[1].split("\n    async def ", 1)[0]
    assert MARKER in generate


K = 2
SCRIPT = st.Script(
    steps=[
        st.Step(4, -0.3, [(4, -0.3), (8, -1.6), (1, -2.9)]),
        st.Step(9, -2.7, [(3, -0.2), (5, -2.0), (9, -2.7)]),  # sampled token ranked 3rd: not in the top-2 row
    ]
)
IDS = np.array([[4, 8], [3, 5]], dtype=np.int32)
LOGP = np.array([[-0.3, -1.6], [-0.2, -2.0]], dtype=np.float32)


def test_sglang_diff_generate_runs(tmp_path):
    path = patched_copy(tmp_path, "verl-0.9.1-sglang-rollout-topk.diff")
    cls = st.server_class(st.load_generate(path))
    tm = st.ScriptedTokenizerManager({"r": SCRIPT, "score": SCRIPT})

    async def main(server, *requests):
        return await asyncio.gather(*(server.generate([1, 2], dict(sp), rid) for rid, sp in requests))

    server = st.make_server(cls, tm, k=K)
    out, score = asyncio.run(main(server, ("r", {"logprobs": True}), ("score", {"prompt_logprobs": 3})))
    np.testing.assert_array_equal(out.extra_fields["rollout_topk_ids"], IDS)
    np.testing.assert_array_equal(out.extra_fields["rollout_topk_logprobs"], LOGP)
    assert out.log_probs == [-0.3, -2.7] and out.token_ids == [4, 9]
    sent = {obj.rid: obj for obj in tm.received}
    assert sent["r"].top_logprobs_num == K and sent["score"].top_logprobs_num == 3
    assert "rollout_topk_ids" not in score.extra_fields

    (plain,) = asyncio.run(main(st.make_server(cls, tm, k=None), ("r", {"logprobs": True})))
    assert "rollout_topk_ids" not in plain.extra_fields and tm.received[-1].top_logprobs_num is None
    with pytest.raises(ValueError, match=r"actor_rollout_ref\.rollout\.calculate_log_probs=True"):
        asyncio.run(main(st.make_server(cls, tm, k=K), ("r", {})))


def test_runtime_patch_stands_aside_for_the_sglang_diff(tmp_path):
    path = patched_copy(tmp_path, "verl-0.9.1-sglang-rollout-topk.diff")
    cls = st.server_class(st.load_generate(path))
    sg.patch_module(type("M", (), {"SGLangHttpServer": cls, "__name__": sg.MODULE}))
    assert not hasattr(cls.generate, "dppo_wrapped")
