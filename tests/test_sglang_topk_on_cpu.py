"""SGLang rollout top-K: the payload conversion, and the runtime patch around verl's ``SGLangHttpServer.generate``.

SGLang is not installed here: the patch is exercised on (a) ``MirrorServer``, a hand-written copy of the lines of
verl's ``generate`` the hook depends on, and (b) verl 0.9.1's own ``generate`` source run against stand-ins
(``sglang_stubs``). Expected arrays are written out by hand from the scripted engine answers below.
"""

import asyncio
import sys
import types

import numpy as np
import pytest
import sglang_stubs as st

from dppo_verl.integrations import patching
from dppo_verl.integrations.rollout import sglang_server as sg

K = 3
# rid "a": position 1 samples token 7, ranked 4th: it must NOT appear in the top-3 row (ranks stay untouched).
SCRIPT_A = st.Script(
    steps=[
        st.Step(5, -0.2, [(5, -0.2), (9, -1.9), (2, -2.5), (7, -3.0)]),
        st.Step(7, -3.1, [(1, -0.1), (3, -2.6), (8, -3.0), (7, -3.1)]),
        st.Step(2, -0.05, [(2, -0.05), (4, -3.2), (6, -4.0), (1, -5.0)]),
    ],
    delay=0.05,
)
IDS_A = np.array([[5, 9, 2], [1, 3, 8], [2, 4, 6]], dtype=np.int32)
LOGP_A = np.array([[-0.2, -1.9, -2.5], [-0.1, -2.6, -3.0], [-0.05, -3.2, -4.0]], dtype=np.float32)
# rid "b": position 0 has only two candidates (rank 3 missing -> id 0 / -inf); answers before "a".
SCRIPT_B = st.Script(
    steps=[
        st.Step(11, -0.8, [(12, -0.6), (11, -0.8)]),
        st.Step(13, -0.01, [(13, -0.01), (12, -5.0), (11, -6.0), (10, -7.0)]),
    ],
)
IDS_B = np.array([[12, 11, 0], [13, 12, 11]], dtype=np.int32)
LOGP_B = np.array([[-0.6, -0.8, -np.inf], [-0.01, -5.0, -6.0]], dtype=np.float32)


# --- pure conversion -----------------------------------------------------------------------------------------


def test_topk_arrays_from_sglang_by_hand():
    rows = [
        [(-0.5, 4, "a"), [-1.5, np.int64(8), None], (np.float32(-2.25), 1, "b")],  # tuples, JSON lists, numpy
        [(-0.1, 3, None), (-2.0, 0, None), (-3.0, 6, None), (-4.0, 2, None)],  # more than K: rank 4 dropped
        [(-0.3, 9, None)],  # fewer than K: padded
    ]
    ids, logp = sg.topk_arrays_from_sglang(rows, 3)
    assert ids.dtype == np.int32 and logp.dtype == np.float32
    np.testing.assert_array_equal(ids, [[4, 8, 1], [3, 0, 6], [9, 0, 0]])
    expected = np.array([[-0.5, -1.5, -2.25], [-0.1, -2.0, -3.0], [-0.3, -np.inf, -np.inf]], np.float32)
    np.testing.assert_array_equal(logp, expected)


def test_topk_arrays_from_sglang_empty_and_k1():
    ids, logp = sg.topk_arrays_from_sglang([], 4)
    assert ids.shape == logp.shape == (0, 4)
    ids, logp = sg.topk_arrays_from_sglang([[(-0.5, 4, None), (-1.0, 2, None)]], 1)
    np.testing.assert_array_equal(ids, [[4]])
    np.testing.assert_array_equal(logp, [[-0.5]])


@pytest.mark.parametrize(
    "rows, match",
    [
        ([[(-0.1, 1, None)], None], "generated token 1"),
        ([[(-0.1, 1, None)], []], "generated token 1"),
        ([{1: -0.1}], "generated token 0 are a dict"),
        ([[(-0.1, 1, None), (-0.2,)]], "generated token 0, rank 2"),
        ([[(-0.1, 1, None)], [(-0.1, 1.0, None)]], r"generated token 1, rank 1 has token id 1\.0"),
        ([[(-0.1, True, None)]], "token id True"),
        ([[(-0.1, -3, None)]], "token id -3"),
        ([[(-0.1, 2**31, None)]], "token id"),
        ([[(-0.1, 1, None), (None, 2, None)]], "rank 2 has log-prob None"),
        ([[(float("nan"), 1, None)]], "log-prob nan"),
        ([[(1, -0.1, None)]], "token id -0.1"),  # (token_id, logprob) order would be a format change
        (None, "NoneType"),
    ],
)
def test_topk_arrays_from_sglang_rejects(rows, match):
    with pytest.raises(ValueError, match=match):
        sg.topk_arrays_from_sglang(rows, 2)


def test_generation_topk():
    cfg = types.SimpleNamespace(custom={"dppo_num_topk": 4})
    assert sg.generation_topk(cfg, True) == 4
    assert sg.generation_topk(types.SimpleNamespace(custom=None), False) is None  # top-K off: nothing to check
    assert sg.generation_topk(cfg, False, prompt_logprobs=2) is None  # prompt scoring: left to verl
    with pytest.raises(ValueError, match=r"actor_rollout_ref\.rollout\.calculate_log_probs=True"):
        sg.generation_topk(cfg, False)


def test_topk_fields_from_meta_info():
    empty = sg.topk_fields_from_meta_info({}, 0, 2)  # verl dropped the tokens (abort / length mismatch)
    assert empty["rollout_topk_ids"].shape == empty["rollout_topk_logprobs"].shape == (0, 2)
    with pytest.raises(ValueError, match="top_logprobs_num=2"):
        sg.topk_fields_from_meta_info({"output_top_logprobs": None}, 1, 2)
    with pytest.raises(ValueError, match="for 1 tokens but generated 2"):
        sg.topk_fields_from_meta_info({"output_top_logprobs": [[(-0.1, 1, None)]]}, 2, 2)


# --- runtime patch on a hand-written mirror of verl's generate -----------------------------------------------------


class MirrorServer:
    """verl 0.9.1 ``async_sglang_server.py::SGLangHttpServer.generate``, only the lines the hook depends on:
    615 (``return_logprob = sampling_params.pop("logprobs", False)``), 620-622 (``prompt_logprobs`` pop), 624-639
    (the ``request`` dict), 650 (``GenerateReqInput(**request)``), 657
    (``await self.tokenizer_manager.generate_request(generate_request, None).__anext__()``), 658-679 (token ids and
    sampled log-probs from ``meta_info``, emptied on a length mismatch), 701 / 718 (``extra_fields``, ``TokenOutput``).
    """

    async def generate(self, prompt_ids, sampling_params, request_id, image_data=None, video_data=None,
                       bootstrap_host=None, bootstrap_port=None, bootstrap_room=None):  # verl 0.9.1's signature
        return_logprob = sampling_params.pop("logprobs", False)
        prompt_logprobs = sampling_params.pop("prompt_logprobs", None)
        if prompt_logprobs is not None:
            return_logprob = True
        request = {"rid": request_id, "input_ids": prompt_ids, "sampling_params": sampling_params}
        request["return_logprob"] = return_logprob
        if prompt_logprobs is not None:
            request["logprob_start_len"] = 0
            if prompt_logprobs > 0:
                request["top_logprobs_num"] = prompt_logprobs
        generate_request = st.GenerateReqInput(**request)
        output = await self.tokenizer_manager.generate_request(generate_request, None).__anext__()
        meta_info = output.get("meta_info", {})
        if return_logprob:
            token_ids = list(output.get("output_ids", []))
            output_token_logprobs = meta_info.get("output_token_logprobs") or []
            if output_token_logprobs and len(output_token_logprobs) == len(token_ids):
                log_probs = [float(lp) for lp, _, _ in output_token_logprobs]
            else:
                token_ids, log_probs = [], []
        else:
            token_ids, log_probs = output["output_ids"], None
        extra_fields = {"global_steps": self.global_steps}
        return st.TokenOutput(token_ids=token_ids, log_probs=log_probs, extra_fields=extra_fields)


def _patched(generate_fn):
    """A fresh server class with ``generate_fn``, patched the way ``apply_sglang_server_topk`` does it."""
    cls = st.server_class(generate_fn)
    module = types.SimpleNamespace(SGLangHttpServer=cls, __name__=sg.MODULE)
    sg.patch_module(module)
    sg.patch_module(module)  # idempotent
    assert cls.generate.dppo_wrapped is generate_fn
    return cls


def _run(*coros):
    async def main():
        return await asyncio.gather(*coros)

    return asyncio.run(main())


def _check(out, ids, logp, script):
    np.testing.assert_array_equal(out.extra_fields["rollout_topk_ids"], ids)
    np.testing.assert_array_equal(out.extra_fields["rollout_topk_logprobs"], logp)
    assert out.extra_fields["rollout_topk_ids"].dtype == np.int32
    assert out.extra_fields["rollout_topk_logprobs"].dtype == np.float32
    assert out.token_ids == [s.sampled for s in script.steps]
    assert out.log_probs == [s.sampled_lp for s in script.steps]  # the sampled tokens' own log-probs, unchanged


def test_mirror_concurrent_requests_get_their_own_topk():
    cls = _patched(MirrorServer.generate)
    tm = st.ScriptedTokenizerManager({"a": SCRIPT_A, "b": SCRIPT_B, "plain": SCRIPT_B})
    server = st.make_server(cls, tm, k=K)
    plain = st.make_server(cls, tm, k=None)  # same tokenizer manager, top-K off: the hook must stay inert for it
    finished = []

    async def request(srv, rid):
        out = await srv.generate([1, 2], {"logprobs": True, "temperature": 1.0}, rid)
        finished.append(rid)
        return out

    out_a, out_b, out_plain = _run(request(server, "a"), request(server, "b"), request(plain, "plain"))
    assert finished[-1] == "a"  # "a" was sent first and answered last: the requests really interleaved
    _check(out_a, IDS_A, LOGP_A, SCRIPT_A)
    _check(out_b, IDS_B, LOGP_B, SCRIPT_B)
    sent = {obj.rid: obj for obj in tm.received}
    assert sent["a"].top_logprobs_num == K and sent["b"].top_logprobs_num == K
    assert sent["a"].return_logprob is True
    assert sent["plain"].top_logprobs_num is None
    assert "rollout_topk_ids" not in out_plain.extra_fields
    assert out_a.extra_fields["global_steps"] == 7


def test_mirror_refuses_topk_without_logprobs():
    cls = _patched(MirrorServer.generate)
    tm = st.ScriptedTokenizerManager({"a": SCRIPT_A})
    server = st.make_server(cls, tm, k=K)
    with pytest.raises(ValueError, match=r"actor_rollout_ref\.rollout\.calculate_log_probs=True"):
        _run(server.generate([1, 2], {"temperature": 1.0}, "a"))
    assert tm.received == []  # refused before anything reached the engine


def test_mirror_inert_without_topk():
    cls = _patched(MirrorServer.generate)
    tm = st.ScriptedTokenizerManager({"a": SCRIPT_A})
    original = tm.generate_request
    (out,) = _run(st.make_server(cls, tm).generate([1, 2], {"logprobs": True}, "a"))
    assert "rollout_topk_ids" not in out.extra_fields and tm.received[0].top_logprobs_num is None
    assert tm.generate_request == original  # nothing wrapped when top-K is off


class SourcePatchedServer:
    async def generate(self, prompt_ids, sampling_params, request_id, image_data=None, video_data=None,
                       bootstrap_host=None, bootstrap_port=None, bootstrap_room=None):
        # DPPO_TOPK_PATCHED: stands for verl's generate after patches/verl-0.9.1-sglang-rollout-topk.diff
        return None


def test_patch_steps_aside_for_diff_patched_source():
    module = types.SimpleNamespace(SGLangHttpServer=SourcePatchedServer, __name__=sg.MODULE)
    sg.patch_module(module)
    assert not hasattr(SourcePatchedServer.generate, "dppo_wrapped")


def test_apply_is_named_idempotent_and_waits_for_the_module(monkeypatch):
    monkeypatch.delitem(patching.APPLIED, "rollout.sglang.generate", raising=False)
    monkeypatch.setattr(patching, "_PENDING", {})
    monkeypatch.delitem(sys.modules, sg.MODULE, raising=False)
    sg.apply_sglang_server_topk()
    assert "rollout.sglang.generate" not in patching.APPLIED and patching._PENDING[sg.MODULE] == [sg.patch_module]

    # Module already imported: patched at once, recorded under its name, and only once.
    cls = st.server_class(MirrorServer.generate)
    monkeypatch.setitem(sys.modules, sg.MODULE, types.SimpleNamespace(SGLangHttpServer=cls, __name__=sg.MODULE))
    sg.apply_sglang_server_topk()
    sg.apply_sglang_server_topk()
    assert cls.generate.dppo_wrapped is MirrorServer.generate and patching.APPLIED["rollout.sglang.generate"].ok


# --- runtime patch on verl 0.9.1's own generate source ---------------------------------------------------------------


def test_verl_generate_source_concurrent_topk_and_prompt_scoring():
    cls = _patched(st.load_generate(st.site_packages() / st.SERVER_REL))
    tm = st.ScriptedTokenizerManager({"a": SCRIPT_A, "b": SCRIPT_B, "score": SCRIPT_B})
    server = st.make_server(cls, tm, k=K)
    out_a, out_b, out_score = _run(
        server.generate([1, 2], {"logprobs": True, "temperature": 1.0}, "a"),
        server.generate([1, 2], {"logprobs": True, "temperature": 1.0}, "b"),
        server.generate([1, 2], {"prompt_logprobs": 2, "max_tokens": 1}, "score"),  # teacher-style scoring
    )
    _check(out_a, IDS_A, LOGP_A, SCRIPT_A)
    _check(out_b, IDS_B, LOGP_B, SCRIPT_B)
    sent = {obj.rid: obj for obj in tm.received}
    assert sent["a"].top_logprobs_num == K and sent["a"].return_logprob is True
    # verl's own prompt-logprob translation is left as it was: top_logprobs_num is its K, no rollout top-K added.
    assert sent["score"].top_logprobs_num == 2 and sent["score"].logprob_start_len == 0
    assert "rollout_topk_ids" not in out_score.extra_fields
    assert out_score.extra_fields["prompt_ids"][0] == [100, 101]  # verl's prompt-logprob extraction ran
    with pytest.raises(ValueError, match=r"calculate_log_probs=True"):
        _run(server.generate([1, 2], {"temperature": 1.0}, "a"))
