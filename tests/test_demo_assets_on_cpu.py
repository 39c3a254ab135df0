"""Demo assets: tokenizer, tiny model, task parquet (read by verl's own RLHFDataset), reward, warm start."""

import json
import os

import pandas as pd
import pytest
import torch

from dppo_verl.demo import assets
from dppo_verl.demo.reward import compute_score


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Assets without the warm start (the warm-start test runs its own short one)."""
    return assets.build_all(str(tmp_path_factory.mktemp("cache")), n_train=256, n_val=32,
                            warm_start={"steps": 0})


@pytest.fixture(scope="module")
def tokenizer(built):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(built["model_init"])


def test_tokenizer_round_trips_one_token_per_byte(built, tokenizer):
    from transformers import AutoTokenizer

    assert tokenizer.is_fast
    for text in ["reverse 0123456789", "9876", "Any ASCII: {x} = [1, 2]; ok?\nnext line"]:
        ids = tokenizer(text, add_special_tokens=False).input_ids
        assert len(ids) == len(text)  # one token per character: positions line up with digits
        assert tokenizer.decode(ids) == text
    assert tokenizer.decode(tokenizer("naïve 日本").input_ids) == "naïve 日本"  # byte-level: nothing is lost
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.eos_token_id != tokenizer.pad_token_id
    # Special tokens disappear when decoding as verl's reward manager does.
    ids = tokenizer("4321", add_special_tokens=False).input_ids + [tokenizer.eos_token_id, tokenizer.pad_token_id]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "4321"
    # transformers picks the tokenizer class from the model folder's config (qwen2); the standalone folder
    # must tokenize identically, or the warm start and verl would see different ids.
    alone = AutoTokenizer.from_pretrained(built["tokenizer"])
    text = "<|user|>reverse 01 x\n<|assistant|>10<|im_end|>"
    assert alone(text).input_ids == tokenizer(text).input_ids


def test_byte_symbols_are_the_byte_level_alphabet():
    from tokenizers import pre_tokenizers

    symbols = assets.byte_symbols()
    assert len(symbols) == 256 and set(symbols) == set(pre_tokenizers.ByteLevel.alphabet())
    assert symbols[ord(" ")] == "\u0120" and symbols[ord("\n")] == "\u010a" and symbols[ord("7")] == "7"


def test_chat_template_renders_and_satisfies_verls_qwen_token_builder(tokenizer):
    from verl.utils.tokenizer.continuous_token_wiring import create_continuous_token_builder

    messages = [{"role": "user", "content": "reverse 123"}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == "<|user|>reverse 123<|assistant|>"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert len(ids) == 2 + len("reverse 123")  # role markers are single tokens
    # The rollout renders prompts with this builder, chosen from model_type "qwen2"; it insists on
    # "<|im_end|>" and a one-token "\n", and must produce the same ids as the plain template.
    builder = create_continuous_token_builder(tokenizer, hf_model_type="qwen2")
    assert builder.build_initial_tokens(messages) == ids


def test_model_loads_with_transformers_and_has_head_dim_64(built, tokenizer):
    from transformers import AutoModelForCausalLM

    with open(os.path.join(built["model_init"], "config.json")) as f:
        cfg = json.load(f)
    assert cfg["model_type"] == "qwen2" and cfg["dtype"] == "bfloat16"
    assert cfg["hidden_size"] // cfg["num_attention_heads"] == 64  # vLLM's CPU attention refuses other sizes
    assert cfg["num_key_value_heads"] % 2 == 0 and cfg["num_attention_heads"] % 2 == 0  # Megatron TP=2 demo
    assert cfg["vocab_size"] % 64 == 0 and cfg["vocab_size"] >= len(tokenizer)
    assert cfg["eos_token_id"] == tokenizer.eos_token_id and cfg["pad_token_id"] == tokenizer.pad_token_id
    model = AutoModelForCausalLM.from_pretrained(built["model_init"], dtype=torch.float32)
    ids = torch.tensor([tokenizer("<|user|>reverse 42<|assistant|>").input_ids])
    logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], cfg["vocab_size"]) and torch.isfinite(logits).all()


def _rlhf_dataset(path, tokenizer, cache_dir, max_prompt_length):
    from omegaconf import OmegaConf
    from verl.utils.dataset.rl_dataset import RLHFDataset

    config = OmegaConf.create({"max_prompt_length": max_prompt_length, "filter_overlong_prompts": True,
                               "filter_overlong_prompts_workers": 1, "truncation": "error",
                               "cache_dir": str(cache_dir)})
    return RLHFDataset(data_files=path, tokenizer=tokenizer, config=config)


def test_parquet_is_read_by_verls_rlhf_dataset(built, tokenizer, tmp_path):
    # The longest prompt is 16 tokens: two role tokens + "reverse " + six digits.
    dataset = _rlhf_dataset(built["train"], tokenizer, tmp_path, max_prompt_length=16)
    assert len(dataset) == 256  # nothing filtered as overlong
    item = dataset[3]
    digits = item["raw_prompt"][0]["content"].removeprefix("reverse ")
    assert item["raw_prompt"][0]["role"] == "user" and digits.isdigit() and 3 <= len(digits) <= 6
    assert item["reward_model"]["ground_truth"] == digits[::-1]
    assert item["data_source"] == assets.DATA_SOURCE and item["index"] == 3
    # verl measures prompts with our chat template: one token less drops exactly the six-digit prompts.
    six = sum(len(p[0]["content"]) == len("reverse ") + 6 for p in pd.read_parquet(built["train"])["prompt"])
    assert 0 < six < 256
    assert len(_rlhf_dataset(built["train"], tokenizer, tmp_path, max_prompt_length=15)) == 256 - six


def test_train_and_val_are_disjoint_and_deterministic(built, tmp_path):
    train, val = pd.read_parquet(built["train"]), pd.read_parquet(built["val"])
    prompts = lambda df: {p[0]["content"] for p in df["prompt"]}  # noqa: E731
    assert len(prompts(train)) == 256 and len(prompts(val)) == 32
    assert not prompts(train) & prompts(val)
    again = assets.write_task_parquet(str(tmp_path), 256, 32, seed=0)
    assert prompts(pd.read_parquet(again["val"])) == prompts(val)


def test_build_all_reuses_a_finished_build(built, capsys):
    cache = os.path.dirname(built["root"])
    stamp = os.path.getmtime(os.path.join(built["model_init"], "model.safetensors"))
    again = assets.build_all(cache, n_train=256, n_val=32, warm_start={"steps": 0})
    assert again == built and "build " not in capsys.readouterr().out
    assert os.path.getmtime(os.path.join(built["model_init"], "model.safetensors")) == stamp
    other = assets.build_all(cache, n_train=128, n_val=32, warm_start={"steps": 0})
    assert other["root"] != built["root"]  # a different setting never reuses a stale folder


@pytest.mark.parametrize("response, truth, expected", [
    ("54321", "54321", 1.0),
    ("", "54321", 0.0),
    ("54300", "54321", 3 / 5),
    ("5432", "54321", 4 / 5),          # one missing digit
    ("5432199", "54321", 5 / 7),       # junk appended costs as much as a wrong digit
    (" 5 4 3 2 1 ", "54321", 1.0),     # spaces ignored
    ("54321\nreverse 999", "54321", 1.0),  # text after the first newline is not the answer
    ("54321<|im_end|>99", "54321", 1.0),
    ("abcde", "54321", 0.0),
    ("012", "012", 1.0),               # leading zero kept (string ground truth)
])
def test_reward_partial_credit(response, truth, expected):
    assert compute_score(assets.DATA_SOURCE, response, truth) == pytest.approx(expected)


@pytest.mark.parametrize("path", ["pkg://dppo_verl.demo.reward", "FILE"])
def test_reward_loads_through_verls_custom_reward_function_config(path):
    from omegaconf import OmegaConf
    from verl.trainer.ppo.reward import get_custom_reward_fn

    import dppo_verl.demo.reward as module

    path = module.__file__ if path == "FILE" else path  # by file: loaded outside the package
    cfg = OmegaConf.create({"reward": {"custom_reward_function": {
        "path": path, "name": "compute_score", "reward_kwargs": {}}}})
    fn = get_custom_reward_fn(cfg)
    # Called the way verl's naive reward manager calls it (keywords, extra_info with verl's additions).
    score = fn(data_source=assets.DATA_SOURCE, solution_str="321", ground_truth="320",
               extra_info={"split": "train", "index": 0, "num_turns": 2, "rollout_reward_scores": {}})
    assert score == pytest.approx(2 / 3)


def test_short_warm_start_lowers_the_loss_and_saves_a_loadable_model(built, tmp_path):
    from dppo_verl.demo.warmstart import evaluate, warm_start

    out = str(tmp_path / "warm")
    result = warm_start(built["model_init"], built["train"], out, steps=30, lr=3e-3, batch_size=32, log_every=10)
    losses = result["losses"]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["dtype"] == "bfloat16"  # saved as declared, not as the fp32 it trained in
    reward = evaluate(out, built["val"], n=16, temperature=1.0, seed=0)
    assert 0.0 <= reward <= 1.0


def test_default_warm_start_is_partly_right(tmp_path):
    """The default assets leave RL room both ways: clearly better than random, clearly short of perfect."""
    from dppo_verl.demo.warmstart import evaluate

    paths = assets.build_all(str(tmp_path), seed=0)
    assert evaluate(paths["model_init"], paths["val"], n=64) < 0.05
    sampled = evaluate(paths["model"], paths["val"], n=128, temperature=1.0)
    assert 0.3 <= sampled <= 0.6, sampled
    assert evaluate(paths["model"], paths["val"], n=128, temperature=0.0) < 0.9  # greedy: not solved either
