"""verl's real ``FullyAsyncLLMServerClient.generate`` (the V1 async trainers' client, wrapped by
``dppo_verl.integrations.rollout.async_client``) against a scripted rollout server: a response generated in two
attempts (aborted by a weight update, resumed under the next policy version) keeps one top-K row per token, in
token order, each from the attempt (policy version) that sampled it. Expected arrays are written out by hand."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from omegaconf import OmegaConf


class _Remote:
    def __init__(self, fn):
        self.remote = fn


class _ScriptedServer:
    """Returns the scripted ``TokenOutput`` of each attempt in turn and records the prompts it was sent."""

    def __init__(self, outputs):
        self.outputs, self.prompts = list(outputs), []

        async def generate(*, request_id, prompt_ids, sampling_params, **kwargs):
            self.prompts.append(list(prompt_ids))
            return self.outputs.pop(0)

        self.generate = _Remote(generate)


def _client(server, cls_name="FullyAsyncLLMServerClient", response_length=8):
    from verl.workers.rollout import llm_server

    config = OmegaConf.create({"actor_rollout_ref": {"rollout": {
        "name": "vllm", "response_length": response_length, "full_determinism": False}}})
    client = getattr(llm_server, cls_name)(config=config, load_balancer_handle=None)

    async def acquire(request_id, **extra):
        return "server-0", server

    client._acquire_server = acquire
    client._release_server = lambda server_id, request_id=None: None
    return client


def _out(tokens, logps, stop, step, topk=None, **extra):
    from verl.workers.rollout.replica import TokenOutput

    fields = {"global_steps": step, **extra}
    if topk is not None:
        fields["rollout_topk_ids"] = np.asarray(topk[0], dtype=np.int32)
        fields["rollout_topk_logprobs"] = np.asarray(topk[1], dtype=np.float32)
    return TokenOutput(token_ids=tokens, log_probs=logps, stop_reason=stop, extra_fields=fields)


@pytest.fixture(autouse=True)
def _no_resume_pause(monkeypatch):
    """verl sleeps 1 s before each resume; the scripted server needs no pause."""
    from verl.workers.rollout import llm_server

    real = asyncio.sleep
    monkeypatch.setattr(llm_server.asyncio, "sleep", lambda s, *a, **k: real(0))


def _run(client, prompt=(1, 2, 3)):
    return asyncio.run(client.generate("req-1", prompt_ids=list(prompt), sampling_params={"temperature": 1.0}))


# Policy version 1 sampled tokens 11, 12 (then the weight update aborted the request); version 2 sampled 13, 14, 15.
V1 = ([[11, 40], [12, 41]], [[-0.25, -1.75], [-0.5, -1.5]])
V2 = ([[50, 13], [14, 51], [15, 52]], [[-0.125, -2.5], [-0.0625, -3.0], [-0.75, -1.0]])


def test_two_policy_versions_keep_one_row_per_token_in_order():
    from dppo_verl.integrations.patching import APPLIED

    assert APPLIED["rollout.client.attempt"].ok and APPLIED["rollout.client.resume_loop"].ok
    server = _ScriptedServer([
        _out([11, 12], [-0.25, -0.5], "aborted", 1, V1),
        _out([13, 14, 15], [-2.5, -0.0625, -0.75], "completed", 2, V2),
    ])
    out = _run(_client(server))
    assert server.prompts == [[1, 2, 3], [1, 2, 3, 11, 12]]  # the resume re-sends the tokens so far
    assert out.token_ids == [11, 12, 13, 14, 15]
    assert out.log_probs == [-0.25, -0.5, -2.5, -0.0625, -0.75]
    want_ids = np.array([[11, 40], [12, 41], [50, 13], [14, 51], [15, 52]], dtype=np.int32)
    want_lp = np.array([[-0.25, -1.75], [-0.5, -1.5], [-0.125, -2.5], [-0.0625, -3.0], [-0.75, -1.0]],
                       dtype=np.float32)
    ids, lp = out.extra_fields["rollout_topk_ids"], out.extra_fields["rollout_topk_logprobs"]
    assert ids.dtype == np.int32 and lp.dtype == np.float32
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_array_equal(lp, want_lp)
    assert (out.extra_fields["min_global_steps"], out.extra_fields["max_global_steps"]) == (1, 2)
    # mu per token: where the sampled token is in its row, the row's log-prob is the token's rollout log-prob
    for t, tok in enumerate(out.token_ids):
        hit = np.flatnonzero(ids[t] == tok)
        assert hit.size == 1 and lp[t, hit[0]] == np.float32(out.log_probs[t])


def test_attempt_aborted_before_its_first_token_adds_no_row():
    server = _ScriptedServer([
        _out([11, 12], [-0.25, -0.5], "aborted", 1, V1),
        _out([], [], "aborted", 2),  # aborted again before any token: verl's server wrappers send no top-K
        _out([13, 14, 15], [-2.5, -0.0625, -0.75], "completed", 3, V2),
    ])
    out = _run(_client(server))
    assert len(server.prompts) == 3 and server.prompts[2] == [1, 2, 3, 11, 12]
    np.testing.assert_array_equal(out.extra_fields["rollout_topk_ids"][:, 0], [11, 12, 50, 14, 15])
    assert out.extra_fields["rollout_topk_logprobs"].shape == (5, 2)
    assert out.extra_fields["max_global_steps"] == 3


def test_requests_without_topk_are_untouched():
    """No attempt carries a top-K (binary modes, other losses): the same TokenOutput as verl's own loop."""
    from verl.workers.rollout import llm_server

    def script():
        return [_out([11, 12], [-0.25, -0.5], "aborted", 1, num_cached_tokens=2),
                _out([13], [-2.5], "completed", 2)]

    ours = _run(_client(_ScriptedServer(script())))
    client = _client(_ScriptedServer(script()))
    verl_own = llm_server.FullyAsyncLLMServerClient.generate.dppo_wrapped
    theirs = asyncio.run(verl_own(client, "req-1", prompt_ids=[1, 2, 3], sampling_params={"temperature": 1.0}))
    assert ours.model_dump() == theirs.model_dump()
    assert set(ours.extra_fields) == {"global_steps", "min_global_steps", "max_global_steps", "num_cached_tokens"}


def test_sync_client_returns_the_servers_output_as_is():
    """The synchronous trainer's client (no resume loop): nothing collected, the server's top-K stays in place."""
    sent = _out([11, 12], [-0.25, -0.5], "completed", 1, V1)
    out = _run(_client(_ScriptedServer([sent]), cls_name="LLMServerClient"))
    assert out is sent
    np.testing.assert_array_equal(out.extra_fields["rollout_topk_ids"], V1[0])


def test_attempt_with_tokens_but_no_topk_is_refused():
    server = _ScriptedServer([
        _out([11, 12], [-0.25, -0.5], "aborted", 1, V1),
        _out([13], [-2.5], "completed", 2),  # a server without the top-K patch
    ])
    with pytest.raises(ValueError, match=r"request req-1: attempt 1 generated 1 tokens without a rollout top-K"):
        _run(_client(server))


def test_rows_not_matching_tokens_are_refused():
    server = _ScriptedServer([_out([11, 12, 13], [-0.25, -0.5, -1.0], "completed", 1, V1)])  # 2 rows, 3 tokens
    with pytest.raises(ValueError, match=r"attempt 0 returned top-K arrays of shapes \[2, 2\] / \[2, 2\] for 3"):
        _run(_client(server))


def test_concurrent_requests_keep_their_own_rows():
    """Requests interleave on one event loop (the agent-loop worker's): each collects only its own attempts."""

    async def both():
        a = _client(_ScriptedServer([_out([11, 12], [-0.25, -0.5], "aborted", 1, V1),
                                     _out([13, 14, 15], [-2.5, -0.0625, -0.75], "completed", 2, V2)]))
        b = _client(_ScriptedServer([_out([7], [-0.5], "completed", 1, ([[7, 8]], [[-0.5, -1.0]]))]))
        kw = dict(sampling_params={"temperature": 1.0})
        return await asyncio.gather(a.generate("a", prompt_ids=[1], **kw), b.generate("b", prompt_ids=[2], **kw))

    out_a, out_b = asyncio.run(both())
    assert out_a.extra_fields["rollout_topk_ids"].shape == (5, 2)
    np.testing.assert_array_equal(out_b.extra_fields["rollout_topk_ids"], [[7, 8]])
