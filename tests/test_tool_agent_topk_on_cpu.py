"""Rollout top-K across the turns of verl 0.9.1's real ``ToolAgentLoop`` (``rollout/tool_agent.py``).

The loop runs with its own Continuous-Token builder, hermes tool parser and ``FunctionTool`` dispatch; only the
LLM server is scripted (a fake ``server_manager`` returning ``TokenOutput`` with known per-turn top-K rows), and
the tokenizer is a small word-level one built here with a plain chat template, so every context segment's length
is countable by hand: a tool message is ``<|im_start|> tool <words> <|im_end|> <|im_start|> assistant``.
"""

import asyncio

import numpy as np
import pytest
import torch

from dppo_verl.contract import ROLLOUT_TOPK_IDS, ROLLOUT_TOPK_LOGPROBS, TOPK_TURNS

K = 3
ECHO = '{"name": "echo", "arguments": {}}'
FAIL = '{"name": "fail", "arguments": {}}'
TEMPLATE = ("{%- for m in messages -%}<|im_start|>{{ m['role'] }} {{ m['content'] if m['content'] is string else '' }}"
            "<|im_end|>{%- endfor -%}{%- if add_generation_prompt -%}<|im_start|>assistant{%- endif -%}")
WORDS = ["system", "user", "assistant", "tool", "hi", "ok", "done", "fail", "'", "':", "Error", "executing", "boom"]


def _tokenizer():
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>", "<|observation|>", "<|user|>"]
    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken(s, special=True) for s in specials])
    tok.add_tokens([AddedToken(s, normalized=False) for s in ("<tool_call>", "</tool_call>", ECHO, FAIL)])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<|im_end|>")
    hf.chat_template = TEMPLATE
    return hf


def _rows(first_id, tokens):
    """Scripted engine rows for the tokens: ids [n, K] (fillers >= 100, never a vocabulary id), log-probs [n, K]
    (descending), and each token's sampled log-prob: the token sits at rank g % K of its row, except every 4th
    token, sampled outside the top-K (log-prob -5)."""
    n = len(tokens)
    ids = np.array([[first_id + 10 * g + r for r in range(K)] for g in range(n)], dtype=np.int32)
    logp = np.array([[-0.1 * (r + 1) - 0.01 * (first_id + g) for r in range(K)] for g in range(n)], np.float32)
    sampled_logp = []
    for g, token in enumerate(tokens):
        inside = g % 4 != 3
        if inside:
            ids[g, g % K] = token
        sampled_logp.append(float(logp[g, g % K]) if inside else -5.0)
    return ids, logp, sampled_logp


class _Server:
    """Fake ``server_manager``: turn t returns ``turns[t]`` (token ids), with top-K rows when ``topk``."""

    def __init__(self, tok, turns, topk=(True, True, True)):
        self.turns = [[tok.convert_tokens_to_ids(t) for t in turn] for turn in turns]
        self.topk, self.calls, self.rows, self.seen_as = topk, [], [], []
        self.loop = None  # the agent loop, to see what it holds as server_manager during a call

    async def generate(self, request_id, *, prompt_ids, sampling_params, **kwargs):
        from verl.workers.rollout.replica import TokenOutput

        t = len(self.calls)
        self.calls.append(list(prompt_ids))
        self.seen_as.append(self.loop.server_manager is self)
        tokens = self.turns[t]
        ids, logp, sampled = _rows(100 * (t + 1), tokens)
        self.rows.append((ids, logp))
        extra = {"max_global_steps": 3}
        if self.topk[t]:
            extra.update({ROLLOUT_TOPK_IDS: ids, ROLLOUT_TOPK_LOGPROBS: logp})
        return TokenOutput(token_ids=tokens, log_probs=sampled, extra_fields=extra, stop_reason="stop")


def _tools():
    from verl.tools.function_tool import FunctionTool
    from verl.tools.schemas import OpenAIFunctionToolSchema

    def schema(name):
        return OpenAIFunctionToolSchema.model_validate({"type": "function", "function": {
            "name": name, "description": name, "parameters": {"type": "object", "properties": {}, "required": []}}})

    def fail():
        raise RuntimeError("boom")

    return [FunctionTool(name="echo", fn=lambda: "ok", tool_schema=schema("echo")),
            FunctionTool(name="fail", fn=fail, tool_schema=schema("fail"))]


def _run(server, tok, response_length, builder=None, num_topk=K):
    """verl's ToolAgentLoop.run on one prompt ("hi"), then AgentLoopOutput.as_dict (both as patched)."""
    from omegaconf import OmegaConf
    from verl.experimental.agent_loop.agent_loop import DictConfigWrap, ToolListWrap
    from verl.experimental.agent_loop.tool_agent_loop import ToolAgentLoop

    from dppo_verl.integrations.rollout.agent_loop import apply_agent_loop_output_patch
    from dppo_verl.integrations.rollout.tool_agent import apply_tool_agent_topk

    apply_agent_loop_output_patch()
    apply_tool_agent_topk()
    multi_turn = {"max_user_turns": 5, "max_assistant_turns": 5, "max_parallel_calls": 1,
                  "max_tool_response_length": 256, "tool_response_truncate_side": "middle", "format": "hermes"}
    cfg = OmegaConf.create({"actor_rollout_ref": {"rollout": {
        "multi_turn": multi_turn, "prompt_length": 64, "response_length": response_length, "full_determinism": False,
        "custom": {} if num_topk is None else {"dppo_num_topk": num_topk}}},
        "data": {}})

    async def go():
        loop = ToolAgentLoop(trainer_config=DictConfigWrap(cfg), server_manager=server, tokenizer=tok, processor=None,
                             dataset_cls=None, data_config=DictConfigWrap(cfg.data), tools=ToolListWrap(_tools()))
        if builder is not None:
            loop.continuous_token_builder = builder(tok)
        if isinstance(server, _Server):
            server.loop = loop
        out = await loop.run({"temperature": 1.0}, raw_prompt=[{"role": "user", "content": "hi"}])
        assert loop.server_manager is server  # the recorder stands in during a turn only
        return out

    out = asyncio.run(go())
    return out, out.as_dict()


def _expected(mask, turn_rows):
    """Hand-placed rows: the turns' rows, concatenated, on the mask-1 positions; id 0 / -inf elsewhere."""
    ids = np.concatenate([r[0] for r in turn_rows])
    logp = np.concatenate([r[1] for r in turn_rows])
    exp_ids, exp_lp = np.zeros((len(mask), K), np.int32), np.full((len(mask), K), -np.inf, np.float32)
    j = 0
    for t, m in enumerate(mask):
        if m:
            exp_ids[t], exp_lp[t], j = ids[j], logp[j], j + 1
    return exp_ids, exp_lp


def _assert_rows(d, mask, turn_rows):
    assert d["response_mask"].tolist() == mask
    exp_ids, exp_lp = _expected(mask, turn_rows)
    np.testing.assert_array_equal(d[ROLLOUT_TOPK_IDS].numpy(), exp_ids)
    np.testing.assert_array_equal(d[ROLLOUT_TOPK_LOGPROBS].numpy(), exp_lp)
    assert d[ROLLOUT_TOPK_IDS].dtype == torch.int32 and ROLLOUT_TOPK_IDS not in d["extra_fields"]
    assert TOPK_TURNS not in d["extra_fields"]
    # each generated token's row holds its sampled log-prob (rollout_log_probs) where the token is in the top-K
    checked = 0
    for t in np.flatnonzero(mask):
        hit = np.flatnonzero(exp_ids[t] == int(d["responses"][t]))
        if hit.size:
            checked += 1
            assert d[ROLLOUT_TOPK_LOGPROBS][t, hit[0]].item() == d["rollout_log_probs"][t].item()
    return checked


TURNS = [["ok", "<tool_call>", ECHO, "</tool_call>", "<|im_end|>"],  # 5 tokens, calls echo -> "ok"
         ["<tool_call>", FAIL, "</tool_call>", "<|im_end|>"],  # 4 tokens, calls fail -> raises: an error message
         ["done", "<|im_end|>"]]  # 2 tokens, no tool call: the end
ECHO_CTX = [0] * 6  # <|im_start|> tool ok <|im_end|> <|im_start|> assistant
ERROR_CTX = [0] * 12  # ... tool Error executing tool ' fail ': boom ... ("Error executing tool 'fail': boom")



def test_three_turns_with_a_tool_error_keep_every_turns_rows():
    """echo -> "ok", fail -> an error message (verl's _call_tool catches it), then a final answer: all three turns'
    rows, in order, on the mask-1 positions; tool tokens get id 0 / -inf rows."""
    tok = _tokenizer()
    server = _Server(tok, TURNS)
    out, d = _run(server, tok, response_length=64)
    assert len(server.calls) == 3 and out.num_turns == 1 + 3 + 2  # the prompt, 3 assistant turns, 2 tool turns
    from dppo_verl.integrations.patching import APPLIED

    assert APPLIED["rollout.tool_agent.generating"].ok and APPLIED["rollout.tool_agent.processing_tools"].ok
    mask = [1] * 5 + ECHO_CTX + [1] * 4 + ERROR_CTX + [1] * 2
    assert _assert_rows(d, mask, server.rows) == 9  # 11 generated tokens, 2 sampled outside the top-K
    error_turn = "<|im_start|> tool Error executing tool ' fail ': boom <|im_end|> <|im_start|> assistant"
    assert tok.decode(d["responses"][15:27].tolist()).split() == error_turn.split()


@pytest.mark.parametrize("response_length,second_turn_kept", [
    (13, 2),  # the second turn (4 tokens) passes the limit: verl cuts the response after 2 of them, rows too
    (15, 4),  # the second turn fills it exactly (a length stop): no cut, no tool call run
    (20, 4),  # the error message would pass it: verl ends the trajectory without merging it, no rows for it
])
def test_length_limit_cuts_rows_like_the_response(response_length, second_turn_kept):
    """The response length limit mid-turn, exactly at a turn's end, and at a tool output: rows follow the mask."""
    tok = _tokenizer()
    server = _Server(tok, TURNS)
    _, d = _run(server, tok, response_length=response_length)
    assert len(server.calls) == 2
    _assert_rows(d, [1] * 5 + ECHO_CTX + [1] * second_turn_kept, server.rows)


def test_builder_that_trims_a_generated_token_trims_its_row():
    """verl's GLM builder drops a trailing <|observation|> (generated, mask 1) before the tool output: its mask,
    its rollout log-prob and (here) its top-K row go; the next turn's rows follow the kept ones."""
    from verl.utils.tokenizer.continuous_token import GLMContinuousTokenBuilder

    tok = _tokenizer()
    turns = [TURNS[0][:-1] + ["<|observation|>"], ["done", "<|im_end|>"]]
    server = _Server(tok, turns)
    _, d = _run(server, tok, response_length=64, builder=GLMContinuousTokenBuilder)
    kept = [(server.rows[0][0][:4], server.rows[0][1][:4]), server.rows[1]]
    _assert_rows(d, [1] * 4 + ECHO_CTX + [1] * 2, kept)


@pytest.mark.parametrize("num_topk", [None, K])
def test_without_topk_the_trajectory_is_verls_own(num_topk):
    """Do no harm: no top-K asked (binary modes, other losses) -> verl's handlers untouched (the server manager is
    never stood in for); asked but no turn carries one -> extra_fields as verl builds them (no rows, no marker)."""
    tok = _tokenizer()
    server = _Server(tok, TURNS, topk=(False, False, False))
    out, d = _run(server, tok, response_length=64, num_topk=num_topk)
    assert server.seen_as == [num_topk is None] * 3
    assert set(out.extra_fields) == {"max_global_steps", "turn_scores", "tool_rewards"}
    assert ROLLOUT_TOPK_IDS not in d and len(d["response_mask"]) == 29


def test_a_turn_without_topk_among_turns_with_it_is_an_error():
    tok = _tokenizer()
    with pytest.raises(ValueError, match=r"1 of 2 assistant turns generated tokens without a rollout top-K"):
        _run(_Server(tok, TURNS, topk=(True, False, True)), tok, response_length=64)


class _Remote:
    """A Ray actor handle's method, as verl's client calls it: ``server.generate.remote(...)``."""

    def __init__(self, fn):
        self.remote = fn


def test_turn_resumed_by_the_async_client_keeps_both_attempts_rows(monkeypatch):
    """The V1 async trainers' client (verl's FullyAsyncLLMServerClient, wrapped by rollout/async_client.py) as the
    tool agent's server manager: the second turn is aborted by a weight update after 2 tokens and resumed; its rows
    are both attempts' rows, in order, between the first and third turns' rows."""
    from omegaconf import OmegaConf
    from verl.workers.rollout import llm_server
    from verl.workers.rollout.replica import TokenOutput

    from dppo_verl.integrations.rollout.async_client import apply_async_client_topk

    apply_async_client_topk()
    real_sleep = asyncio.sleep
    monkeypatch.setattr(llm_server.asyncio, "sleep", lambda s, *a, **k: real_sleep(0))  # verl waits 1 s per resume
    tok = _tokenizer()
    ids_of = tok.convert_tokens_to_ids
    attempts = [(TURNS[0], "completed"), (TURNS[1][:2], "aborted"), (TURNS[1][2:], "completed"),
                (TURNS[2], "completed")]
    scripted, rows = [], []
    for a, (tokens, stop) in enumerate(attempts):
        ids, logp, sampled = _rows(100 * (a + 1), [ids_of(t) for t in tokens])
        rows.append((ids, logp))
        scripted.append(TokenOutput(token_ids=[ids_of(t) for t in tokens], log_probs=sampled, stop_reason=stop,
                                    extra_fields={"global_steps": 1 + (a >= 2), ROLLOUT_TOPK_IDS: ids,
                                                  ROLLOUT_TOPK_LOGPROBS: logp}))

    async def generate(*, request_id, prompt_ids, sampling_params, **kwargs):
        return scripted.pop(0)

    config = OmegaConf.create({"actor_rollout_ref": {"rollout": {"name": "vllm", "response_length": 64,
                                                                 "full_determinism": False}}})
    client = llm_server.FullyAsyncLLMServerClient(config=config, load_balancer_handle=None)

    server = type("Server", (), {"generate": _Remote(generate)})()

    async def acquire(request_id, **extra):
        return "server-0", server

    client._acquire_server = acquire
    client._release_server = lambda server_id, request_id=None: None
    out, d = _run(client, tok, response_length=64)
    assert not scripted  # four attempts, three turns
    assert _assert_rows(d, [1] * 5 + ECHO_CTX + [1] * 4 + ERROR_CTX + [1] * 2, rows) == 10  # 1 sampled outside

