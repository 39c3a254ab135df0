"""Local, download-free assets for the CPU demo: tokenizer, tiny Qwen2 model and the "reverse digits" task.

Everything is built from code with fixed seeds, in Hugging Face format, so verl (FSDP actor), vLLM (rollout)
and plain ``transformers`` all load the same folders. ``build_all`` caches the result under a folder named
after a hash of every setting, so a second ``make demo`` reuses it and any change rebuilds it.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import string

__all__ = [
    "AGENTS", "CALL_TOKEN", "CHAT_TEMPLATE", "DATA_SOURCE", "MODEL_SETTINGS", "TASK_SETTINGS", "TOOL_CHAT_TEMPLATE",
    "TOOL_TOKEN", "build_all", "build_tiny_model",
    "build_tokenizer", "byte_symbols", "padded_vocab_size", "task_answer", "task_prompt", "write_task_parquet",
]

# Bump when the meaning of a setting changes without its value changing (new cache folder).
ASSETS_VERSION = 2

# Qwen-style names: verl picks its chat-token builder from the model type ("qwen2"), and that builder requires
# a ``<|im_end|>`` token and "\n" as a single token. ``<|im_end|>`` ends an answer (eos), ``<|endoftext|>`` pads.
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_end|>", "<|user|>", "<|assistant|>", "<|system|>"]
EOS_TOKEN, PAD_TOKEN = "<|im_end|>", "<|endoftext|>"


def byte_symbols() -> list[str]:
    """The 256 printable stand-ins that byte-level BPE uses for the bytes 0..255 (GPT-2's mapping).

    Printable Latin-1 bytes stand for themselves; the others (space, newline, control bytes, ...) are moved,
    in byte order, to code points 256, 257, ... (so space is "\u0120", newline "\u010a").
    """
    keep = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    moved = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(moved)) for b in range(256)]


# A deliberately short template (role tokens, no newlines): fewer tokens for a 2-layer model to attend across.
# verl's RLHFDataset / agent loop call it with add_generation_prompt=True on the parquet ``prompt`` messages.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}<|im_end|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

# ``make demo AGENT=tool`` (verl's tool agent): two more tokens, appended after the bytes so every other id stays
# put and the padded head (320 rows) needs no resize. ``<|call|>digits`` is a whole tool call (10 tokens at most
# instead of hermes' ~60 bytes of JSON); ``<|tool|>`` opens the tool's answer. Both are *not* special: verl's reward
# manager decodes with ``skip_special_tokens=True``, and the reward must still see where a call and a tool answer are.
AGENTS = ("single", "tool")
CALL_TOKEN, TOOL_TOKEN = "<|call|>", "<|tool|>"
# A tool message ends with "\n" (as a Jinja expression: transformers renders templates with trim_blocks, which
# drops a bare newline after a tag), so the final answer is the line after the last tool answer (reward.py).
TOOL_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}<|im_end|>{% elif m['role'] == 'tool' %}{{ '\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

# head_dim = hidden / heads = 64: vLLM's CPU attention refuses smaller heads (16 was refused in a probe).
# Two KV heads: Megatron's tensor parallelism needs num_key_value_heads % tp == 0 (make demo ENGINE=megatron, TP=2);
# the FSDP demo trains the same model.
MODEL_SETTINGS = dict(
    hidden_size=128, num_attention_heads=2, num_key_value_heads=2, num_hidden_layers=2, intermediate_size=384,
    max_position_embeddings=512, rope_theta=10000.0, tie_word_embeddings=False, dtype="bfloat16",
)

DATA_SOURCE = "dppo_demo/reverse"
TASK_SETTINGS = dict(min_digits=3, max_digits=6, instruction="reverse ", ability="string_manipulation")


def build_tokenizer(out_dir: str, agent: str = "single"):
    """Byte-level tokenizer with no merges (one token per byte) and a chat template, saved in HF format.

    It is built *as* transformers' ``Qwen2Tokenizer``: transformers 5 loads any folder whose config says
    ``model_type: qwen2`` with that class, which rebuilds the pipeline (NFC, Qwen's split regex, byte-level
    pre-tokenizer and decoder) from the vocabulary and ignores the one in ``tokenizer.json``. A tokenizer with
    another pipeline would silently change once saved next to the model (a character-level vocabulary lost
    every space that way), so the vocabulary is byte-level and every string round-trips.
    """
    from transformers import Qwen2Tokenizer

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + byte_symbols())}
    tok = Qwen2Tokenizer(vocab=vocab, merges=[], eos_token=EOS_TOKEN, pad_token=PAD_TOKEN, unk_token=PAD_TOKEN,
                         additional_special_tokens=SPECIAL_TOKENS[2:])
    tok.chat_template = CHAT_TEMPLATE
    if _check_agent(agent) == "tool":
        tok.add_tokens([CALL_TOKEN, TOOL_TOKEN])
        tok.chat_template = TOOL_CHAT_TEMPLATE
    tok.save_pretrained(out_dir)
    return tok


def _check_agent(agent: str) -> str:
    if agent not in AGENTS:
        raise ValueError(f"AGENT={agent!r} is not one of {', '.join(AGENTS)}")
    return agent


def padded_vocab_size(tokenizer) -> int:
    """The model's vocabulary: ``len(tokenizer)`` rounded up to a multiple of 64 (friendly matmul shapes)."""
    return -(-len(tokenizer) // 64) * 64


def build_tiny_model(out_dir: str, tokenizer, seed: int = 0) -> str:
    """Randomly initialised Qwen2ForCausalLM (``MODEL_SETTINGS``, fixed seed) + tokenizer, saved to ``out_dir``."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    eos, pad = tokenizer.convert_tokens_to_ids(EOS_TOKEN), tokenizer.convert_tokens_to_ids(PAD_TOKEN)
    cfg = Qwen2Config(vocab_size=padded_vocab_size(tokenizer), bos_token_id=pad, eos_token_id=eos,
                      pad_token_id=pad, **MODEL_SETTINGS)
    assert cfg.hidden_size // cfg.num_attention_heads == 64, "vLLM's CPU attention needs head_dim 64"
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg).to(getattr(torch, MODEL_SETTINGS["dtype"]))
    # An explicit generation config: vLLM and HF generate read their default stop token and sampling from it;
    # top_k/top_p are neutral so the default sampling distribution is the full softmax (what DPPO's mu assumes).
    model.generation_config = GenerationConfig(bos_token_id=pad, eos_token_id=eos, pad_token_id=pad,
                                               do_sample=True, temperature=1.0, top_k=0, top_p=1.0)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def task_prompt(digits: str) -> str:
    """The user message for one example, e.g. ``"reverse 3821"``."""
    return TASK_SETTINGS["instruction"] + digits


def task_answer(digits: str) -> str:
    """The verifiable answer (the ground truth the reward compares against)."""
    return digits[::-1]


def _task_rows(n: int, rng: random.Random, split: str, taken: set[str]) -> list[dict]:
    """``n`` distinct examples not in ``taken`` (updated), as rows of verl's RLHF schema."""
    rows = []
    while len(rows) < n:
        length = rng.randint(TASK_SETTINGS["min_digits"], TASK_SETTINGS["max_digits"])
        digits = "".join(rng.choice(string.digits) for _ in range(length))
        if digits in taken:
            continue
        taken.add(digits)
        rows.append({
            "data_source": DATA_SOURCE,
            "prompt": [{"role": "user", "content": task_prompt(digits)}],
            "ability": TASK_SETTINGS["ability"],
            # A string, never a number: answers may start with 0.
            "reward_model": {"style": "rule", "ground_truth": task_answer(digits)},
            "extra_info": {"split": split, "index": len(rows)},
        })
    return rows


def write_task_parquet(out_dir: str, n_train: int, n_val: int, seed: int = 0) -> dict[str, str]:
    """Write ``train.parquet`` and ``val.parquet`` (disjoint examples) to ``out_dir``; returns their paths."""
    import pandas as pd

    os.makedirs(out_dir, exist_ok=True)
    rng, taken = random.Random(seed), set()
    paths = {}
    for split, n in (("train", n_train), ("val", n_val)):
        paths[split] = os.path.join(out_dir, f"{split}.parquet")
        pd.DataFrame(_task_rows(n, rng, split, taken)).to_parquet(paths[split], index=False)
    return paths


def _settings_key(**extra) -> str:
    """Short hash of every setting that changes the assets (the cache folder's name)."""
    blob = json.dumps(dict(version=ASSETS_VERSION, special=SPECIAL_TOKENS, bytes=byte_symbols(),
                           template=CHAT_TEMPLATE, model=MODEL_SETTINGS, task=TASK_SETTINGS,
                           source=DATA_SOURCE, **extra), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _build_once(path: str, what: str, build) -> str:
    """Run ``build(tmp_dir)`` unless ``path`` is complete; build in a temp folder and rename, so an
    interrupted build is never mistaken for a finished one."""
    if os.path.exists(os.path.join(path, ".complete")):
        print(f"[demo assets] reuse {what}: {path}", flush=True)
        return path
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    print(f"[demo assets] build {what}: {path}", flush=True)
    build(tmp)
    open(os.path.join(tmp, ".complete"), "w").close()
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
    return path


def build_all(cache_dir: str, seed: int = 0, n_train: int = 4096, n_val: int = 128,
              warm_start: dict | None = None, agent: str = "single") -> dict[str, str]:
    """Build (or reuse) every demo asset under ``cache_dir``; returns their paths.

    Keys: ``root``, ``tokenizer``, ``model_init`` (random init), ``model`` (after the warm start, the one to
    train with RL; the same as ``model_init`` when ``warm_start`` is ``{"steps": 0}``), ``data``, ``train``,
    ``val``. ``warm_start`` overrides ``dppo_verl.demo.warmstart.WARM_START_DEFAULTS`` (steps, lr, ...).
    ``agent="tool"``: the tokenizer with the tool tokens and template, warm-started on a mix of tool-using
    trajectories (``TOOL_WARM_START``) and direct answers.
    """
    from .warmstart import TOOL_WARM_START, WARM_START_DEFAULTS
    from .warmstart import warm_start as run_warm_start

    tool = _check_agent(agent) == "tool"
    warm = {**WARM_START_DEFAULTS, **(TOOL_WARM_START if tool else {}), **(warm_start or {})}
    # The single-turn key is unchanged by the tool variant (its cached assets stay valid).
    extra = dict(agent=agent, tool_tokens=[CALL_TOKEN, TOOL_TOKEN], tool_template=TOOL_CHAT_TEMPLATE) if tool else {}
    root = os.path.join(os.path.abspath(cache_dir), "demo-" + _settings_key(seed=seed, n_train=n_train,
                                                                            n_val=n_val, warm=warm, **extra))
    os.makedirs(root, exist_ok=True)
    paths = {"root": root}
    paths["tokenizer"] = _build_once(os.path.join(root, "tokenizer"), f"tokenizer ({agent} agent)",
                                     lambda d: build_tokenizer(d, agent))
    paths["data"] = _build_once(os.path.join(root, "data"), f"task parquet ({n_train} train / {n_val} val)",
                                lambda d: write_task_parquet(d, n_train, n_val, seed))
    paths["train"] = os.path.join(paths["data"], "train.parquet")
    paths["val"] = os.path.join(paths["data"], "val.parquet")

    def _model(d):
        """The random-init model, with the tokenizer as transformers loads it back (Qwen2Tokenizer)."""
        from transformers import AutoTokenizer

        build_tiny_model(d, AutoTokenizer.from_pretrained(paths["tokenizer"]), seed=seed)

    paths["model_init"] = _build_once(os.path.join(root, "model_init"), "tiny Qwen2 (random init)", _model)
    if warm["steps"] <= 0:
        paths["model"] = paths["model_init"]
        return paths
    paths["model"] = _build_once(
        os.path.join(root, "model"), f"warm start ({warm['steps']} supervised steps)",
        lambda d: run_warm_start(paths["model_init"], paths["train"], d, **warm))
    return paths
