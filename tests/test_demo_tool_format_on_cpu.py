"""``make demo AGENT=tool`` without a trainer: the demo's tool, call format and warm-start trajectories against verl
0.9.1's real ``ToolAgentLoop`` (Qwen Continuous-Token builder, as for the demo's qwen2 model; the tool and the
parser loaded the way verl loads them, from ``rollout.multi_turn.function_tool_path``). Only the LLM server is
scripted: it replays the assistant turns of a warm-start trajectory, so the test shows that the warm start teaches
token for token what the rollout will build, and that the reward scores the final turn."""

import asyncio

import pytest

from dppo_verl.demo import assets, reward, tool_demo
from dppo_verl.demo.warmstart import _prompt_ids, tool_trajectory


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from transformers import AutoTokenizer

    path = str(tmp_path_factory.mktemp("tok"))
    assets.build_tokenizer(path, agent="tool")
    return AutoTokenizer.from_pretrained(path)  # as verl loads it: transformers' Qwen2Tokenizer


class _Replay:
    """Fake ``server_manager``: the assistant turns of a trajectory, one per call."""

    def __init__(self, turns):
        self.turns, self.prompts = list(turns), []

    async def generate(self, request_id, *, prompt_ids, sampling_params, **kwargs):
        from verl.workers.rollout.replica import TokenOutput

        self.prompts.append(list(prompt_ids))
        tokens = self.turns.pop(0)
        return TokenOutput(token_ids=tokens, log_probs=[-0.5] * len(tokens), extra_fields={}, stop_reason="stop")


def _run_loop(tok, server, prompt, response_length=tool_demo.RESPONSE_LENGTH):
    from omegaconf import OmegaConf
    from verl.experimental.agent_loop.agent_loop import DictConfigWrap, ToolListWrap
    from verl.experimental.agent_loop.tool_agent_loop import ToolAgentLoop
    from verl.tools.function_tool import load_function_tools_from_path

    from dppo_verl.demo.tool_format import PARSER_NAME

    tools = load_function_tools_from_path(tool_demo.TOOL_FILE)  # also registers the parser, as in a worker
    multi_turn = {"max_user_turns": 1, "max_assistant_turns": 2, "max_parallel_calls": 1,
                  "max_tool_response_length": 16, "tool_response_truncate_side": "middle", "format": PARSER_NAME}
    cfg = OmegaConf.create({"actor_rollout_ref": {"rollout": {
        "multi_turn": multi_turn, "prompt_length": 32, "response_length": response_length, "full_determinism": False,
        "custom": {}}}, "data": {}})

    async def go():
        loop = ToolAgentLoop(trainer_config=DictConfigWrap(cfg), server_manager=server, tokenizer=tok, processor=None,
                             dataset_cls=None, data_config=DictConfigWrap(cfg.data), tools=ToolListWrap(tools),
                             hf_model_type="qwen2")
        return await loop.run({"temperature": 1.0}, raw_prompt=prompt)

    return asyncio.run(go())


def _split_turns(ids, mask):
    """The mask-1 runs of a response: the assistant turns."""
    turns, cur = [], []
    for t, m in zip(ids, mask):
        if m:
            cur.append(t)
        elif cur:
            turns, cur = turns + [cur], []
    return turns + ([cur] if cur else [])


def test_warm_start_trajectory_is_what_the_tool_agent_builds(tok):
    prompt = [{"role": "user", "content": assets.task_prompt("604876")}]
    ids, mask = tool_trajectory(tok, prompt, "678406")
    server = _Replay(_split_turns(ids, mask))
    out = _run_loop(tok, server, prompt)
    assert out.num_turns == 4  # user, assistant (call), tool, assistant (answer): verl's num_turns/* >= 3
    assert out.prompt_ids == _prompt_ids(tok, prompt)
    assert out.response_ids == ids and out.response_mask == mask
    text = tok.decode(out.response_ids, skip_special_tokens=True)  # as verl's reward manager decodes
    assert text == "<|call|>604876\n<|tool|>678406\n678406"
    assert reward.compute_score("", text, "678406") == 1.0
    assert tool_demo._calls(text)
    assert len(ids) <= tool_demo.RESPONSE_LENGTH


def test_direct_answer_is_one_turn_and_a_garbled_call_costs_reward(tok):
    prompt = [{"role": "user", "content": assets.task_prompt("123")}]
    direct = tok("321", add_special_tokens=False).input_ids + [tok.eos_token_id]
    out = _run_loop(tok, _Replay([direct]), prompt)
    assert out.num_turns == 2 and out.response_mask == [1] * len(direct)
    assert reward.compute_score("", tok.decode(out.response_ids, skip_special_tokens=True), "321") == 1.0
    garbled = tok("<|call|>12x", add_special_tokens=False).input_ids + [tok.eos_token_id]
    out = _run_loop(tok, _Replay([garbled, direct]), prompt)
    text = tok.decode(out.response_ids, skip_special_tokens=True)
    assert out.num_turns == 4 and text == "<|call|>12x\n<|tool|>x21\n321"  # the tool echoes what it got, reversed
    # a call that never got its answer back (cut by the length limit) scores 0
    assert reward.compute_score("", "<|call|>1234", "4321") == 0.0


def test_tool_tokens_are_single_non_special_ids_and_the_reward_spells_them_alike(tok):
    assert (reward.CALL_TOKEN, reward.TOOL_TOKEN) == (assets.CALL_TOKEN, assets.TOOL_TOKEN)
    for t in (assets.CALL_TOKEN, assets.TOOL_TOKEN):
        assert len(tok(t, add_special_tokens=False).input_ids) == 1 and t not in tok.all_special_tokens
    assert len(tok) <= assets.padded_vocab_size(tok) == 320  # the model's head needs no resize
